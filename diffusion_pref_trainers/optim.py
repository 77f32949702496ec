"""Optimizers and learning-rate schedules named by the config."""

from __future__ import annotations

import importlib.util

import torch
from diffusers.optimization import get_scheduler

from diffusion_pref_trainers.configs import DiffusionTrainingConfig


def build_optimizer(args: DiffusionTrainingConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (torch), 8-bit AdamW (bitsandbytes: optimizer state in 8 bits) or Adafactor."""
    if args.optim == "adamw_8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError("optim='adamw_8bit' needs bitsandbytes: `pip install bitsandbytes`.")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )  # fmt: skip
    if args.optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=args.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
            weight_decay=args.weight_decay,
        )  # fmt: skip
    return torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )  # fmt: skip


def build_scheduler(
    args: DiffusionTrainingConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of `lr_scheduler_type`, stepped once per optimizer step (not per process)."""
    return get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps
    )
