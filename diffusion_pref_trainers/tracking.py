"""What the loop sends to accelerate's trackers: namespaced metrics and a run name, as transformers' callbacks do,
and validation images (`log_image`), each tracker through its own image logging.

`state.log_history` keeps TRL's plain keys (`loss`, `eval_loss`); trackers get `train/loss`, `eval/loss`
(transformers' `rewrite_logs`), so a dashboard groups training and evaluation curves apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

EVAL_PREFIX = "eval_"


def namespaced(logs: dict[str, float]) -> dict[str, float]:
    """`eval_x` -> `eval/x`, anything else `x` -> `train/x` (transformers' `rewrite_logs`)."""
    return {
        f"eval/{key[len(EVAL_PREFIX) :]}" if key.startswith(EVAL_PREFIX) else f"train/{key}": value
        for key, value in logs.items()
    }


def resolved_run_name(run_name: str | None, output_dir: str) -> str:
    """The run's name: `run_name`, else the name of `output_dir` (as TrainingArguments defaults it)."""
    return run_name or Path(output_dir).resolve().name


def logging_dir(output_dir: str, run_name: str) -> str:
    """accelerate's `logging_dir`, where file-writing trackers (tensorboard, ...) log: `output_dir/runs/<run name>`.

    accelerate adds the project's folder (the method's name) below it.
    """
    return str(Path(output_dir) / "runs" / run_name)


def tracker_init_kwargs(run_name: str) -> dict[str, dict[str, Any]]:
    """accelerate's `init_kwargs`: the run name under each tracker's own keyword."""
    return {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}, "trackio": {"name": run_name}}


def log_image(trackers: list[Any], key: str, image: Image.Image, step: int) -> list[str]:
    """Log one image under `key` at `step` to each of accelerate's `trackers` that can take images (tensorboard,
    wandb, trackio), as diffusers' training scripts do; returns the names of those that cannot."""
    pixels, skipped = np.asarray(image.convert("RGB")), []
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: pixels[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({key: [image]}, step=step)
        elif tracker.name == "trackio":
            import trackio

            tracker.log({key: trackio.Image(pixels)}, step=step)
        else:
            skipped.append(tracker.name)
    return skipped
