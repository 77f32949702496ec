"""Sharded training engines (FSDP2, DeepSpeed ZeRO) under accelerate: the checks that keep a misconfigured run from
hanging or training silently on another engine, and the gathers that turn sharded weights and optimizer state into
the full tensors a checkpoint or a saved model holds.

Every function here that gathers is a collective: all processes call it, in the same order. Under DDP (or one
process) the module's own weights are used, unchanged. See docs/distributed.md for what is verified where.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered onto the main process, on the CPU
ALTERNATIVES = (
    "train LoRA (`use_lora=True`: the reference is the denoiser with its adapters off, nothing is copied), use an "
    "objective without a reference (DiffusionMaPOTrainer, DiffusionSFTTrainer), or train on DDP or ZeRO-2 where "
    "the frozen copy fits on each GPU"
)


def is_fsdp2(accelerator: Accelerator) -> bool:
    """Whether the denoiser is sharded by FSDP2 (`fully_shard`): its parameters are DTensors."""
    return accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage, or None when DeepSpeed is not the engine."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether no process holds the whole denoiser (FSDP, ZeRO-3): main-process-only forwards would hang."""
    return accelerator.distributed_type == DistributedType.FSDP or zero_stage(accelerator) == 3


def check_engine(accelerator: Accelerator, args: Any, *, full_reference: bool, streaming_eval: bool = False) -> None:
    """Refuse what the launched engine cannot do, in words naming the fix, before any model is prepared."""
    _check_engine_started(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError("FSDP version 1 is not supported: set `fsdp_version: 2` (see accelerate_configs/fsdp2.yaml).")
    sharded, stage = shards_parameters(accelerator), zero_stage(accelerator)
    if not sharded and stage is None:
        return
    engine = "DeepSpeed ZeRO" if stage is not None else "FSDP2"
    if full_reference and sharded:
        raise ValueError(
            f"Full fine-tuning with a reference model under {engine}: the frozen reference would be an unsharded copy "
            f"of the whole denoiser on every GPU, which sharding is meant to avoid. Instead {ALTERNATIVES}."
        )
    refused = {
        "train_text_encoder": args.train_text_encoder,  # the text encoders are not sharded nor in DeepSpeed's engine
        "checkpoints under DeepSpeed (set save_strategy='no')": stage is not None and args.save_strategy != "no",
        # with sharded weights every forward is a collective: a process-only forward would wait forever
        "validation_prompts": sharded and bool(args.validation_prompts),
        "hub_strategy='every_save'": sharded and args.push_to_hub and args.hub_strategy == "every_save",
        "a streaming eval set (processes may get different numbers of batches)": sharded and streaming_eval,
    }
    names = [name for name, on in refused.items() if on]
    if names:
        raise ValueError(
            f"{'; '.join(names)}: not supported under {engine} yet. Validation images and background pushes run on "
            "the main process alone; render samples from the saved model afterwards, push at the end, evaluate on "
            "a map-style dataset, or train on DDP (see docs/distributed.md)."
        )


def _check_engine_started(accelerator: Accelerator) -> None:
    """A launch asking for FSDP or DeepSpeed that accelerate set up as something else (it falls back silently, e.g.
    to DDP on CPUs) would train unsharded: stop instead."""
    asked = {
        "FSDP": (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true", DistributedType.FSDP),
        "DeepSpeed": (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true", DistributedType.DEEPSPEED),
    }
    for name, (requested, engine) in asked.items():
        if requested and accelerator.distributed_type != engine:
            raise RuntimeError(
                f"The launch asks for {name}, but accelerate set this process up as {accelerator.distributed_type} "
                f"(accelerate {name} needs GPUs: on CPUs it trains without sharding). Launch on GPUs, or use a DDP "
                "config (examples/accelerate_configs/multi_gpu.yaml, cpu_two_processes.yaml)."
            )


def set_deepspeed_micro_batch(accelerator: Accelerator, micro_batch: int) -> None:
    """Fill DeepSpeed's `train_micro_batch_size_per_gpu: auto` (TRL's configs) with the trainer's batch size:
    accelerate fills it from a data loader, and the trainer prepares none."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch


def plain(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (a sharded model's gradient norm) as a plain tensor; other tensors unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local(param: torch.Tensor) -> torch.Tensor:
    """This process's shard of a parameter (FSDP2's DTensor, ZeRO-3's `ds_tensor`; the parameter when unsharded)."""
    if isinstance(param, DTensor):
        return param.to_local()
    return getattr(param, "ds_tensor", param)


class GatheredView:
    """Stands for a sharded module where peft and diffusers read or write its weights: `state_dict()` is the full
    one (gathered when the view was made), `load_state_dict` scatters full tensors into the shards. Everything
    else (configs, `peft_config`, module names) is read from the module itself."""

    def __init__(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self._module, self._state = module, state

    def state_dict(self, *_: Any, **__: Any) -> dict[str, torch.Tensor]:
        return self._state

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, **_: Any) -> Any:
        options = StateDictOptions(full_state_dict=True, strict=strict)
        return set_model_state_dict(self._module, state, options=options)

    def save_pretrained(self, directory: str, **kwargs: Any) -> None:
        """diffusers' `save_pretrained` of the full weights, its config naming the model's own class (not FSDP's)."""
        sharded_class = self._module.__class__
        self._module.__class__ = _unsharded_class(sharded_class)
        try:
            self._module.__class__.save_pretrained(self, directory, **kwargs)
        finally:
            self._module.__class__ = sharded_class

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def model_class(module: nn.Module) -> type:
    """The module's model class: for one `fully_shard` turned into `FSDP<Class>`, that `<Class>`."""
    return _unsharded_class(type(module))


def _unsharded_class(cls: type) -> type:
    """The model class `fully_shard` derived `FSDP<Class>` from (`cls` itself when not sharded)."""
    if not issubclass(cls, FSDPModule):
        return cls
    return next(base for base in cls.__mro__[1:] if not base.__name__.startswith("FSDP"))


def gathered(accelerator: Accelerator, model: nn.Module, *, gather: bool = True) -> nn.Module:
    """The model (prepared or not) as full weights: the unwrapped module when unsharded, else a `GatheredView` over
    the gathered weights (a collective; the main process gets them) or, without `gather`, over its shards (to load
    into). ZeRO-3 gathers through the DeepSpeed engine (`model` must be the prepared one; 16-bit weights)."""
    module = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3 and gather:
        return GatheredView(module, accelerator.get_state_dict(model))  # type: ignore[return-value]
    if not is_fsdp2(accelerator):
        return module
    state = get_model_state_dict(module, options=FULL) if gather else module.state_dict()
    return GatheredView(module, state)  # type: ignore[return-value]


def optimizer_state(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state (a collective under FSDP2, keyed by parameter name; main process only)."""
    if not is_fsdp2(accelerator):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=FULL)


def load_optimizer_state(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Restore `optimizer_state`'s output; under FSDP2 every process reads the full state and keeps its shards."""
    if not is_fsdp2(accelerator):
        optimizer.load_state_dict(state)
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))


def all_finite(accelerator: Accelerator, params: list[torch.Tensor]) -> list[bool]:
    """Per parameter, whether it is finite on every process (each checks its shards; one reduction when sharded)."""
    finite = torch.stack([local(param).detach().isfinite().all() for param in params])
    if shards_parameters(accelerator):
        finite = accelerator.reduce((~finite).float().to(accelerator.device), reduction="sum") == 0
    return finite.tolist()
