"""Step time, peak memory and MFU of LoRA Diffusion-DPO with each speed lever toggled from the default.

    python benchmarks/levers.py [--quick] [--pairs 4] [--steps 12] [--warmup 2] [--threads 1] [--kit tiny]
        [--resolution R] [--mixed-precision no|bf16] [--model PATH] [--cases NAME ...] [--epoch-steps N]
        [--out benchmarks/results/levers_<cpu|cuda>.json]

The `default` case is the library's defaults plus `cache_latents=True`; every other case flips one switch
(`cache_latents` off, `gradient_checkpointing`, `channels_last`, unfused attention instead of SDPA,
`torch_compile`, 8-bit AdamW, bf16 autocast,
full fine-tuning with AdamW and with 8-bit AdamW, where the optimizer state is the denoiser's size; the idle
encoders kept on the accelerator, `offload_cached_encoders=False`);
`no_cache_latents_workers2` decodes the images in 2 data-loader workers (compare it with `no_cache_latents`, where
the training process decodes them). `--cases` measures only the named cases (and `default`, the reference).
Each case runs in its own subprocess (its own peak memory): `warmup` optimizer steps are discarded (they
include torch.compile's compilation, reported separately as `first_step_s`) and the median of the rest is
reported. The FLOPs of one step are counted once, in the default case, with `FlopCounterMode` (policy forward
and backward, reference forward); every case did that same useful work, so achieved FLOP/s = step FLOPs /
median step time, and MFU = achieved / the GPU's dense bf16 peak where `common.PEAK_BF16_FLOPS` knows the GPU.
`--kit` picks the models (kits.py: the tiny offline kit by default; `sd15` and `sdxl` are the full-size
architectures the GPU targets name), `--model` a local diffusers Stable Diffusion folder instead, and
`--mixed-precision bf16` makes bf16 autocast part of every case (then the `bf16` case is skipped).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from common import (
    StepClock,
    base_parser,
    default_out,
    peak_bf16_flops,
    run_case,
    summarize,
    throughput,
    training_step_flops,
    write_result,
)
from kits import KITS, pipeline

DEFAULT: dict[str, Any] = {"cache_latents": True}
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "no_cache_latents": {"cache_latents": False},
    "no_cache_latents_workers2": {"cache_latents": False, "dataloader_num_workers": 2},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "channels_last": {"channels_last": True},
    "attention_eager": {"attention_backend": "eager"},
    "torch_compile": {"torch_compile": True},
    "adamw_8bit": {"optim": "adamw_8bit"},
    "no_offload": {"offload_cached_encoders": False},
    "full_finetune": {"use_lora": False},
    "full_finetune_adamw_8bit": {"use_lora": False, "optim": "adamw_8bit"},
    "bf16": {"mixed_precision": "bf16"},
}


def skip_reason(name: str, quick: bool, precision: str) -> str | None:
    """Why a case is not measured on this device (None: it is)."""
    cuda = torch.cuda.is_available()
    if name == "bf16" and precision == "bf16":
        return "every case runs bf16 (--mixed-precision bf16)"
    if name in ("adamw_8bit", "full_finetune_adamw_8bit") and not cuda:
        return "8-bit AdamW saves optimizer-state memory, too little here to show in RSS: measured on GPUs only"
    if name == "no_offload" and not cuda:
        return "offloading the cached encoders moves them from the CPU to the CPU: measured on GPUs only"
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if name == "torch_compile" and quick and not cuda:
        return "inductor compiles C++ kernels for minutes on a CPU: measured without --quick only"
    if name == "bf16" and quick and not cuda:
        return "bf16 autocast is emulated on CPUs without bf16 units (5.7x slower here): measured without --quick only"
    return None


def measure(
    name: str,
    pairs: int,
    steps: int,
    warmup: int,
    resolution: int,
    model: str,
    overrides: dict[str, Any],
    epoch_steps: int | None = None,
) -> dict[str, Any]:
    """Train `steps` LoRA DPO steps of case `name` in this process and summarise them (over epochs of `epoch_steps`
    steps; default: one epoch); the default case also counts its step FLOPs."""
    from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer, testing

    torch.manual_seed(0)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        args = DiffusionDPOConfig(
            output_dir=f"{tmp}/out", cache_dir=f"{tmp}/cache", per_device_train_batch_size=pairs, max_steps=steps,
            resolution=resolution, learning_rate=1e-4, logging_steps=steps, save_steps=0,
            **overrides,
        )  # fmt: skip
        data = testing.make_preference_dataset(pairs * (epoch_steps or steps), size=resolution)
        trainer = DiffusionDPOTrainer(pipeline(model) if model in KITS else model, args, data, callbacks=[clock])
        trainer.train()
        row = {"case": name, **summarize(clock.seconds(), warmup, pairs)}
        row["rss_at_train_begin_mib"] = clock.rss_at_train_begin_mib  # models, data and cache already loaded
        row["first_step_s"], row["total_s"] = round(clock.seconds()[0], 2), round(sum(clock.seconds()), 2)
        if name == "default":
            row["step_flops"] = training_step_flops(trainer, pairs)
    return row


def add_throughput(rows: list[dict[str, Any]], step_flops: int, peak: float | None) -> None:
    """Achieved FLOP/s (the default step's FLOPs over each row's median step) and MFU where the peak is known."""
    for row in rows:
        if "ms_per_step" not in row:
            continue
        row.update(throughput(step_flops, row["ms_per_step"], peak))


def main() -> None:
    parser = base_parser(__doc__, "Fewer steps, no CPU compile or bf16 (CI-sized).", out="levers_<device>.json")
    parser.add_argument("--pairs", type=int, default=4, help="Pairs per step.")
    parser.add_argument("--kit", choices=sorted(KITS), default="tiny", help="The models (see kits.py).")
    parser.add_argument("--resolution", type=int, default=None, help="Image resolution; default: the kit's.")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="Autocast for every case.")
    parser.add_argument("--model", default=None, help="Local diffusers SD pipeline folder instead of a kit.")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="Cases to measure.")
    parser.add_argument("--epoch-steps", type=int, default=None, help="Steps an epoch lasts; default: one epoch.")
    args = parser.parse_args()
    steps = 6 if args.quick else args.steps
    resolution = args.resolution or KITS[args.kit][1]
    base = {**DEFAULT, "mixed_precision": args.mixed_precision}
    torch.set_num_threads(args.threads)
    rows = []
    for name in ["default", *(name for name in CASES if name in args.cases and name != "default")]:
        reason = skip_reason(name, args.quick, args.mixed_precision)
        rows.append(
            {"case": name, "skipped": reason}
            if reason
            else run_case(
                args.threads,
                measure,
                name,
                args.pairs,
                steps,
                args.warmup,
                resolution,
                args.model or args.kit,
                {**base, **CASES[name]},
                args.epoch_steps,
            )
        )
        print(f"{name}: {reason or str(rows[-1]['ms_per_step']) + ' ms/step'}", flush=True)
    default = rows[0]
    peak, mfu_note = peak_bf16_flops()
    add_throughput(rows, default["step_flops"], peak)
    for row in rows:
        if "ms_per_step" in row:
            row["time_vs_default"] = round(row["ms_per_step"] / default["ms_per_step"], 3)
    cuda = "peak_cuda_mib" in default
    memory_key, memory_name = ("peak_cuda_mib", "peak CUDA MiB") if cuda else ("peak_rss_mib", "peak RSS MiB")
    print(f"\n{'case':<28}{'ms/step':>10}{'x default':>10}{memory_name:>15}{'1st step s':>12}{'all steps s':>12}"
          f"{'GFLOP/s':>10}{'MFU':>8}")  # fmt: skip
    for r in rows:
        if "skipped" in r:
            print(f"{r['case']:<28}skipped: {r['skipped']}")
            continue
        print(f"{r['case']:<28}{r['ms_per_step']:>10}{r['time_vs_default']:>10}{r[memory_key]:>15}{r['first_step_s']:>12}"
              f"{r['total_s']:>12}{r['achieved_gflops_per_s']:>10}{str(r['mfu']):>8}")  # fmt: skip
    print(f"step FLOPs (default case, FlopCounterMode): {default['step_flops']:.4g}; {mfu_note}")
    settings = {
        "pairs": args.pairs, "steps": steps, "epoch_steps": args.epoch_steps or steps, "warmup": args.warmup,
        "resolution": resolution,
        "model": args.model or KITS[args.kit][0], "objective": "DPO, LoRA r8", "quick": args.quick,
        "default_config": base, "cases": {row["case"]: CASES[row["case"]] for row in rows},
        "step_flops": default["step_flops"], "mfu_note": mfu_note,
    }  # fmt: skip
    write_result(args.out or default_out("levers", args.quick), settings, rows, args.threads)


if __name__ == "__main__":
    main()
