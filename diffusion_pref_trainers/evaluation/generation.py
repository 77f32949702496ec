"""Seeded generation: every image is a function of (pipeline, prompt, seed), whatever the batch or device.

Each image gets its own CPU ``torch.Generator`` seeded with its seed, so the starting noise is the same for
the base and the aligned pipeline, for any batch size and on any device. That is what makes a per-image
comparison (win rate: same prompt, same seed) meaningful.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

GENERATING = "generating images"  # the progress bar's name when the caller names no phase


@contextlib.contextmanager
def quiet_pipeline(pipe: Any) -> Iterator[None]:
    """Hide the pipeline's own per-call progress bar (one bar per phase instead), restoring its setting after."""
    if not hasattr(pipe, "set_progress_bar_config"):
        yield
        return
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**previous, "disable": True})
    try:
        yield
    finally:
        pipe.set_progress_bar_config(**previous)


def generate_jobs(
    pipe: Any, jobs: Sequence[tuple[str, int]], batch_size: int = 8, desc: str = GENERATING, **call_kwargs: Any
) -> list[Image.Image]:
    """One image per ``(prompt, seed)`` job, generated in batches; each image is the same as generated alone.

    A progress bar named ``desc`` counts the images (the pipeline's own per-call bar is hidden meanwhile).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    images: list[Image.Image] = []
    with quiet_pipeline(pipe), tqdm(total=len(jobs), desc=desc, unit="image") as progress:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
            prompts = [prompt for prompt, _ in chunk]
            images.extend(pipe(prompt=prompts, generator=generators, output_type="pil", **call_kwargs).images)
            progress.update(len(chunk))
    return images


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 8,
    desc: str = GENERATING,
    **call_kwargs: Any,
) -> list[list[Image.Image]]:
    """``images[i][j]``: prompt ``i`` generated from seed ``j``; ``call_kwargs`` go to the pipeline call and
    ``desc`` names the progress bar.

    Typical ``call_kwargs``: ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``.
    """
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    images = generate_jobs(pipe, jobs, batch_size, desc, **call_kwargs)
    return [images[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(prompts))]


class PipelineSampler:
    """A diffusers pipeline as a ``sampler(prompt, seed) -> image``, the interface dataset builders take."""

    def __init__(self, pipe: Any, name: str = "base", batch_size: int = 32, **call_kwargs: Any) -> None:
        self.pipe, self.name, self.batch_size, self.call_kwargs = pipe, name, batch_size, call_kwargs

    def __call__(self, prompt: str, seed: int) -> Image.Image:
        """The image :func:`generate` makes for ``(prompt, seed)``."""
        return self.sample_many([(prompt, seed)])[0]

    def sample_many(self, jobs: Sequence[tuple[str, int]], desc: str = GENERATING) -> list[Image.Image]:
        """The images of many ``(prompt, seed)`` jobs at once, batched, under a progress bar named ``desc`` (the
        dataset builders use this)."""
        return generate_jobs(self.pipe, jobs, self.batch_size, desc, **self.call_kwargs)
