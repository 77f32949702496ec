"""LoRA adapters on the denoiser, and the reference model they make free.

With LoRA the reference is the same network with its adapters disabled: no second copy of the
weights. Full fine-tuning keeps one frozen copy, the only case that needs it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_pref_trainers.dtypes import cast_model

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
# LoRA settings recorded in a saved adapter's metadata, by the config field that must match them.
MATCHED_SETTINGS = {"r": "lora_rank", "lora_alpha": "lora_alpha"}


def lora_config_from_args(rank: int, alpha: int, dropout: float, target_modules: list[str]) -> LoraConfig:
    """The LoRA config the diffusers training scripts use (gaussian init: the adapter starts at zero)."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
    )


# peft initialisations that leave the base weights as they are (any other one rewrites them: PiSSA, OLoRA, ...).
BASE_PRESERVING_INITS = (True, False, "gaussian")


def check_base_preserving_init(config: LoraConfig) -> None:
    """Refuse a peft `init_lora_weights` that modifies the base weights (PiSSA, OLoRA, CorDA, EVA, LoftQ, ...).

    The reference is the base model with its adapters disabled, and the saved adapter is loaded onto the
    original base weights: both would be wrong if adding the adapter rewrote the base weights.
    """
    value = config.init_lora_weights
    if not any(value is allowed or value == allowed for allowed in BASE_PRESERVING_INITS):
        raise ValueError(
            f"peft_config.init_lora_weights={value!r} modifies the base weights when the adapter is added, but the "
            "reference model is the base model with its adapters disabled and the saved adapter is applied to the "
            "original base weights: both would be wrong. Use init_lora_weights=True, False or 'gaussian'."
        )


def text_encoder_lora_config(denoiser_config: LoraConfig, target_modules: list[str]) -> LoraConfig:
    """The text encoders' LoRA: the denoiser's rank, alpha, dropout and init, on the encoders' own modules."""
    return LoraConfig(
        r=denoiser_config.r,
        lora_alpha=denoiser_config.lora_alpha,
        lora_dropout=denoiser_config.lora_dropout,
        init_lora_weights=denoiser_config.init_lora_weights,
        target_modules=target_modules,
    )


def prepare_denoiser(
    denoiser: nn.Module,
    peft_config: LoraConfig | None,
    weight_dtype: torch.dtype,
    gradient_checkpointing: bool,
    keep_reference: bool = True,
) -> nn.Module | None:
    """Make the denoiser trainable as asked; returns the frozen reference copy (full fine-tuning) or None.

    With LoRA the base weights are frozen and cast to `weight_dtype`, the adapters stay in fp32.
    Objectives without a reference (MaPO, SFT) pass `keep_reference=False`: no copy is made.
    """
    reference = None
    if peft_config is not None:
        check_base_preserving_init(peft_config)
        denoiser.requires_grad_(False)
        cast_model(denoiser, weight_dtype)
        denoiser.add_adapter(peft_config)
        cast_training_params(denoiser, dtype=torch.float32)
    else:
        if keep_reference:
            reference = cast_model(copy.deepcopy(denoiser).requires_grad_(False), weight_dtype).eval()
        denoiser.requires_grad_(True)
        cast_model(denoiser, torch.float32)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return reference


@contextlib.contextmanager
def adapters_disabled(denoiser: nn.Module, *others: nn.Module) -> Iterator[nn.Module]:
    """The LoRA denoiser (and any `others`, e.g. adapted text encoders) as base models; adapters come back on exit."""
    modules = (denoiser, *others)
    for module in modules:
        module.disable_adapters()
    try:
        yield denoiser
    finally:
        for module in modules:
            module.enable_adapters()


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
    """Load adapter weights written by `save_adapter_state`; a missing or an unexpected weight is an error."""
    stored = load_file(path)
    expected = get_peft_model_state_dict(denoiser)
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not hold this model's adapters (missing {missing[:5]}, unexpected {unexpected[:5]}): it "
            "was written for other `lora_target_modules` or `lora_rank`, or is incomplete; resume from a checkpoint "
            "of this run's settings."
        )
    set_peft_model_state_dict(denoiser, stored)


def load_saved_lora(
    path: str | Path,
    modules: dict[str, nn.Module],
    saved_format: Callable[[nn.Module], dict[str, torch.Tensor]],
) -> None:
    """Copy the weights of a saved LoRA file (`save_model`'s `pytorch_lora_weights.safetensors`) into the adapters
    of `modules` (pipeline attribute -> adapted module), e.g. to resume training from a pushed adapter.

    `saved_format(module)` gives a module's adapter weights keyed as the file stores them (the family's
    conversion), in the order of peft's own keys, so keys map back exactly. A component the file lacks keeps its
    fresh adapter; a component the run does not adapt, or a different rank, alpha or set of targets, is an error.
    """
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    extra = sorted({key.split(".", 1)[0] for key in tensors} - set(modules))
    if extra:
        hint = " (set `train_text_encoder=True`)" if any(name.startswith("text_encoder") for name in extra) else ""
        raise ValueError(f"{path} holds LoRA weights for {extra}, which this run does not adapt{hint}.")
    for name, module in modules.items():
        stored = {key[len(name) + 1 :]: value for key, value in tensors.items() if key.startswith(f"{name}.")}
        if not stored:
            logger.info("%s holds no LoRA weights for %s: its adapters start fresh.", path, name)
            continue
        config = module.peft_config["default"]
        for setting, field in MATCHED_SETTINGS.items():
            saved, ours = metadata.get(f"{name}.{setting}"), getattr(config, setting)
            if saved is not None and saved != ours:
                raise ValueError(f"The adapter in {path} has {field}={saved} for {name}; this run has {ours}: set it.")
        expected = saved_format(module)
        missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        if missing or unexpected:
            targets = metadata.get(f"{name}.target_modules")
            raise ValueError(
                f"The adapter in {path} targets other {name} modules than this run (saved targets: {targets}; "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}): set `lora_target_modules` to match."
            )
        wrong = [key for key, value in stored.items() if value.shape != expected[key].shape]
        if wrong:
            raise ValueError(f"The adapter in {path} has other shapes for {name} (e.g. {wrong[0]}): check `lora_rank`.")
        peft_keys = dict(zip(expected, get_peft_model_state_dict(module), strict=True))
        set_peft_model_state_dict(module, {peft_keys[key]: value for key, value in stored.items()})
