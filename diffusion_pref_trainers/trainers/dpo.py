"""Diffusion-DPO trainer (Wallace et al., 2023): the pairwise objective of `losses.dpo_loss`.

Two switches turn it into related methods: `swap_preferences` trains Diffusion-NPO's negative adapter,
`safeguard` applies Diffusion-SDPO's winner-preserving scale to the losers' gradient (RPO inherits both).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffusion_pref_trainers.configs import DiffusionDPOConfig
from diffusion_pref_trainers.losses import dpo_loss, reward_metrics, safeguarded_errors, with_sft_term
from diffusion_pref_trainers.trainers.base import DiffusionPreferenceTrainer


class DiffusionDPOTrainer(DiffusionPreferenceTrainer):
    """Align a diffusion pipeline on preference pairs with Diffusion-DPO.

    `DiffusionDPOTrainer(pipe_or_id, DiffusionDPOConfig(...), dataset_or_id).train()`.
    """

    config_class = DiffusionDPOConfig
    method = "diffusion-dpo"
    _safeguard_scale: torch.Tensor | None = None

    def family_defaults(self) -> dict[str, Callable[[], Any]]:
        """`beta` too: its useful size depends on the family's errors (docs/model_families.md)."""
        return {**super().family_defaults(), "beta": lambda: self.family.default_beta}

    def swaps_preferences(self) -> bool:
        """Diffusion-NPO's negative adapter trains on swapped pairs."""
        return self.args.swap_preferences

    def adjust_policy_errors(self, model_err: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """With `safeguard`, scale the losers' gradient by SDPO's lambda (computed on this micro-batch)."""
        if not self.args.safeguard:
            return model_err
        model_err, self._safeguard_scale = safeguarded_errors(model_err, pred, self.args.safeguard_mu)
        return model_err

    def safeguard_metrics(self) -> dict[str, torch.Tensor]:
        """`safeguard/lambda` of the last training micro-batch (nothing when the safeguard is off or in eval)."""
        if not (self.args.safeguard and self.denoiser.training and self._safeguard_scale is not None):
            return {}
        return {"safeguard/lambda": self._safeguard_scale}

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
        loss = with_sft_term(loss, model_w, args.sft_weight)
        return loss, {**reward_metrics(model_w, model_l, ref_w, ref_l, beta=args.beta), **self.safeguard_metrics()}
