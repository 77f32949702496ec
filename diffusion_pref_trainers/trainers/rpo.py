"""Diffusion-RPO trainer (Gu et al., 2024): the library's reference implementation.

Each step contrasts every winner with every loser of the (global) batch: the M x M reward differences
are weighted by a row-softmax of CLIP similarities and fed to `losses.rpo_loss`. Project decisions
(similarity modes, timestep sharing, gathering) are documented in `docs/rpo.md`.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import broadcast
from peft import LoraConfig

from diffusion_pref_trainers.cache import weights_identity
from diffusion_pref_trainers.configs import DiffusionRPOConfig
from diffusion_pref_trainers.losses import reward_metrics, rpo_loss, rpo_process_scale, rpo_weights, with_sft_term
from diffusion_pref_trainers.similarity import (
    ClipEmbedder,
    PipelineTextEmbedder,
    check_clip_source,
    similarity_matrix,
)
from diffusion_pref_trainers.trainers.dpo import DiffusionDPOTrainer


class DiffusionRPOTrainer(DiffusionDPOTrainer):
    """Align a diffusion pipeline with Diffusion-RPO: `DiffusionRPOTrainer(pipe, args, dataset).train()`."""

    config_class = DiffusionRPOConfig
    method = "diffusion-rpo"

    def _setup_model(self, peft_config: LoraConfig | None) -> None:
        """The base setup, then the CLIP embedder (before the precompute cache, which may use it); a CLIP source that
        cannot load fails first."""
        if self.args.similarity_model_name_or_path is not None:
            check_clip_source(self.args.similarity_model_name_or_path)
        super()._setup_model(peft_config)
        self.embedder = self._load_embedder()

    def _validate(self) -> None:
        gathered = self.args.gather_across_processes and self.accelerator.num_processes > 1
        rows = self.args.per_device_train_batch_size * (self.accelerator.num_processes if gathered else 1)
        if rows < 2:
            raise ValueError(
                "RPO contrasts every winner with every loser of a batch, and this run's batch holds one pair "
                "(a 1x1 matrix is plain DPO). Raise `per_device_train_batch_size` to at least 2."
            )

    def _load_embedder(self) -> ClipEmbedder | PipelineTextEmbedder:
        """The CLIP model of `similarity_model_name_or_path`, or the pipeline's text encoder for 'text'."""
        name = self.args.similarity_model_name_or_path
        if name is not None:
            return ClipEmbedder(name, self.accelerator.device, self.weight_dtype)
        encoder = self.family.text_encoders()[0]
        return PipelineTextEmbedder(self.pipe.tokenizer, encoder)

    def sample_timesteps(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """'batch': one timestep for every row of the global batch (process 0's draw); 'pair': one per row."""
        if self.args.timestep_sharing == "pair":
            return super().sample_timesteps(rows, generator)
        timestep = self.family.sample_timesteps(1, generator)
        if self.accelerator.num_processes > 1:
            timestep = broadcast(timestep.to(self.accelerator.device), from_process=0).cpu()
        return timestep.expand(rows).clone()

    def cache_extras(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The CLIP embeddings the similarity mode needs: `clip_text` [M, D] and/or `clip_images` [M, 2, D]."""
        mode, out = self.args.similarity, {}
        if mode in ("text", "multimodal"):
            out["clip_text"] = self.embedder.embed_text(batch["prompt"])
        if mode in ("image", "multimodal"):
            pixels = batch["pixel_values"]
            out["clip_images"] = self.embedder.embed_images(pixels.flatten(0, 1)).unflatten(0, pixels.shape[:2])
        return out

    def cache_extras_identity(self) -> dict[str, Any]:
        """The similarity mode and the CLIP model's weights (the pipeline's text encoder is hashed anyway)."""
        model = getattr(self.embedder, "model", None)
        return {"similarity": self.args.similarity, "clip": weights_identity([model]) if model is not None else None}

    def embeddings(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-row CLIP embeddings the similarity mode needs: cached ones from the batch, else computed."""
        rows = {key: batch[key] for key in ("clip_text", "clip_images") if key in batch} or self.cache_extras(batch)
        out = {}
        if "clip_text" in rows:
            out["text"] = rows["clip_text"]
        if "clip_images" in rows:
            out["chosen_images"], out["rejected_images"] = rows["clip_images"][:, 0], rows["clip_images"][:, 1]
        return {key: value.to(self.accelerator.device) for key, value in out.items()}

    def _gathers(self) -> bool:
        """Whether the matrix spans every process's rows (gathering is on and there is more than one process)."""
        return self.args.gather_across_processes and self.accelerator.num_processes > 1

    def _global(self, local: torch.Tensor) -> torch.Tensor:
        """All processes' rows, in process order, with gradient flowing to this process's own rows."""
        if not self._gathers():
            return local
        gathered = list(self.accelerator.gather(local.detach()).chunk(self.accelerator.num_processes))
        gathered[self.accelerator.process_index] = local
        return torch.cat(gathered)

    def compute_loss(
        self, model_err: torch.Tensor, ref_err: torch.Tensor | None, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model_w, model_l = (self._global(x) for x in model_err.chunk(2))
        ref_w, ref_l = (self._global(x) for x in ref_err.chunk(2))
        embeddings = {key: self._global(value) for key, value in self.embeddings(batch).items()}
        similarity = similarity_matrix(self.args.similarity, **embeddings)
        args = self.args
        loss = rpo_loss(
            model_w, model_l, ref_w, ref_l, similarity, beta=args.beta, temperature=args.distance_temperature,
            loss_type=args.loss_type, label_smoothing=args.label_smoothing,
        )  # fmt: skip
        loss = with_sft_term(loss, model_w, args.sft_weight)
        weights = rpo_weights(similarity, args.distance_temperature)
        metrics = {
            **reward_metrics(model_w, model_l, ref_w, ref_l, beta=args.beta),
            "loss": loss.detach(),
            "rpo/weight_diagonal": weights.diagonal().mean(),
            "rpo/similarity_mean": similarity.mean(),
            **self.safeguard_metrics(),
        }
        return loss * rpo_process_scale(self.accelerator.num_processes, gathered=self._gathers()), metrics
