"""LoRA adapters on the denoiser, and the reference model they make free.

With LoRA the reference is the same network with its adapters disabled: no second copy of the
weights. Full fine-tuning keeps one frozen copy, the only case that needs it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_FILE = "adapter_model.safetensors"


def lora_config_from_args(rank: int, alpha: int, dropout: float, target_modules: list[str]) -> LoraConfig:
    """The LoRA config the diffusers training scripts use (gaussian init: the adapter starts at zero)."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
    )


def prepare_denoiser(
    denoiser: nn.Module,
    peft_config: LoraConfig | None,
    weight_dtype: torch.dtype,
    gradient_checkpointing: bool,
) -> nn.Module | None:
    """Make the denoiser trainable as asked; returns the frozen reference copy (full fine-tuning) or None.

    With LoRA the base weights are frozen and cast to `weight_dtype`, the adapters stay in fp32.
    """
    reference = None
    if peft_config is not None:
        denoiser.requires_grad_(False)
        denoiser.to(dtype=weight_dtype)
        denoiser.add_adapter(peft_config)
        cast_training_params(denoiser, dtype=torch.float32)
    else:
        reference = copy.deepcopy(denoiser).requires_grad_(False).to(dtype=weight_dtype).eval()
        denoiser.requires_grad_(True)
        denoiser.to(dtype=torch.float32)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return reference


@contextlib.contextmanager
def adapters_disabled(denoiser: nn.Module) -> Iterator[nn.Module]:
    """The LoRA denoiser as its base model, for reference forwards; adapters come back on exit."""
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


def lora_layers_for_diffusers(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights keyed as `pipe.save_lora_weights` expects them."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))


def save_adapter_state(denoiser: nn.Module, path: str) -> None:
    """Write the peft adapter weights (fp32) to a safetensors file, for checkpoints."""
    state = {
        key: value.detach().float().contiguous().cpu() for key, value in get_peft_model_state_dict(denoiser).items()
    }
    save_file(state, path)


def load_adapter_state(denoiser: nn.Module, path: str) -> None:
    """Load adapter weights written by `save_adapter_state`; any key mismatch is an error."""
    result = set_peft_model_state_dict(denoiser, load_file(path))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path} holds weights this model's adapters do not have: {unexpected[:5]}")
