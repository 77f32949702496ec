"""Opt-in speed switches applied to the prepared denoiser: the attention kernel, channels-last memory format and
`torch.compile`.

All leave the module's parameters, state-dict keys, adapters and checkpoints as they are: the attention switch
replaces processors (which hold no weights), channels-last re-lays out the 4-D weights in place, and
`Module.compile` compiles the module's own call. They run after LoRA is attached, so the compiled forward
includes the adapters.
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
    """Apply `attention_backend`, `channels_last` and `torch_compile` from `args` to each given denoiser (None entries
    are skipped)."""
    denoisers = tuple(denoiser for denoiser in denoisers if denoiser is not None)
    backend = args.torch_compile_backend or "inductor"
    on_cpu = any(next(denoiser.parameters()).device.type == "cpu" for denoiser in denoisers)
    if args.torch_compile and backend == "inductor" and on_cpu:
        logger.warning(CPU_INDUCTOR_WARNING)
    for denoiser in denoisers:
        set_attention(denoiser, args.attention_backend)
        if args.channels_last:
            if not any(isinstance(module, nn.Conv2d) for module in denoiser.modules()):
                logger.info("`channels_last` has no effect on %s: it has no 2-D convolutions.", type(denoiser).__name__)
            denoiser.to(memory_format=torch.channels_last)
        if args.torch_compile:
            denoiser.compile(mode=args.torch_compile_mode, backend=backend)


def set_attention(denoiser: nn.Module, backend: str) -> None:
    """'sdpa' keeps diffusers' processors; 'eager' gives a UNet unfused matmul + softmax attention; any other name is
    a backend of diffusers' attention dispatcher, refused for denoisers whose attention does not dispatch."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import AttnProcessor

    name = type(denoiser).__name__
    if backend == "sdpa":
        return
    if backend == "eager":
        if not isinstance(denoiser, UNet2DConditionModel):
            raise ValueError(
                f"attention_backend='eager' swaps in diffusers' `AttnProcessor`, made for UNets (SD, SDXL), not "
                f"{name}: use 'sdpa', or a dispatcher backend such as '_native_math' where the denoiser dispatches."
            )
        denoiser.set_attn_processor(AttnProcessor())
        return
    if not any(isinstance(module, AttentionModuleMixin) for module in denoiser.modules()):
        raise ValueError(
            f"attention_backend={backend!r} is a backend of diffusers' attention dispatcher, and {name}'s attention "
            "calls PyTorch's SDPA directly, so it would be ignored: use 'sdpa' (or 'eager' for a UNet)."
        )
    denoiser.set_attention_backend(backend)
