"""Sharded engines on GPUs: FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 training the full-size SD1.5-shaped kit (random
weights, UNet 859,520,964 parameters) in bf16, LoRA and full fine-tuning. Prepared; NOT run yet (no GPU was lent).

    python benchmarks/distributed_gpu.py [--engines fsdp2,zero2,zero3] [--gpus N] [--steps 6] [--resolution 512]
        [--out benchmarks/results/distributed_gpu_cuda.json]

For each engine and kind it writes an accelerate config for `--gpus` processes (default: every visible GPU; one
is enough) into a temporary folder, launches this file as the worker (`--worker ENGINE KIND`), and records the
engine accelerate set up, the losses, ms per step (median after the first 2) and the peak CUDA memory per GPU.
LoRA trains DPO (the reference is the adapters off); full fine-tuning trains MaPO (DPO with a frozen copy is refused
under FSDP2 and ZeRO-3). FSDP2 also checkpoints at step 2 and resumes to the end: `resume_exact` says whether the
final weights equal an uninterrupted run's. DeepSpeed runs with save_strategy "no" (its checkpoints are refused).
The GPU machines lack diffusers, datasets, trl and deepspeed: install their wheels first (docs/distributed.md).
About 1-3 minutes an engine on one H200.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "fsdp2": {
        "distributed_type": "FSDP",
        "fsdp_config": {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_cpu_ram_efficient_loading": False,
        },
    },
    "zero2": {"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2, "zero3_init_flag": False}},
    "zero3": {
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"zero_stage": 3, "zero3_init_flag": False, "zero3_save_16bit_model": True},
    },
}  # fmt: skip
KINDS = ("lora", "full")


def accelerate_config(engine: str, gpus: int) -> dict[str, Any]:
    """The accelerate config of `engine` on `gpus` processes of one machine, bf16 (as the shipped yaml files)."""
    return {
        "compute_environment": "LOCAL_MACHINE", "machine_rank": 0, "num_machines": 1, "num_processes": gpus,
        "mixed_precision": "bf16", "use_cpu": False, **ENGINES[engine],
    }  # fmt: skip


def launch(engine: str, kind: str, gpus: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One worker launch; its rank-0 report, or the failure's last lines."""
    config = folder / f"{engine}.json"  # accelerate reads JSON configs as it reads YAML ones
    config.write_text(json.dumps(accelerate_config(engine, gpus)))
    report = folder / f"{engine}_{kind}.json"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), __file__, "--worker",
        engine, kind, "--steps", str(args.steps), "--resolution", str(args.resolution), "--report", str(report),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode or not report.is_file():
        return {"engine": engine, "kind": kind, "ok": False, "error": result.stderr[-2000:]}
    return {"engine": engine, "kind": kind, "ok": True, **json.loads(report.read_text())}


def worker(engine: str, kind: str, steps: int, resolution: int, report: Path) -> None:
    """Train the SD1.5 kit under the launched engine (FSDP2: straight, then interrupted at step 2 and resumed; only
    the last training ends normally, as the end of a run closes the process group); rank 0 writes the report."""
    import torch
    from kits import pipeline

    from diffusion_pref_trainers import (
        DiffusionDPOConfig,
        DiffusionDPOTrainer,
        DiffusionMaPOConfig,
        DiffusionMaPOTrainer,
        TrainerCallback,
    )
    from diffusion_pref_trainers.testing import make_preference_dataset

    class Stop(Exception):
        pass

    class Clock(TrainerCallback):
        def __init__(self, stop: int | None) -> None:
            self.times: list[float] = []
            self.stop = stop

        def on_step_end(self, trainer: Any) -> None:
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            if trainer.state.global_step == self.stop:
                raise Stop

    trainer_class, config_class = (DiffusionDPOTrainer, DiffusionDPOConfig) if kind == "lora" else (
        DiffusionMaPOTrainer, DiffusionMaPOConfig)  # fmt: skip
    data = make_preference_dataset(8 * steps, size=resolution)
    checkpointed = engine == "fsdp2"

    def train(name: str, stop: int | None = None, resume: bool = False) -> tuple[Any, Clock]:
        config = config_class(
            output_dir=str(report.parent / f"{engine}_{kind}_{name}"), resolution=resolution, max_steps=steps,
            per_device_train_batch_size=1, mixed_precision="bf16", use_lora=kind == "lora", logging_steps=1,
            save_strategy="steps" if checkpointed else "no", save_steps=2, learning_rate=1e-5,
            gradient_checkpointing=kind == "full",
        )  # fmt: skip
        clock = Clock(stop)
        trainer = trainer_class(pipeline("sd15"), config, data, callbacks=[clock])
        torch.cuda.reset_peak_memory_stats()
        try:
            trainer.train(resume_from_checkpoint="latest" if resume else None)
        except Stop:
            pass
        return trainer, clock

    trainer, clock = train("straight", stop=steps if checkpointed else None)
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)][1:]
    row: dict[str, Any] = {
        "engine_set_up": str(trainer.accelerator.distributed_type), "processes": trainer.accelerator.num_processes,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "ms_per_step": round(1000 * sorted(gaps)[len(gaps) // 2], 1) if gaps else None,
        "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
    }  # fmt: skip
    if checkpointed:
        straight = Path(trainer.save_model(str(report.parent / f"{engine}_{kind}_straight_final")))
        train("resumed", stop=2)
        resumed_trainer, _ = train("resumed", resume=True)
        row["resume_exact"] = _same_weights(straight, Path(resumed_trainer.args.output_dir))
    if trainer.accelerator.is_main_process:
        report.write_text(json.dumps(row))


def _same_weights(first: Path, second: Path) -> bool:
    """Whether two saved models (LoRA file or diffusers denoiser folder) hold equal tensors."""
    import torch
    from safetensors.torch import load_file

    name = "pytorch_lora_weights.safetensors"
    files = [folder / name if (folder / name).is_file() else folder / "unet" / "diffusion_pytorch_model.safetensors"
             for folder in (first, second)]  # fmt: skip
    a, b = (load_file(str(file)) for file in files)
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--gpus", type=int, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_gpu_cuda.json"))
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "KIND"))
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.steps, args.resolution, args.report)
        return
    import torch

    gpus = args.gpus or torch.cuda.device_count()
    if not gpus:
        raise SystemExit("No GPU: this benchmark runs on GPUs only (the CPU-tested paths are in tests/).")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [launch(e, k, gpus, args, Path(tmp)) for e in args.engines.split(",") for k in KINDS]
    Path(args.out).write_text(
        json.dumps({"settings": vars(args) | {"gpus": gpus}, "rows": rows}, indent=2, default=str)
    )
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
