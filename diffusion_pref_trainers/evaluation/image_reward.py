"""ImageReward (Xu et al., 2023) on transformers' BLIP modules, from a safetensors copy of the released weights.

ImageReward is the authors' BLIP (a ViT-L/16 at 224 px; a BERT-base text encoder whose layers cross-attend to the
image tokens) and an MLP on the text encoder's ``[CLS]`` output, normalised by a fixed mean and standard deviation.
The released ``THUDM/ImageReward`` ``ImageReward.pt`` is a pickled state dict in the authors' layout;
:func:`split_checkpoint` renames it to transformers' ``BlipVisionModel`` and ``BlipTextModel`` (the two towers of
``BlipForImageTextRetrieval``), so no pickle and no code of the authors' package is needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusion_pref_trainers.evaluation.scorers import aesthetic_head, clip_image_processor, load_state_dict

# The released model's reward normalisation (ImageReward.py: ``(reward - mean) / std``).
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35  # the released model tokenises prompts padded and truncated to 35 tokens

# The authors' ViT (timm layout) -> BlipVisionModel, outside the transformer blocks ...
_VISION_KEYS = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
# ... and inside block i: ``blocks.{i}.<authors'>`` -> ``encoder.layers.{i}.<transformers'>``.
_BLOCK_KEYS = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# Checkpoint parts the score does not use: BLIP's contrastive projections and a recomputed position-id buffer.
_UNUSED = re.compile(r"blip\.(vision_proj|text_proj)\..*|blip\.text_encoder\.embeddings\.position_ids")


def _vision_key(key: str) -> str:
    """The ``BlipVisionModel`` name of a key of the authors' ViT (``KeyError`` for an unknown key)."""
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if block:
        index, module, kind = block.groups()
        return f"encoder.layers.{index}.{_BLOCK_KEYS[module]}.{kind}"
    return _VISION_KEYS[key]


def split_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """The released state dict as ``(vision, text, head)`` state dicts for ``BlipVisionModel``, ``BlipTextModel``
    and the MLP head.

    ``blip.visual_encoder.*`` is renamed by ``_VISION_KEYS``/``_BLOCK_KEYS``; ``blip.text_encoder.*`` keeps its names
    (BLIP's ``med.py`` BERT and ``BlipTextModel`` name their modules alike); ``mlp.layers.*`` is the head. Unused parts
    are dropped; any other key is an error, as is (when loading) any missing one.
    """
    vision, text, head = {}, {}, {}
    for key, value in state_dict.items():
        if _UNUSED.fullmatch(key):
            continue
        if key.startswith("blip.visual_encoder."):
            try:
                vision[_vision_key(key.removeprefix("blip.visual_encoder."))] = value
            except KeyError:
                raise ValueError(f"unexpected ImageReward weight {key}") from None
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        else:
            raise ValueError(f"unexpected ImageReward weight {key}")
    return vision, text, head


def image_reward_config() -> Any:
    """The released architecture as a ``BlipConfig``: BLIP's ViT-L/16 at 224 px (LayerNorm eps 1e-6, as timm's ViT)
    and BLIP's ``med_config.json`` BERT-base (vocabulary 30524 with ``[DEC]`` and ``[ENC]``), cross-attending to it."""
    from transformers import BlipConfig

    vision = dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=16, layer_norm_eps=1e-6,
    )  # fmt: skip
    text = dict(
        vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=512, layer_norm_eps=1e-12, is_decoder=True,  # is_decoder builds the cross-attention
    )  # fmt: skip
    return BlipConfig(text_config=text, vision_config=vision)


class ImageReward:
    """ImageReward: ``(mlp(text_encoder(prompt, cross-attending to vit(image))[CLS]) - mean) / std`` per pair.

    ``checkpoint`` is a ``.safetensors`` copy of the released ``ImageReward.pt`` (local path or
    ``<owner>/<repo>/<filename>.safetensors`` on the Hub) or its ``{name: tensor}`` dict; pickles are refused.
    ``tokenizer`` is the BERT tokenizer (id, path or object), ``config`` the ``BlipConfig`` (default: the released one).
    """

    def __init__(
        self,
        checkpoint: str | dict[str, torch.Tensor],
        tokenizer: str | Any = "bert-base-uncased",
        config: Any | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        mean: float = IMAGE_REWARD_MEAN,
        std: float = IMAGE_REWARD_STD,
    ) -> None:
        from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel
        from transformers.initialization import no_init_weights

        config = image_reward_config() if config is None else config
        weights = load_state_dict(checkpoint) if isinstance(checkpoint, str) else checkpoint
        vision, text, head = split_checkpoint(weights)
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        with no_init_weights():  # every weight is loaded next (strictly): skip the random initialisation
            self.vision = BlipVisionModel(config.vision_config)
            self.text = BlipTextModel(config.text_config, add_pooling_layer=False)
        for model, state in ((self.vision, vision), (self.text, text)):
            model.load_state_dict(state)  # strict: a weight the mapping missed is an error
            model.to(self.device, dtype).eval().requires_grad_(False)
        self.head = aesthetic_head(head).to(self.device)  # the same MLP layout as LAION's aesthetic head
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.image_processor = clip_image_processor(config.vision_config.image_size)
        self.mean, self.std = mean, std

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One reward per (image, prompt) pair (about mean 0, standard deviation 1 with the released weights)."""
        pixels = self.image_processor([image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        image_tokens = self.vision(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        ).to(self.device)
        hidden = self.text(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image_tokens
        ).last_hidden_state
        rewards = self.head(hidden[:, 0].float())[:, 0]
        return ((rewards - self.mean) / self.std).cpu().numpy().astype(np.float64)
