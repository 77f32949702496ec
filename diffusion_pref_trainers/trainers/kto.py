"""Diffusion-KTO trainer (Li et al., 2024): per-image desirable/undesirable feedback, no pairs needed."""

from __future__ import annotations

from typing import Any

import torch

from diffusion_pref_trainers.configs import DiffusionKTOConfig
from diffusion_pref_trainers.data import drop_ties
from diffusion_pref_trainers.losses import implicit_rewards, kto_loss, kto_metrics, kto_pair_accuracy
from diffusion_pref_trainers.trainers.base import DiffusionPreferenceTrainer


class DiffusionKTOTrainer(DiffusionPreferenceTrainer):
    """Align a diffusion pipeline on images labelled desirable or undesirable.

    Reads unpaired rows (`prompt`, `image`, `label`: one image per row, its own noise and timestep) or
    preference pairs, whose winner counts as desirable and loser as undesirable. A pair stays one row, so its
    two images share noise and timestep: the same per-image objective with a far less noisy gradient.
    """

    config_class = DiffusionKTOConfig
    method = "diffusion-kto"

    def _adapt_schema(self, dataset: Any, schema: str) -> Any:
        if schema == "pickapic" and not self.args.drop_ties:
            return drop_ties(dataset)[0]  # a tie labels neither image (with `drop_ties` the loop drops and counts them)
        if schema in ("pickapic", "preference", "unpaired"):
            return dataset
        raise ValueError(
            f"{type(self).__name__} needs a label per image: columns prompt, image, label (True: desirable), or "
            f"preference pairs; the dataset has the {schema!r} schema. For captioned images without labels, "
            "use DiffusionSFTTrainer."
        )

    def denoising_errors(
        self, batch: dict[str, Any], generator: torch.Generator, *, with_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = batch["latents"] if "latents" in batch else batch["pixel_values"]
        self.images_per_row = images.shape[1]  # 2 for a pair, 1 for a labelled image
        return super().denoising_errors(batch, generator, with_grad=with_grad)

    def reference_point(self, rewards: torch.Tensor) -> torch.Tensor:
        """KTO's `kl`: the implicit reward averaged over the global batch, clamped at 0, detached."""
        local = torch.stack([rewards.detach().sum(), torch.tensor(float(rewards.numel()), device=rewards.device)])
        total, count = self.accelerator.reduce(local, reduction="sum")
        return (total / count).clamp(min=0)

    def compute_loss(
        self, model_err: torch.Tensor, ref_err: torch.Tensor | None, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows = len(batch["prompt"])
        paired = "label" not in batch
        if paired:  # image-major: every winner, then every loser
            desirable = torch.arange(2 * rows, device=model_err.device) < rows
        else:
            desirable = batch["label"].to(model_err.device).bool()
        rewards = implicit_rewards(model_err, ref_err)
        kl = self.reference_point(rewards)
        args = self.args
        loss = kto_loss(
            model_err, ref_err, desirable, beta=args.beta, desirable_weight=args.desirable_weight,
            undesirable_weight=args.undesirable_weight, kl=kl,
        )  # fmt: skip
        metrics = kto_metrics(model_err, ref_err, desirable, kl, beta=args.beta)
        metrics["rewards/accuracies"] = kto_pair_accuracy(model_err, ref_err, paired=paired)
        return loss, metrics
