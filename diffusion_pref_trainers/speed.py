"""Opt-in speed switches applied to the prepared denoiser: channels-last memory format and `torch.compile`.

Both leave the module object (and so its parameters, state-dict keys, adapters and checkpoints) as it is:
channels-last re-lays out the 4-D weights in place, and `Module.compile` compiles the module's own call.
They run after LoRA is attached, so the compiled forward includes the adapters.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from diffusion_pref_trainers.configs import DiffusionTrainingConfig

logger = logging.getLogger(__name__)
CPU_INDUCTOR_WARNING = (
    "torch.compile with the inductor backend on CPU: with torch 2.13 (CPU build) it gave wrong gradients for the tiny "
    "SD UNet, with or without LoRA, while the eager and 'aot_eager' runs agreed (tests/test_speed.py). Compare a few "
    "steps against `torch_compile=False` before trusting it, or use torch_compile_backend='aot_eager'."
)


def apply_fast_path(args: DiffusionTrainingConfig, *denoisers: nn.Module | None) -> None:
    """Apply `channels_last` and `torch_compile` from `args` to each given denoiser (None entries are skipped)."""
    denoisers = tuple(denoiser for denoiser in denoisers if denoiser is not None)
    backend = args.torch_compile_backend or "inductor"
    on_cpu = any(next(denoiser.parameters()).device.type == "cpu" for denoiser in denoisers)
    if args.torch_compile and backend == "inductor" and on_cpu:
        logger.warning(CPU_INDUCTOR_WARNING)
    for denoiser in denoisers:
        if args.channels_last:
            if not any(isinstance(module, nn.Conv2d) for module in denoiser.modules()):
                logger.info("`channels_last` has no effect on %s: it has no 2-D convolutions.", type(denoiser).__name__)
            denoiser.to(memory_format=torch.channels_last)
        if args.torch_compile:
            denoiser.compile(mode=args.torch_compile_mode, backend=backend)
