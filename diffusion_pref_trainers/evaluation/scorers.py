"""Learned scorers for real models: CLIP zero-shot style, CLIP score, PickScore, LAION aesthetic.

All are loaded by Hub id or local path with ``CLIPModel.from_pretrained(..., use_safetensors=True)`` (no
pickled weights, no remote code), or built from an already loaded ``CLIPModel`` and ``CLIPProcessor``.
Each is a plain callable on PIL images, so it plugs into the metrics of :mod:`.metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"


def _features(output: Any) -> torch.Tensor:
    """CLIP feature getters return a tensor in transformers 4 and a pooled output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_image_processor(size: int) -> Any:
    """CLIP preprocessing at ``size`` px (bicubic resize of the short side, centre crop, CLIP mean/std), with PIL as
    torchvision's transforms use on PIL images (the released ImageReward and HPSv2 preprocessing)."""
    try:  # transformers 5 names its PIL backend; CLIPImageProcessor may pick torchvision there
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


class ClipScorer:
    """A CLIP model and its processor, with L2-normalised image and text embeddings (no gradient)."""

    def __init__(
        self,
        model: str | Any = DEFAULT_CLIP,
        processor: str | Any | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        if isinstance(model, str):
            processor = model if processor is None else processor
            model = CLIPModel.from_pretrained(model, use_safetensors=True)
        if processor is None:
            raise ValueError("pass the CLIPProcessor that goes with a preloaded CLIPModel")
        if isinstance(processor, str):
            processor = CLIPProcessor.from_pretrained(processor)
        self.model = model.to(device or model.device, dtype).eval().requires_grad_(False)
        self.processor = processor

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm projected image embeddings ``[N, D]`` (float32, on the CPU)."""
        pixels = self.processor.image_processor([image.convert("RGB") for image in images], return_tensors="pt")
        pixels = pixels.pixel_values.to(self.model.device, self.model.dtype)
        return torch.nn.functional.normalize(
            _features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1
        ).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings ``[N, D]`` (texts truncated to the tokenizer's maximum length)."""
        tokens = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = tokens.to(self.model.device)
        return torch.nn.functional.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1).cpu()

    def cosines(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """``cos(image_i, prompt_i)`` for each pair ``[N]``: what CLIP score, PickScore and HPSv2 scale."""
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature, ``exp(logit_scale)``."""
        return float(self.model.logit_scale.exp())


class ClipZeroShotStyleScorer(ClipScorer):
    """``P(style) = softmax(logit_scale * [cos(img, style_text), cos(img, neutral_text)])[0]`` per image."""

    def __init__(self, style_text: str, neutral_text: str, model: str | Any = DEFAULT_CLIP, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.texts = self.embed_texts([style_text, neutral_text])

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Style probabilities in [0, 1], one per image."""
        logits = self.logit_scale * self.embed_images(images) @ self.texts.T
        return logits.softmax(dim=-1)[:, 0].numpy().astype(np.float64)


class ClipScore(ClipScorer):
    """CLIP score (Hessel et al., 2021): ``weight * max(cos(image, prompt), 0)``; weight 100 as torchmetrics uses."""

    def __init__(self, model: str | Any = DEFAULT_CLIP, weight: float = 100.0, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.weight = weight

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One score per (image, prompt) pair."""
        return (self.weight * self.cosines(images, prompts).clamp(min=0)).numpy().astype(np.float64)


class PickScore(ClipScorer):
    """PickScore (Kirstain et al., 2023): ``exp(logit_scale) * cos(image, prompt)`` of the fine-tuned CLIP-H."""

    def __init__(self, model: str | Any = PICKSCORE, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One score per (image, prompt) pair."""
        return (self.logit_scale * self.cosines(images, prompts)).numpy().astype(np.float64)


def aesthetic_head(state_dict: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """The LAION improved-aesthetic-predictor MLP (linear layers with dropout, no activations), sized from its weights.

    Keys as in the released ``sac+logos+ava1-l14-linearMSE.pth``: ``layers.{0,2,4,6,7}.{weight,bias}``.
    """
    dropouts = {1: 0.2, 3: 0.2, 5: 0.1}
    layers: list[torch.nn.Module] = []
    for index in range(8):
        if index in dropouts:
            layers.append(torch.nn.Dropout(dropouts[index]))
        else:
            weight = state_dict[f"layers.{index}.weight"]
            layers.append(torch.nn.Linear(weight.shape[1], weight.shape[0]))
    head = torch.nn.Sequential(*layers)
    head.load_state_dict({key.removeprefix("layers."): value for key, value in state_dict.items()})
    return head.eval().requires_grad_(False)


def load_state_dict(path: str, pickled_entry: str = "") -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file: a local path or ``<owner>/<repo>/<filename>`` on the Hub.

    Pickled checkpoints (``.pth``, ``.pt``, ``.bin``) are refused, local or downloaded: unpickling can run code. The
    released LAION head, ImageReward and HPSv2 are pickles: the error says how to convert the file once, from a copy
    you trust; ``pickled_entry`` (e.g. ``"['state_dict']"``) is where the pickled object keeps its weights.
    """
    if not path.endswith(".safetensors"):
        name = os.path.basename(path)
        raise ValueError(
            f"{path} is not a .safetensors file: weights are read as safetensors only (pickled files can run code). "
            'Convert it once with: python -c "import torch; from safetensors.torch import save_file; '
            f"save_file(torch.load('{name}', weights_only=True){pickled_entry}, "
            f"'{os.path.splitext(name)[0]}.safetensors')\""
        )
    if not os.path.exists(path):
        from huggingface_hub import hf_hub_download

        owner, repo, filename = path.split("/", 2)
        path = hf_hub_download(f"{owner}/{repo}", filename)
    from safetensors.torch import load_file

    return load_file(path)


class LaionAesthetic(ClipScorer):
    """LAION aesthetic predictor v2: an MLP on the unit-norm CLIP ViT-L/14 image embedding (prompts ignored)."""

    def __init__(self, head: str | dict[str, torch.Tensor], model: str | Any = DEFAULT_CLIP, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.head = aesthetic_head(load_state_dict(head) if isinstance(head, str) else head).float()

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> np.ndarray:
        """One aesthetic score per image (about 1 to 10 with the released head)."""
        return self.head(self.embed_images(images))[:, 0].numpy().astype(np.float64)
