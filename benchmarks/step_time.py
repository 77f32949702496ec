"""Step time and peak memory of each objective, against a straightforward baseline step, on a benchmark kit.

    python benchmarks/step_time.py [--quick] [--kit tiny|sd15_shaped] [--pairs 4] [--steps 12] [--resolution R]
        [--repeats 1] [--out benchmarks/results/step_time_<kit>_<cpu|cuda>[_quick].json]

Each case runs in its own subprocess (so peak memory is its own): `warmup` optimizer steps are
discarded and the median of the rest is reported; with `--repeats` the cases run round-robin and the
median is over the timed steps of all runs. The baseline does a LoRA DPO step the plain way: VAE
and text encoder every step, the reference as a second full copy of the UNet, winners and losers in
separate forwards, no caching. The library's cases run its fast path for a CPU: `cache_latents=True`
(the precompute happens before the first step and is not timed), adapters-off reference, one batched
forward for the policy and one for the reference; `dpo_no_cache` separates the cache's share. Every
speed claim in the docs is a ratio against the baseline, measured in the same run. Memory is reported
twice: the process's peak RSS, and the peak minus the RSS after imports, before any model is built
(`model_step_mib`: the models, data, cache and the step's own memory, without the ~385 MiB of libraries).
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import numpy as np
import torch
from common import (
    StepClock,
    base_parser,
    current_rss_mib,
    default_out,
    pool,
    run_case,
    summarize,
    write_result,
)
from kits import KITS, pipeline

FAST = {"cache_latents": True}
CASES: dict[str, dict[str, Any]] = {
    "baseline_dpo": {},
    "dpo": {"method": "dpo", **FAST},
    "dpo_no_cache": {"method": "dpo"},
    "dpo_checkpointing": {"method": "dpo", "gradient_checkpointing": True, **FAST},
    "rpo_text": {"method": "rpo", "similarity": "text", "similarity_model_name_or_path": None, **FAST},
    "rpo_multimodal": {"method": "rpo", "similarity": "multimodal", **FAST},
    "kto": {"method": "kto", **FAST},
    "mapo": {"method": "mapo", **FAST},
    "sft": {"method": "sft", **FAST},
}
# The SD1.5-shaped and full-size kits cost seconds a step on a CPU: only the cases the targets compare run on them.
TARGET_CASES = ("baseline_dpo", "dpo", "dpo_no_cache", "dpo_checkpointing", "rpo_text")
KIT_CASES = {"tiny": tuple(name for name in CASES if name != "dpo_checkpointing"), "sd15_shaped": TARGET_CASES,
             "sd15": TARGET_CASES}  # fmt: skip


def _pixels(images: list[Any]) -> torch.Tensor:
    """PIL images to a [-1, 1] batch, as the baseline's data loading."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _baseline_times(kit: str, pairs: int, steps: int, resolution: int, precision: str) -> list[float]:
    """Seconds per step of the straightforward LoRA DPO step (see the module docstring), on the GPU when there is one.

    With bf16 it does what the trainer does: frozen weights stored in bf16, LoRA weights in fp32, autocast."""
    import torch.nn.functional as F
    from peft import LoraConfig

    from diffusion_pref_trainers.testing import make_preference_dataset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    pipe = pipeline(kit)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).to(device, dtype)
    reference = copy.deepcopy(unet)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = pipe.scheduler
    data = make_preference_dataset(pairs, size=resolution)
    winners, losers = _pixels(data["chosen"]).to(device, dtype), _pixels(data["rejected"]).to(device, dtype)
    prompts = list(data["prompt"])
    clock = StepClock()
    clock.on_train_begin()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            with torch.no_grad():
                ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids  # fmt: skip
                cond = text_encoder(ids.to(device))[0]
                z_w = vae.encode(winners).latent_dist.sample().float() * vae.config.scaling_factor
                z_l = vae.encode(losers).latent_dist.sample().float() * vae.config.scaling_factor
            noise = torch.randn_like(z_w)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), device=device)
            noisy_w, noisy_l = scheduler.add_noise(z_w, noise, t), scheduler.add_noise(z_l, noise, t)
            errors = {}
            for name, net, grad in (("m", unet, True), ("r", reference, False)):
                with torch.set_grad_enabled(grad):
                    for side, noisy in (("w", noisy_w), ("l", noisy_l)):
                        pred = net(noisy, t, cond).sample
                        errors[name + side] = (pred.float() - noise).pow(2).flatten(1).mean(1)
            logits = (errors["rw"] - errors["mw"]) - (errors["rl"] - errors["ml"])
            loss = -F.logsigmoid(0.5 * 5000 * logits).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        clock.on_step_end()
    return clock.seconds()


def _trainer_times(kit: str, case: dict[str, Any], pairs: int, steps: int, resolution: int, precision: str
                   ) -> list[float]:  # fmt: skip
    """Seconds per optimizer step of the library's trainer for `case`."""
    from diffusion_pref_trainers.testing import make_preference_dataset, tiny_clip_model
    from diffusion_pref_trainers.trainers import TRAINERS

    settings = dict(case)
    trainer_class = TRAINERS[settings.pop("method")]
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        if settings.get("similarity") in ("image", "multimodal"):
            model, processor = tiny_clip_model(image_size=resolution)
            model.save_pretrained(f"{tmp}/clip")
            processor.save_pretrained(f"{tmp}/clip")
            settings["similarity_model_name_or_path"] = f"{tmp}/clip"
        args = trainer_class.config_class(
            output_dir=f"{tmp}/out", cache_dir=f"{tmp}/cache", per_device_train_batch_size=pairs, max_steps=steps,
            resolution=resolution, learning_rate=1e-4, logging_steps=steps, save_steps=0, report_to="none",
            mixed_precision=precision, **settings,
        )  # fmt: skip
        data = make_preference_dataset(pairs * steps, size=resolution)
        trainer_class(pipeline(kit), args, data, callbacks=[clock]).train()
    return clock.seconds()


def measure(kit: str, name: str, pairs: int, steps: int, warmup: int, resolution: int, precision: str
            ) -> dict[str, Any]:  # fmt: skip
    """Run one case in this process and summarise it."""
    import diffusers  # noqa: F401  (the libraries count as the process, not as the case's memory)
    import peft  # noqa: F401

    import diffusion_pref_trainers.testing  # noqa: F401

    before_models = current_rss_mib()
    torch.manual_seed(0)
    case = CASES[name]
    times = (
        _baseline_times(kit, pairs, steps, resolution, precision)
        if not case
        else _trainer_times(kit, case, pairs, steps, resolution, precision)
    )
    row = {"case": name, **summarize(times, warmup, pairs)}
    row["model_step_mib"] = round(row["peak_rss_mib"] - before_models, 1) if before_models is not None else None
    return row


def main() -> None:
    parser = base_parser(__doc__, "Fewer steps (CI-sized).", out="step_time_<kit>_<device>[_quick].json")
    parser.add_argument("--kit", choices=sorted(KIT_CASES), default="tiny", help="The models (see kits.py).")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="Autocast dtype (GPU: bf16).")
    parser.add_argument("--pairs", type=int, default=None, help="Pairs per step; default: 4 (tiny), 2 (other kits).")
    parser.add_argument("--resolution", type=int, default=None, help="Image resolution; default: the kit's.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs of every case, round-robin; steps pooled.")
    args = parser.parse_args()
    steps = 6 if args.quick else args.steps
    pairs = args.pairs or (4 if args.kit == "tiny" else 2)
    resolution = args.resolution or KITS[args.kit][1]
    torch.set_num_threads(args.threads)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in KIT_CASES[args.kit]}
    for repeat in range(args.repeats):
        for name in runs:
            runs[name].append(
                run_case(
                    args.threads, measure, args.kit, name, pairs, steps, args.warmup, resolution, args.mixed_precision
                )  # fmt: skip
            )
            print(f"{name} (run {repeat + 1}/{args.repeats}): {runs[name][-1]['ms_per_step']} ms/step", flush=True)
    rows = [pool(case_runs, pairs) for case_runs in runs.values()]
    base = rows[0]
    dpo = next(r for r in rows if r["case"] == "dpo")
    # On a GPU the memory that counts is CUDA's (models and step); on a CPU the process's and the models+step part.
    memory_keys = ["peak_cuda_mib"] if "peak_cuda_mib" in base else ["peak_rss_mib", "model_step_mib"]
    for row in rows:
        row["speedup_vs_baseline"] = round(row["pairs_per_s"] / base["pairs_per_s"], 2)
        for key in memory_keys:
            row[key.replace("_mib", "_vs_baseline")] = round(row[key] / base[key], 2)
        row["step_vs_dpo"] = round(row["ms_per_step"] / dpo["ms_per_step"], 3)
    print(
        f"\n{KITS[args.kit][0]}, {pairs} pairs/step, {resolution} px, mixed precision {args.mixed_precision}, "
        f"{args.threads} thread(s)"
    )
    print(f"{'case':<18}{'ms/step':>10}{'pairs/s':>9}{'x base':>8}{'vs DPO':>8}"
          + "".join(f"{key:>16}{'/base':>7}" for key in memory_keys))  # fmt: skip
    for r in rows:
        print(f"{r['case']:<18}{r['ms_per_step']:>10}{r['pairs_per_s']:>9}{r['speedup_vs_baseline']:>8}{r['step_vs_dpo']:>8}"
              + "".join(f"{r[key]:>16}{r[key.replace('_mib', '_vs_baseline')]:>7}" for key in memory_keys))  # fmt: skip
    settings = {"kit": args.kit, "model": KITS[args.kit][0], "pairs": pairs, "steps": steps, "warmup": args.warmup,
                "resolution": resolution, "quick": args.quick, "mixed_precision": args.mixed_precision,
                "repeats": args.repeats, "cases": {name: CASES[name] for name in KIT_CASES[args.kit]}}  # fmt: skip
    if args.kit == "sd15_shaped":
        from kits import sd15_flop_shares

        settings["flop_shares"] = {"this_kit": sd15_flop_shares(8, resolution), "sd15_512px": sd15_flop_shares(1, 512)}
    write_result(args.out or default_out(f"step_time_{args.kit}", args.quick), settings, rows, args.threads)


if __name__ == "__main__":
    main()
