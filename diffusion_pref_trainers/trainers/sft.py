"""Supervised fine-tuning baseline: the denoising loss on preferred (or simply captioned) images."""

from __future__ import annotations

from typing import Any

import torch

from diffusion_pref_trainers.configs import DiffusionSFTConfig
from diffusion_pref_trainers.data import PAIRED_SCHEMAS, keep_rows, unpaired_label, winners_only
from diffusion_pref_trainers.losses import sft_loss
from diffusion_pref_trainers.trainers.base import DiffusionPreferenceTrainer


class DiffusionSFTTrainer(DiffusionPreferenceTrainer):
    """Fine-tune on the winners of preference pairs, the desirable rows of unpaired data, or image-caption rows."""

    config_class = DiffusionSFTConfig
    method = "diffusion-sft"
    needs_reference = False
    images_per_row = 1

    def _adapt_schema(self, dataset: Any, schema: str) -> Any:
        if schema in PAIRED_SCHEMAS:
            return winners_only(dataset, schema)
        if schema == "unpaired":
            return keep_rows(dataset, "label", unpaired_label)  # "false" or 0 is not desirable
        return dataset

    def compute_loss(
        self, model_err: torch.Tensor, ref_err: torch.Tensor | None, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return sft_loss(model_err), {}
