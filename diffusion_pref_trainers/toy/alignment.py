"""Alignment experiments in the toy world: build a task's preference data by sampling the base pipeline, train
one objective on it, and measure base against aligned on held-out prompts with fixed seeds.

The default example, the benchmark table (``benchmarks/toy_alignment.py``) and the alignment test all run
through :func:`run_experiment`, so they measure the same thing the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from diffusion_pref_trainers.evaluation import PipelineSampler, compare, generate, save_comparison_grid
from diffusion_pref_trainers.toy.clip_train import load_toy_clip
from diffusion_pref_trainers.toy.model import RESOLUTION, load_toy_pipeline
from diffusion_pref_trainers.toy.quality import validity, world_distance
from diffusion_pref_trainers.toy.tasks import build_preference_dataset, get_task, task_prompts, toy_fidelity
from diffusion_pref_trainers.toy.world import attribute_embedding

# Training settings every toy run starts from (any can be overridden per run). The pretrained toy model's
# per-image denoising errors are larger than Stable Diffusion's latent MSE, hence a smaller beta; a LoRA on this
# small UNet needs a larger learning rate than on SD to move the samples within a CPU budget (in runs not kept:
# 1e-3 for 150 steps left the held-out reward where it was; 3e-3 for 300 steps overshot and cost prompt fidelity).
TRAINING_DEFAULTS: dict[str, Any] = {
    "resolution": RESOLUTION,
    "per_device_train_batch_size": 8,
    "max_steps": 150,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "constant",
    "lora_rank": 8,
    "lora_alpha": 8,
    "beta": 500.0,
    "logging_steps": 25,
    "save_steps": 0,
}

# Per objective: RPO measures how related two pairs are with the pipeline's own text encoder, since the toy world
# has no CLIP model to download.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"rpo": {"similarity": "text", "similarity_model_name_or_path": None}}


@dataclass
class ToyExperiment:
    """What data a toy run trains on and how it is evaluated (the objective's settings live in its config)."""

    task: str = "warm"
    train_prompts: int = 48
    eval_prompts: int = 16
    samples_per_prompt: int = 4
    eval_seeds: int = 2
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    min_margin: float = 0.1
    seed: int = 0
    sample_batch_size: int = 32

    def call_kwargs(self) -> dict[str, Any]:
        """Pipeline call settings shared by data sampling and evaluation."""
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}


@dataclass
class TaskData:
    """A task's training pairs, held-out pairs, held-out prompts and the base pipeline's images for them."""

    train: datasets.Dataset
    eval: datasets.Dataset
    eval_prompts: list[str]
    base_images: list[list[Image.Image]]


def prepare_task(pipe: Any, experiment: ToyExperiment) -> TaskData:
    """Sample the base pipeline for the task's prompts, pair and label the samples, and render the base's
    held-out images (the same seeds the aligned pipeline will use)."""
    train_prompts, eval_prompts = task_prompts(
        experiment.task, experiment.train_prompts, experiment.eval_prompts, experiment.seed
    )
    sampler = PipelineSampler(pipe, "toy-base", experiment.sample_batch_size, **experiment.call_kwargs())
    build = dict(
        task=experiment.task, min_margin=experiment.min_margin, samples_per_prompt=experiment.samples_per_prompt
    )
    train = build_preference_dataset(
        sampler, train_prompts, seed=experiment.seed, desc="sampling training pairs", **build
    )
    held_out = build_preference_dataset(
        sampler, eval_prompts, seed=experiment.seed + 1_000_000, desc="sampling held-out pairs", **build
    )
    for name, pairs, prompts in (("training", train, train_prompts), ("held-out", held_out, eval_prompts)):
        if len(pairs) == 0:
            raise ValueError(
                f"No {name} pair for task {experiment.task!r}: the samples of all {len(prompts)} prompts were within "
                f"min_margin={experiment.min_margin} of each other. Use more prompts (`toy_prompts` in a recipe)."
            )
    base_images = _generate(pipe, eval_prompts, experiment, "generating base model's held-out images")
    return TaskData(train, held_out, eval_prompts, base_images)


def _generate(pipe: Any, prompts: list[str], experiment: ToyExperiment, desc: str) -> list[list[Image.Image]]:
    """Held-out images: seeds ``0 .. eval_seeds - 1`` for every prompt, under a progress bar named ``desc``."""
    seeds = list(range(experiment.eval_seeds))
    return generate(pipe, prompts, seeds, experiment.sample_batch_size, desc, **experiment.call_kwargs())


def run_experiment(
    method: str,
    experiment: ToyExperiment,
    output_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    data: TaskData | None = None,
) -> dict[str, Any]:
    """Train ``method`` on the task's pairs, then compare aligned with base: reward, win rate, fidelity, style
    share, diversity, validity, distance to the world, held-out implicit-reward accuracy before/after, wall time.
    Writes a base-vs-aligned grid.

    ``data`` (from :func:`prepare_task`) lets several objectives share one dataset; each run trains a fresh copy
    of the shipped toy pipeline.
    """
    from diffusion_pref_trainers.trainers import TRAINERS

    task = get_task(experiment.task)
    pipe = load_toy_pipeline()
    data = data if data is not None else prepare_task(pipe, experiment)
    trainer_class = TRAINERS[method]
    fields = {field.name for field in dataclasses.fields(trainer_class.config_class)}
    defaults = {key: value for key, value in TRAINING_DEFAULTS.items() if key in fields}  # SFT has no beta
    settings = {
        **defaults, **METHOD_DEFAULTS.get(method, {}), "seed": experiment.seed, **(overrides or {}),
        "output_dir": str(output_dir),
    }  # fmt: skip
    trainer = trainer_class(pipe, trainer_class.config_class(**settings), data.train, eval_dataset=data.eval)
    before = trainer.evaluate()
    start = time.perf_counter()
    trainer.train()
    state = trainer.state
    train_seconds = time.perf_counter() - start
    after = trainer.evaluate()
    aligned = _generate(trainer.pipe, data.eval_prompts, experiment, "generating aligned model's held-out images")
    distance = functools.partial(world_distance, load_toy_clip()[0], seed=experiment.seed)
    metrics = compare(
        data.eval_prompts, data.base_images, aligned, task, toy_fidelity, task.in_style, attribute_embedding,
        validity=validity, distance=distance,
    )  # fmt: skip
    grid = Path(output_dir) / "comparison.png"
    save_comparison_grid(data.eval_prompts[:8], data.base_images[:8], aligned[:8], grid)
    return {
        "method": method,
        "task": task.name,
        "train_pairs": len(data.train),
        "steps": state.global_step,
        "train_seconds": round(train_seconds, 1),
        **{key: round(value, 4) for key, value in metrics.items()},
        "eval_accuracy/before": round(before.get("eval_rewards/accuracies", float("nan")), 4),
        "eval_accuracy/after": round(after.get("eval_rewards/accuracies", float("nan")), 4),
        "grid": str(grid),
        "experiment": asdict(experiment),
        "settings": {key: value for key, value in settings.items() if key != "output_dir"},
    }
