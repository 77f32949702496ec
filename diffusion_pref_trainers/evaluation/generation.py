"""Seeded generation: every image is a function of (pipeline, prompt, seed), whatever the batch or device.

Each image gets its own CPU ``torch.Generator`` seeded with its seed, so the starting noise is the same for
the base and the aligned pipeline, for any batch size and on any device. That is what makes a per-image
comparison (win rate: same prompt, same seed) meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image


def generate_jobs(
    pipe: Any, jobs: Sequence[tuple[str, int]], batch_size: int = 8, **call_kwargs: Any
) -> list[Image.Image]:
    """One image per ``(prompt, seed)`` job, generated in batches; each image is the same as generated alone."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    images: list[Image.Image] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
        output = pipe(prompt=[prompt for prompt, _ in chunk], generator=generators, output_type="pil", **call_kwargs)
        images.extend(output.images)
    return images


def generate(
    pipe: Any, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 8, **call_kwargs: Any
) -> list[list[Image.Image]]:
    """``images[i][j]``: prompt ``i`` generated from seed ``j``; ``call_kwargs`` go to the pipeline call.

    Typical ``call_kwargs``: ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``.
    """
    images = generate_jobs(pipe, [(prompt, seed) for prompt in prompts for seed in seeds], batch_size, **call_kwargs)
    return [images[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(prompts))]


class PipelineSampler:
    """A diffusers pipeline as a ``sampler(prompt, seed) -> image``, the interface dataset builders take."""

    def __init__(self, pipe: Any, name: str = "base", batch_size: int = 32, **call_kwargs: Any) -> None:
        self.pipe, self.name, self.batch_size, self.call_kwargs = pipe, name, batch_size, call_kwargs

    def __call__(self, prompt: str, seed: int) -> Image.Image:
        """The image :func:`generate` makes for ``(prompt, seed)``."""
        return self.sample_many([(prompt, seed)])[0]

    def sample_many(self, jobs: Sequence[tuple[str, int]]) -> list[Image.Image]:
        """The images of many ``(prompt, seed)`` jobs at once, batched (the dataset builders use this)."""
        return generate_jobs(self.pipe, jobs, self.batch_size, **self.call_kwargs)
