"""Encoders a cached run does not need while it trains, kept on the CPU meanwhile (`offload_cached_encoders`).

With `cache_latents` the training and evaluation steps read latents (and, unless text encoders are trained, prompt
conditioning) from the cache, so the VAE and the frozen text encoders sit idle in accelerator memory (diffusers'
`train_text_to_image_sdxl.py` deletes them after precomputing). The trainer moves them to the CPU when training
starts and back to the device when it ends, before the validation samples are rendered, so that `trainer.pipe`
generates as before; building a new cache meanwhile (`evaluate(new_dataset)` from a callback) brings them back
for the while. A run stopped by an exception gives them back too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from diffusion_pref_trainers.configs import DiffusionTrainingConfig
from diffusion_pref_trainers.families.base import ModelFamily

CPU = torch.device("cpu")


def modules_to_offload(
    family: ModelFamily, args: DiffusionTrainingConfig, trained_text_encoders: bool
) -> list[nn.Module]:
    """The encoders no training step calls: the VAE when latents are cached, the text encoders when prompts are too.

    Trained text encoders run every step (their prompts are not cached): then only the VAE is idle.
    """
    if not (args.cache_latents and args.offload_cached_encoders):
        return []
    return [family.pipe.vae, *([] if trained_text_encoders else family.text_encoders())]


def move(modules: Sequence[nn.Module], device: torch.device) -> None:
    """Move the modules' parameters and buffers to `device`, keeping their dtype."""
    for module in modules:
        module.to(device)


class EncoderOffload:
    """Idle encoders moved between their `device` and `offload_device` (the CPU); the moves are no-ops on a CPU."""

    def __init__(self, modules: Sequence[nn.Module], device: torch.device, offload_device: torch.device = CPU) -> None:
        self.modules, self.device, self.offload_device = list(modules), device, offload_device
        self.offloaded = False

    def offload(self) -> None:
        """Free the device of the encoders' weights (training starts)."""
        move(self.modules, self.offload_device)
        self.offloaded = bool(self.modules)

    def restore(self) -> None:
        """The encoders back on the device, where the pipeline renders with them (training ends)."""
        move(self.modules, self.device)
        self.offloaded = False

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The encoders on the device for the block (a cache being built), offloaded again after if they were."""
        if not self.offloaded:
            yield
            return
        self.restore()
        try:
            yield
        finally:
            self.offload()
