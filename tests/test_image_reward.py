"""ImageReward on a tiny BLIP: a checkpoint in the released key layout, scored against a from-scratch forward pass."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from diffusion_pref_trainers.evaluation import ImageReward
from diffusion_pref_trainers.evaluation.image_reward import IMAGE_REWARD_MEAN, IMAGE_REWARD_STD
from diffusion_pref_trainers.toy import Attributes, render

VISION = dict(width=32, layers=2, heads=4, mlp=48, patch=8, size=32)
TEXT = dict(width=24, layers=2, heads=4, mlp=40, positions=40)
HEAD = [24, 16, 12, 8, 4, 1]  # the text width in, one reward out (layers 0, 2, 4, 6, 7 as released)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "striped", "flat", "on"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={word: index for index, word in enumerate(WORDS)})


def tiny_config():
    from transformers import BlipConfig

    vision = dict(
        hidden_size=VISION["width"], intermediate_size=VISION["mlp"], num_hidden_layers=VISION["layers"],
        num_attention_heads=VISION["heads"], image_size=VISION["size"], patch_size=VISION["patch"], layer_norm_eps=1e-6,
    )  # fmt: skip
    text = dict(
        vocab_size=len(WORDS), hidden_size=TEXT["width"], intermediate_size=TEXT["mlp"],
        num_hidden_layers=TEXT["layers"], num_attention_heads=TEXT["heads"], max_position_embeddings=TEXT["positions"],
        layer_norm_eps=1e-12,
        is_decoder=True, bos_token_id=None, sep_token_id=3, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return BlipConfig(text_config=text, vision_config=vision)


def released_layout_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights named as in ``ImageReward.pt`` (BLIP's timm ViT, BLIP's med.py BERT, ``mlp.layers``)."""
    generator = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    v, t = VISION["width"], TEXT["width"]

    def linear(name: str, fan_out: int, fan_in: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (fan_out, fan_in), (fan_out,)

    def norm(name: str, width: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (width,), (width,)

    tokens = (VISION["size"] // VISION["patch"]) ** 2 + 1
    vit, bert = "blip.visual_encoder", "blip.text_encoder"
    shapes[f"{vit}.cls_token"], shapes[f"{vit}.pos_embed"] = (1, 1, v), (1, tokens, v)
    shapes[f"{vit}.patch_embed.proj.weight"] = (v, 3, VISION["patch"], VISION["patch"])
    shapes[f"{vit}.patch_embed.proj.bias"] = (v,)
    for i in range(VISION["layers"]):
        norm(f"{vit}.blocks.{i}.norm1", v)
        linear(f"{vit}.blocks.{i}.attn.qkv", 3 * v, v)
        linear(f"{vit}.blocks.{i}.attn.proj", v, v)
        norm(f"{vit}.blocks.{i}.norm2", v)
        linear(f"{vit}.blocks.{i}.mlp.fc1", VISION["mlp"], v)
        linear(f"{vit}.blocks.{i}.mlp.fc2", v, VISION["mlp"])
    norm(f"{vit}.norm", v)
    shapes[f"{bert}.embeddings.word_embeddings.weight"] = (len(WORDS), t)
    shapes[f"{bert}.embeddings.position_embeddings.weight"] = (TEXT["positions"], t)
    norm(f"{bert}.embeddings.LayerNorm", t)
    for i in range(TEXT["layers"]):
        for block, keys_width in (("attention", t), ("crossattention", v)):
            linear(f"{bert}.encoder.layer.{i}.{block}.self.query", t, t)
            linear(f"{bert}.encoder.layer.{i}.{block}.self.key", t, keys_width)
            linear(f"{bert}.encoder.layer.{i}.{block}.self.value", t, keys_width)
            linear(f"{bert}.encoder.layer.{i}.{block}.output.dense", t, t)
            norm(f"{bert}.encoder.layer.{i}.{block}.output.LayerNorm", t)
        linear(f"{bert}.encoder.layer.{i}.intermediate.dense", TEXT["mlp"], t)
        linear(f"{bert}.encoder.layer.{i}.output.dense", t, TEXT["mlp"])
        norm(f"{bert}.encoder.layer.{i}.output.LayerNorm", t)
    for index, (fan_in, fan_out) in zip([0, 2, 4, 6, 7], zip(HEAD, HEAD[1:], strict=False), strict=True):
        linear(f"mlp.layers.{index}", fan_out, fan_in)
    linear("blip.vision_proj", 8, v)  # in the release too, unused by the score
    linear("blip.text_proj", 8, t)
    weights = {name: 0.3 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    for name in weights:  # norm scales near 1, so a scale loaded as a bias (or the reverse) changes the scores
        if re.search(r"(norm\d?|LayerNorm)\.weight$", name):
            weights[name] += 1.0
    weights["blip.text_encoder.embeddings.position_ids"] = torch.arange(TEXT["positions"])[None]
    return weights


def attention(query, key, value, heads: int, key_mask=None) -> torch.Tensor:
    """Multi-head scaled dot-product attention, heads split from and merged back into the last dimension."""
    batch, length, width = query.shape
    split = lambda x: x.reshape(batch, x.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    scores = split(query) @ split(key).transpose(-1, -2) / (width // heads) ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    return (scores.softmax(-1) @ split(value)).transpose(1, 2).reshape(batch, length, width)


def reference_rewards(weights, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ImageReward's forward written out from the released layout: BLIP's ViT, then BERT cross-attending to it."""

    def lin(x, name):
        return F.linear(x, weights[f"{name}.weight"], weights[f"{name}.bias"])

    def ln(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], weights[f"{name}.weight"], weights[f"{name}.bias"], eps)

    vit = "blip.visual_encoder"
    x = F.conv2d(
        pixels,
        weights[f"{vit}.patch_embed.proj.weight"],
        weights[f"{vit}.patch_embed.proj.bias"],
        stride=VISION["patch"],
    )
    x = torch.cat([weights[f"{vit}.cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + weights[f"{vit}.pos_embed"]
    for i in range(VISION["layers"]):
        block = f"{vit}.blocks.{i}"
        query, key, value = lin(ln(x, f"{block}.norm1", 1e-6), f"{block}.attn.qkv").chunk(3, dim=-1)
        x = x + lin(attention(query, key, value, VISION["heads"]), f"{block}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{block}.norm2", 1e-6), f"{block}.mlp.fc1")), f"{block}.mlp.fc2")
    image = ln(x, f"{vit}.norm", 1e-6)

    bert = "blip.text_encoder"
    y = weights[f"{bert}.embeddings.word_embeddings.weight"][ids]
    y = y + weights[f"{bert}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    y = ln(y, f"{bert}.embeddings.LayerNorm", 1e-12)

    def bert_attention(y, states, name, key_mask=None):
        heads = attention(lin(y, f"{name}.self.query"), lin(states, f"{name}.self.key"),
                          lin(states, f"{name}.self.value"), TEXT["heads"], key_mask)  # fmt: skip
        return ln(y + lin(heads, f"{name}.output.dense"), f"{name}.output.LayerNorm", 1e-12)

    for i in range(TEXT["layers"]):
        layer = f"{bert}.encoder.layer.{i}"
        y = bert_attention(y, y, f"{layer}.attention", mask)
        y = bert_attention(y, image, f"{layer}.crossattention")  # every image token is attended to
        feed_forward = lin(F.gelu(lin(y, f"{layer}.intermediate.dense")), f"{layer}.output.dense")
        y = ln(y + feed_forward, f"{layer}.output.LayerNorm", 1e-12)
    reward = y[:, 0]
    for index in (0, 2, 4, 6, 7):
        reward = lin(reward, f"mlp.layers.{index}")
    return (reward[:, 0] - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Three 32 px renders: at the model's size, so the processor only normalises them."""
    scenes = [("circle", "red", "striped"), ("square", "blue", "flat"), ("circle", "blue", "flat")]
    return [render(Attributes(shape, colour, "large", "center", "white", style), 32) for shape, colour, style in scenes]


def test_image_reward_matches_blip_written_out_from_the_released_layout(tokenizer, images, tmp_path: Path) -> None:
    weights = released_layout_checkpoint()
    path = tmp_path / "ImageReward.safetensors"
    save_file(weights, path)
    scorer = ImageReward(str(path), tokenizer=tokenizer, config=tiny_config())
    prompts = [
        "a red striped circle",
        "a blue square",
        "a flat blue circle on a red square",
    ]  # three lengths: masks matter

    pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255) for image in images])
    pixels = ((pixels - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).permute(0, 3, 1, 2)
    tokens = tokenizer(prompts, padding="max_length", max_length=35, return_tensors="pt")
    assert tokens.input_ids[0, 0] == tokenizer.cls_token_id and tokens.input_ids.shape[1] == 35
    expected = reference_rewards(weights, pixels, tokens.input_ids, tokens.attention_mask).numpy()

    scores = scorer(images, prompts)
    assert scores.shape == (3,) and np.allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert np.allclose(scorer(images[::-1], prompts[::-1]), expected[::-1], rtol=1e-4, atol=1e-4)
    assert np.ptp(expected) > 1e-2  # the three pairs score differently, so a mix-up would show
    assert np.array_equal(scores, scorer(images, prompts))  # no dropout


@pytest.mark.parametrize("change", ["missing", "unknown"])
def test_image_reward_loads_every_weight_and_no_stray_one(tokenizer, change: str) -> None:
    weights = released_layout_checkpoint()
    if change == "missing":
        del weights["blip.visual_encoder.blocks.1.norm2.bias"]
    else:
        weights["blip.visual_encoder.blocks.1.attn.qkv_extra.weight"] = torch.zeros(1)
    with pytest.raises((RuntimeError, ValueError), match="norm2.bias|qkv_extra"):
        ImageReward(weights, tokenizer=tokenizer, config=tiny_config())


@pytest.mark.parametrize("name", ["ImageReward.pt", "THUDM/ImageReward/ImageReward.pt"], ids=["local", "hub"])
def test_image_reward_refuses_the_pickled_release_and_says_how_to_convert(tmp_path: Path, name: str) -> None:
    path = tmp_path / name if name == "ImageReward.pt" else name
    if name == "ImageReward.pt":
        torch.save({"mlp.layers.0.weight": torch.zeros(1, 1)}, path)
    convert = r"save_file\(torch.load\('ImageReward.pt', weights_only=True\), 'ImageReward.safetensors'\)"
    with pytest.raises(ValueError, match=rf"safetensors only.*{convert}"):
        ImageReward(str(path))
