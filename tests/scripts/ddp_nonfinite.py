"""Two-process DPO run for tests: the loss turns NaN on process 1 only, at step 2, while every gradient stays finite
(DDP's averaging cannot spread it). Records what each process did with that step (both must skip it) and its final
weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer
from diffusion_pref_trainers.testing import make_preference_dataset, tiny_sd_pipeline

torch.set_num_threads(1)
root = Path(sys.argv[1])
config = DiffusionDPOConfig(
    output_dir=str(root / "out"), resolution=32, per_device_train_batch_size=2, max_steps=3, beta=50.0,
    learning_rate=1e-3, logging_steps=1, save_steps=0,
)  # fmt: skip
trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), config, make_preference_dataset(8, size=40))
rank, compute_loss, calls = trainer.accelerator.process_index, trainer.compute_loss, []


def poisoned(*args):
    """The objective, whose loss value (not its gradient) is NaN on process 1's second micro-batch (step 2)."""
    loss, metrics = compute_loss(*args)
    calls.append(1)
    if rank == 1 and len(calls) == 2:
        loss = loss + torch.tensor(float("nan"))  # a constant: the gradient stays finite
    return loss, metrics


trainer.compute_loss = poisoned
trainer.train()
state = trainer.state
report = {
    "nonfinite_steps": state.nonfinite_steps,
    "optimizer_steps": sorted({int(s["step"]) for s in trainer.optimizer.state.values()}),
    "logged": [entry["train/nonfinite_steps"] for entry in state.log_history if "train/nonfinite_steps" in entry],
    "weights": [float(p.detach().double().sum()) for p in trainer.trainable_parameters],
}
(root / f"rank{rank}.json").write_text(json.dumps(report))
