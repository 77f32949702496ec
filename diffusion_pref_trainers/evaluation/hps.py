"""HPSv2 (Wu et al., 2023) on transformers' ``CLIPModel``, from a safetensors copy of the released open_clip weights.

HPSv2 and HPSv2.1 are open_clip's ViT-H-14 CLIP fine-tuned on human preferences (HPD); the score of a pair is the
cosine of its image and prompt embeddings (no temperature), about 0.2 to 0.3. The released ``xswu/HPSv2``
``HPS_v2_compressed.pt`` and ``HPS_v2.1_compressed.pt`` pickle ``{"state_dict": <open_clip state dict>}``;
:func:`convert_checkpoint` renames that state dict to ``CLIPModel``'s, so neither open_clip (whose torchvision
dependency has no CPU wheel here) nor any pickle is needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusion_pref_trainers.evaluation.scorers import ClipScorer, clip_image_processor, load_state_dict

HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the ViT-H-14 base model: the same CLIP BPE, 77 tokens

# open_clip names -> CLIPModel names, outside the transformer blocks ...
_PARAMETERS = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
}
_NORMS = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
          "ln_final": "text_model.final_layer_norm"}  # fmt: skip
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}  # x @ proj
# ... and inside block i of each tower (the stacked q, k, v ``attn.in_proj_*`` are split into three).
_TOWERS = {"visual.transformer": "vision_model.encoder", "transformer": "text_model.encoder"}
_BLOCK_KEYS = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip


def _rename(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``CLIPModel`` weights of one open_clip weight (``KeyError`` for an unknown key)."""
    if key in _PROJECTIONS:
        return {_PROJECTIONS[key]: value.T}  # open_clip multiplies by ``proj``; nn.Linear by ``weight.T``
    if key in _PARAMETERS:
        return {_PARAMETERS[key]: value}
    block = re.fullmatch(r"(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)\.(\w+)", key)
    if block is None:
        module, _, kind = key.rpartition(".")
        return {f"{_NORMS[module]}.{kind}": value}
    tower, index, module, kind = block.groups()
    prefix = f"{_TOWERS[tower]}.layers.{index}"
    if module == "attn" and kind in ("in_proj_weight", "in_proj_bias"):
        parts = zip("qkv", value.chunk(3), strict=True)
        return {f"{prefix}.self_attn.{name}_proj.{kind.removeprefix('in_proj_')}": part for name, part in parts}
    return {f"{prefix}.{_BLOCK_KEYS[module]}.{kind}": value}


def convert_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released open_clip state dict as a ``CLIPModel`` state dict (``ValueError`` for a key it does not know)."""
    converted = {}
    for key, value in state_dict.items():
        try:
            converted.update(_rename(key, value))
        except KeyError:
            raise ValueError(f"unexpected HPSv2 weight {key}") from None
    return converted


def hps_config() -> Any:
    """open_clip's ViT-H-14 as a ``CLIPConfig``: exact GELU, LayerNorm eps 1e-5, 1024-d embeddings, and the CLIP
    BPE's ``<|endoftext|>`` (49407) as the token whose features are the prompt's (open_clip takes the argmax id)."""
    from transformers import CLIPConfig

    vision = dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
        patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    text = dict(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
    )  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


class HPSv2(ClipScorer):
    """HPSv2 / HPSv2.1: ``cos(image, prompt)`` of the preference-tuned open_clip ViT-H-14, per pair.

    ``checkpoint`` is a ``.safetensors`` copy of the released state dict (local path or
    ``<owner>/<repo>/<filename>.safetensors`` on the Hub) or its ``{name: tensor}`` dict; pickles are refused.
    ``tokenizer`` is the CLIP tokenizer (id, path or object), ``config`` the ``CLIPConfig`` (default: ViT-H-14).
    """

    def __init__(
        self,
        checkpoint: str | dict[str, torch.Tensor],
        tokenizer: str | Any = HPS_TOKENIZER,
        config: Any | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel, CLIPProcessor
        from transformers.initialization import no_init_weights

        config = hps_config() if config is None else config
        weights = load_state_dict(checkpoint, "['state_dict']") if isinstance(checkpoint, str) else checkpoint
        with no_init_weights():  # every weight is loaded next: skip initialising ~1B parameters
            model = CLIPModel(config)
        model.load_state_dict(convert_checkpoint(weights))  # strict: a weight the mapping missed is an error
        if isinstance(tokenizer, str):
            length = config.text_config.max_position_embeddings
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, model_max_length=length)
        image_processor = clip_image_processor(config.vision_config.image_size)
        processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
        super().__init__(model, processor, device=device or "cpu", dtype=dtype)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """One score per (image, prompt) pair (prompts truncated to the tokenizer's 77 tokens)."""
        return self.cosines(images, prompts).numpy().astype(np.float64)
