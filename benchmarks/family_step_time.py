"""Milliseconds per Diffusion-DPO step of each model family's tiny pipeline (the offline kit) on this machine.

    python benchmarks/family_step_time.py [--quick] [--pairs 4] [--steps 12] [--warmup 2] [--threads 1]
        [--out benchmarks/results/family_step_time_<cpu|cuda>[_quick].json]

Each family runs in its own subprocess: LoRA on the family's default targets, `pairs` pairs per step at
32 px, one policy and one reference forward per step (the trainer's own loop, timed by a callback); the
first `warmup` steps are discarded and the median of the rest is reported. SD3 and FLUX use their
pipelines' default T5 length (256 and 512 tokens) unless `--max-sequence-length` is given.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from common import StepClock, base_parser, default_out, run_case, summarize, write_result

FAMILIES = {
    "sd": "tiny_sd_pipeline",
    "sdxl": "tiny_sdxl_pipeline",
    "sd3": "tiny_sd3_pipeline",
    "flux": "tiny_flux_pipeline",
}


def measure(family: str, pairs: int, steps: int, warmup: int, max_sequence_length: int | None) -> dict[str, Any]:
    """Time `steps` DPO steps of `family`'s tiny pipeline in this process."""
    from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer, testing

    torch.manual_seed(0)
    pipe = getattr(testing, FAMILIES[family])()
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        args = DiffusionDPOConfig(
            output_dir=tmp, per_device_train_batch_size=pairs, max_steps=steps, resolution=32, beta=50.0,
            learning_rate=1e-4, logging_steps=steps, save_steps=0, max_sequence_length=max_sequence_length,
        )  # fmt: skip
        data = testing.make_preference_dataset(pairs * steps)
        trainer = DiffusionDPOTrainer(pipe, args, data, callbacks=[clock])
        trainer.train()
    return {
        "family": family,
        "pipeline": type(pipe).__name__,
        "denoiser_params": sum(p.numel() for p in trainer.family.denoiser.parameters()),
        **summarize(clock.seconds(), warmup, pairs),
    }


def main() -> None:
    parser = base_parser(__doc__, "6 steps per family (CI-sized).", out="family_step_time_*.json")
    parser.add_argument("--pairs", type=int, default=4, help="Pairs per step.")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (SD3/FLUX).")
    args = parser.parse_args()
    steps = 6 if args.quick else args.steps
    torch.set_num_threads(args.threads)
    rows = []
    for family in FAMILIES:
        rows.append(run_case(args.threads, measure, family, args.pairs, steps, args.warmup, args.max_sequence_length))
        print(f"{family:<6}{rows[-1]['ms_per_step']:>10} ms/step  ({rows[-1]['denoiser_params']:,} denoiser params)")
    settings = {"pairs": args.pairs, "steps": steps, "warmup": args.warmup, "resolution": 32, "quick": args.quick,
                "max_sequence_length": args.max_sequence_length, "objective": "DPO, LoRA r8"}  # fmt: skip
    write_result(args.out or default_out("family_step_time", args.quick), settings, rows, args.threads)


if __name__ == "__main__":
    main()
