"""Casting models to a dtype without diffusers' spurious float32-modules warning."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def needs_cast(module: nn.Module, dtype: torch.dtype) -> bool:
    """Whether any floating-point parameter or buffer of `module` is not already `dtype`."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return any(tensor.is_floating_point() and tensor.dtype != dtype for tensor in tensors)


def cast_model(module: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Module:
    """`module.to(device, dtype=dtype)` in place, returning `module`.

    diffusers' `ModelMixin.to` warns "There are modules ... that should be kept in float32: []" on any dtype
    argument, even a no-op one and even when no module must stay in float32. So the dtype is passed only when a
    cast is needed, and through `nn.Module.to` when the model keeps no module in float32 and is not quantized
    (diffusers' own checks then have nothing to say); otherwise diffusers' `to` decides, warning included.
    """
    if device is not None:
        module.to(device)
    if not needs_cast(module, dtype):
        return module
    if getattr(module, "_keep_in_fp32_modules", None) or getattr(module, "is_quantized", False):
        return module.to(dtype=dtype)
    return nn.Module.to(module, dtype=dtype)
