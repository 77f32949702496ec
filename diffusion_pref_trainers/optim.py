"""Optimizers and learning-rate schedules named by the config, with TrainingArguments' names and meanings."""

from __future__ import annotations

import importlib.util
import inspect
import math
from typing import Any

import torch
from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType, get_scheduler

from diffusion_pref_trainers.configs import DiffusionTrainingConfig, parse_optim_args

# bitsandbytes' optimizer class of each bitsandbytes `optim` name (as transformers maps them).
BNB_CLASSES = {
    "adamw_8bit": "AdamW8bit",
    "adamw_bnb_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}


def optimizer_class_and_kwargs(args: DiffusionTrainingConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class of `optim` and its keyword arguments (the config's, then `optim_args`)."""
    adam = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if args.optim in BNB_CLASSES:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(f"optim={args.optim!r} needs bitsandbytes: `pip install bitsandbytes`.")
        import bitsandbytes as bnb

        cls, kwargs = getattr(bnb.optim, BNB_CLASSES[args.optim]), {**kwargs, **adam}
    elif args.optim == "adafactor":
        from transformers.optimization import Adafactor

        cls, kwargs = Adafactor, {**kwargs, "scale_parameter": False, "relative_step": False, "warmup_init": False}
    elif args.optim == "sgd":
        cls = torch.optim.SGD
    else:
        cls, kwargs = torch.optim.AdamW, {**kwargs, **adam, "fused": args.optim == "adamw_torch_fused"}
    return cls, {**kwargs, **parse_optim_args(args.optim_args)}


def build_optimizer(args: DiffusionTrainingConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of `optim` over `params`; an argument of `optim_args` the class does not take is named."""
    cls, kwargs = optimizer_class_and_kwargs(args)
    try:
        return cls(params, **kwargs)
    except TypeError as error:
        raise TypeError(f"`optim_args={args.optim_args!r}` does not fit {cls.__name__}: {error}") from None


def warmup_steps(args: DiffusionTrainingConfig, total_steps: int) -> int:
    """`warmup_steps` in optimizer steps: a whole number as it is, a value below 1 as a ratio of the total (rounded
    up), as in transformers 5."""
    if args.warmup_steps < 1:
        return math.ceil(args.warmup_steps * total_steps)
    return int(args.warmup_steps)


def check_scheduler_kwargs(args: DiffusionTrainingConfig) -> None:
    """Refuse an `lr_scheduler_kwargs` key the schedule of `lr_scheduler_type` does not take (it would be ignored)."""
    schedule = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(args.lr_scheduler_type)]
    taken = set(inspect.signature(schedule).parameters) - {"optimizer", "num_warmup_steps", "num_training_steps"}
    taken.discard("last_epoch")
    unknown = sorted(set(args.lr_scheduler_kwargs or {}) - taken)
    if unknown:
        raise ValueError(
            f"`lr_scheduler_kwargs` keys {unknown} are not arguments of lr_scheduler_type={args.lr_scheduler_type!r}, "
            f"which takes {sorted(taken) or 'none'}."
        )


def build_scheduler(
    args: DiffusionTrainingConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of `lr_scheduler_type` with `lr_scheduler_kwargs`, stepped once per optimizer step (not per
    process)."""
    check_scheduler_kwargs(args)
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(args, total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
