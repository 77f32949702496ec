"""Diffusion-DPO trainer (Wallace et al., 2023): the pairwise objective of `losses.dpo_loss`."""

from __future__ import annotations

from typing import Any

import torch

from diffusion_pref_trainers.configs import DiffusionDPOConfig
from diffusion_pref_trainers.losses import dpo_loss, reward_metrics
from diffusion_pref_trainers.trainers.base import DiffusionPreferenceTrainer


class DiffusionDPOTrainer(DiffusionPreferenceTrainer):
    """Align a diffusion pipeline on preference pairs with Diffusion-DPO.

    `DiffusionDPOTrainer(pipe_or_id, DiffusionDPOConfig(...), dataset_or_id).train()`.
    """

    config_class = DiffusionDPOConfig
    method = "diffusion-dpo"

    def compute_loss(
        self, model_err: torch.Tensor, ref_err: torch.Tensor | None, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model_w, model_l = model_err.chunk(2)
        ref_w, ref_l = ref_err.chunk(2)
        args = self.args
        loss = dpo_loss(
            model_w, model_l, ref_w, ref_l, beta=args.beta, loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
        )  # fmt: skip
        if args.sft_weight:
            loss = loss + args.sft_weight * model_w.mean()
        return loss, reward_metrics(model_w, model_l, ref_w, ref_l)
