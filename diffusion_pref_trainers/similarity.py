"""CLIP embeddings and the Diffusion-RPO similarity matrix.

`similarity_matrix` is pure: it takes L2-normalisable embeddings of each row's prompt and of its winner
and loser images, and returns `sim[i, j]`, the relatedness of winner i (prompt c_i, image x_i^w) and
loser j (prompt c_j, image x_j^l), in [-1, 1]. The embedders compute those vectors without gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffusion_pref_trainers.configs import SIMILARITY_MODES
from diffusion_pref_trainers.hub import hub_is_offline, is_hub_id

_TEXT_FALLBACK = (
    "point it at a local CLIP folder (one `CLIPModel.save_pretrained` wrote), or use similarity='text' with "
    "similarity_model_name_or_path=None (the pipeline's own text encoder)"
)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`[M, D] x [M, D] -> [M, M]` cosine similarities (rows of `a` against rows of `b`)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def similarity_matrix(
    mode: str,
    text: torch.Tensor | None = None,
    chosen_images: torch.Tensor | None = None,
    rejected_images: torch.Tensor | None = None,
) -> torch.Tensor:
    """The RPO similarity of winner i and loser j for `mode` 'text', 'image' or 'multimodal'.

    'text': cos(text_i, text_j) (loser j carries prompt c_j); 'image': cos(winner image i, loser image j);
    'multimodal': the mean of the two, so each modality counts equally whatever the embedding width.
    """
    if mode not in SIMILARITY_MODES:
        raise ValueError(f"similarity={mode!r} is not supported; choose one of {', '.join(SIMILARITY_MODES)}.")
    parts = []
    if mode in ("text", "multimodal"):
        if text is None:
            raise ValueError(f"similarity={mode!r} needs text embeddings.")
        parts.append(cosine_matrix(text, text))
    if mode in ("image", "multimodal"):
        if chosen_images is None or rejected_images is None:
            raise ValueError(f"similarity={mode!r} needs winner and loser image embeddings.")
        parts.append(cosine_matrix(chosen_images, rejected_images))
    return torch.stack(parts).mean(0)


def _features(output: Any) -> torch.Tensor:
    """CLIP feature getters return a tensor in transformers 4 and a pooled output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def check_clip_source(name: str) -> None:
    """Fail in words, before anything loads, when `similarity_model_name_or_path` cannot give a CLIP model: a path
    that does not exist and is no Hub id, or, with HF_HUB_OFFLINE set, a Hub id whose files are not cached."""
    from huggingface_hub import try_to_load_from_cache

    field = f"`similarity_model_name_or_path={name!r}`"
    if Path(name).expanduser().exists():
        return
    if not is_hub_id(name):
        raise FileNotFoundError(f"{field} is neither an existing folder nor a Hub id (`owner/name`): {_TEXT_FALLBACK}.")
    if hub_is_offline() and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise FileNotFoundError(
            f"{field} is not in the local Hub cache and HF_HUB_OFFLINE is set: download it once online "
            f"(`hf download {name}`), or {_TEXT_FALLBACK}."
        )


class ClipEmbedder:
    """A full CLIP model (text and image towers) loaded by id or path, used without gradient."""

    def __init__(self, name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(name_or_path, use_safetensors=True).to(device, dtype).eval()
        self.model.requires_grad_(False)
        processor = CLIPProcessor.from_pretrained(name_or_path)
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        crop = image_processor.crop_size
        self.image_size = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop.height, crop.width)
        self.mean = torch.tensor(image_processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        """Projected text embeddings `[M, D]` (prompts truncated to CLIP's 77 tokens)."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        return _features(self.model.get_text_features(**tokens)).float()

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings `[N, D]` of training pixels in [-1, 1], preprocessed on the device.

        Resizing the already-cropped square training image stands in for CLIP's resize + centre crop.
        """
        images = (pixels.to(self.model.device, torch.float32) + 1) / 2
        images = F.interpolate(images, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        images = ((images.clamp(0, 1) - self.mean) / self.std).to(self.model.dtype)
        return _features(self.model.get_image_features(pixel_values=images)).float()


class PipelineTextEmbedder:
    """Text-only similarity from the pipeline's own CLIP text encoder (no extra model to download)."""

    def __init__(self, tokenizer: Any, text_encoder: Any) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> torch.Tensor:
        """The encoder's pooled output (the end-of-text token's state, projected if the encoder has one)."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)  # fmt: skip
        output = self.text_encoder(ids)
        pooled = getattr(output, "text_embeds", None)
        return (pooled if pooled is not None else output.pooler_output).float()
