"""Two-process DPO run for tests, `straight` or interrupted at a checkpoint and `resumed`: records losses and files.

One training per launch: the end of a run closes the process group, which a second run would need.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer, TrainerCallback
from diffusion_pref_trainers.testing import make_preference_dataset, tiny_sd_pipeline

torch.set_num_threads(1)
root, mode = Path(sys.argv[1]), sys.argv[2]
data = make_preference_dataset(8, size=40)


class Interrupted(Exception):
    """Stands for a job killed after the checkpoint of step 2."""


class StopAtTwo(TrainerCallback):
    """Interrupts every process after optimizer step 2 (its checkpoint is written by then)."""

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.global_step == 2:  # step 3 begins
            raise Interrupted


def config(name: str) -> DiffusionDPOConfig:
    """Four steps of 2 rows per process with random crops and flips, a checkpoint every 2 steps."""
    return DiffusionDPOConfig(
        output_dir=str(root / name), resolution=32, per_device_train_batch_size=2, max_steps=4, beta=50.0,
        learning_rate=1e-3, logging_steps=1, save_steps=2, random_flip=True, center_crop=False,
    )  # fmt: skip


def losses(trainer: DiffusionDPOTrainer) -> list[float]:
    """The logged training losses, one per step."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


if mode == "straight":
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), config(mode), data)
    trainer.train()
else:
    interrupted = DiffusionDPOTrainer(tiny_sd_pipeline(), config(mode), data, callbacks=[StopAtTwo()])
    try:
        interrupted.train()
    except Interrupted:
        pass
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), config(mode), data)
    trainer.train(resume_from_checkpoint="latest")
rank = trainer.accelerator.process_index
report = {
    "world": trainer.accelerator.num_processes,
    "losses": losses(trainer),
    "files": sorted(path.name for path in (root / mode / "checkpoint-2").iterdir()),
}
(root / f"{mode}{rank}.json").write_text(json.dumps(report))
