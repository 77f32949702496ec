"""HPSv2 on a tiny CLIP: a checkpoint in open_clip's key layout, scored against an open_clip-style forward pass."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from diffusion_pref_trainers.evaluation import HPSv2
from diffusion_pref_trainers.evaluation.hps import convert_checkpoint, hps_config
from diffusion_pref_trainers.testing import tiny_clip_tokenizer
from diffusion_pref_trainers.toy import Attributes, render

VISION = dict(width=32, layers=2, heads=4, patch=8, size=32)
TEXT = dict(width=24, layers=2, heads=4, context=24)
EMBED = 16
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tokenizer():
    """The byte-level CLIP tokenizer of the tiny test models, its maximum length the tiny context."""
    return tiny_clip_tokenizer(model_max_length=TEXT["context"])


def tiny_config(vocab_size: int):
    from transformers import CLIPConfig

    vision = dict(
        hidden_size=VISION["width"], intermediate_size=4 * VISION["width"], num_hidden_layers=VISION["layers"],
        num_attention_heads=VISION["heads"], image_size=VISION["size"], patch_size=VISION["patch"], hidden_act="gelu",
        layer_norm_eps=1e-5,
    )  # fmt: skip
    text = dict(
        vocab_size=vocab_size, hidden_size=TEXT["width"], intermediate_size=4 * TEXT["width"],
        num_hidden_layers=TEXT["layers"], num_attention_heads=TEXT["heads"], max_position_embeddings=TEXT["context"],
        hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
    )  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)


def open_clip_shapes(vision: dict, text: dict, embed: int, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The names and shapes of an open_clip CLIP state dict (ViT image tower, causal text tower)."""
    shapes: dict[str, tuple[int, ...]] = {}
    v, t = vision["width"], text["width"]

    def tower(prefix: str, width: int, layers: int) -> None:
        for i in range(layers):
            block = f"{prefix}resblocks.{i}"
            for norm in ("ln_1", "ln_2"):
                shapes[f"{block}.{norm}.weight"], shapes[f"{block}.{norm}.bias"] = (width,), (width,)
            shapes[f"{block}.attn.in_proj_weight"] = (3 * width, width)  # q, k, v stacked
            shapes[f"{block}.attn.in_proj_bias"] = (3 * width,)
            shapes[f"{block}.attn.out_proj.weight"], shapes[f"{block}.attn.out_proj.bias"] = (width, width), (width,)
            shapes[f"{block}.mlp.c_fc.weight"], shapes[f"{block}.mlp.c_fc.bias"] = (4 * width, width), (4 * width,)
            shapes[f"{block}.mlp.c_proj.weight"], shapes[f"{block}.mlp.c_proj.bias"] = (width, 4 * width), (width,)

    shapes["visual.conv1.weight"] = (v, 3, vision["patch"], vision["patch"])
    shapes["visual.class_embedding"] = (v,)
    shapes["visual.positional_embedding"] = ((vision["size"] // vision["patch"]) ** 2 + 1, v)
    for norm in ("visual.ln_pre", "visual.ln_post"):
        shapes[f"{norm}.weight"], shapes[f"{norm}.bias"] = (v,), (v,)
    tower("visual.transformer.", v, vision["layers"])
    shapes["visual.proj"] = (v, embed)
    shapes["token_embedding.weight"] = (vocab_size, t)
    shapes["positional_embedding"] = (text["context"], t)
    tower("transformer.", t, text["layers"])
    shapes["ln_final.weight"], shapes["ln_final.bias"] = (t,), (t,)
    shapes["text_projection"] = (t, embed)
    shapes["logit_scale"] = ()
    return shapes


def released_layout_checkpoint(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the tiny model, named and shaped as open_clip saves them (as in ``HPS_v2_compressed.pt``)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = open_clip_shapes(VISION, TEXT, EMBED, vocab_size)
    weights = {name: 0.3 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    for name in weights:  # norm scales near 1, so a scale loaded as a bias (or the reverse) changes the scores
        if re.search(r"ln_\w+\.weight$", name):
            weights[name] += 1.0
    return weights


def residual_tower(weights, prefix: str, x: torch.Tensor, heads: int, layers: int, mask=None) -> torch.Tensor:
    """open_clip's residual attention blocks, with torch's MultiheadAttention (open_clip's own in_proj layout)."""

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], weights[f"{name}.weight"], weights[f"{name}.bias"], 1e-5)

    def lin(x, name):
        return F.linear(x, weights[f"{name}.weight"], weights[f"{name}.bias"])

    for i in range(layers):
        block = f"{prefix}resblocks.{i}"
        attention = torch.nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
        attention.load_state_dict({name: weights[f"{block}.attn.{name}"] for name in attention.state_dict()})
        h = ln(x, f"{block}.ln_1")
        x = x + attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + lin(F.gelu(lin(ln(x, f"{block}.ln_2"), f"{block}.mlp.c_fc")), f"{block}.mlp.c_proj")
    return x


@torch.no_grad()
def reference_scores(weights, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """HPSv2 as open_clip computes it: unit image and text features, the diagonal of their product."""

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], weights[f"{name}.weight"], weights[f"{name}.bias"], 1e-5)

    x = F.conv2d(pixels, weights["visual.conv1.weight"], stride=VISION["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([weights["visual.class_embedding"].expand(len(x), 1, -1), x], 1)
    x = x + weights["visual.positional_embedding"]
    x = residual_tower(weights, "visual.transformer.", ln(x, "visual.ln_pre"), VISION["heads"], VISION["layers"])
    image = ln(x[:, 0], "visual.ln_post") @ weights["visual.proj"]

    y = weights["token_embedding.weight"][ids] + weights["positional_embedding"]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    y = ln(residual_tower(weights, "transformer.", y, TEXT["heads"], TEXT["layers"], causal), "ln_final")
    text = y[torch.arange(len(ids)), ids.argmax(-1)] @ weights["text_projection"]
    return (F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T).diagonal()


def open_clip_tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    """open_clip's tokenisation: start, BPE tokens, end; cut to the context with the end token kept; zeros after."""
    ids = torch.zeros(len(prompts), TEXT["context"], dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False), tokenizer.eos_token_id]
        tokens = tokens[: TEXT["context"]]
        tokens[-1] = tokenizer.eos_token_id
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


def open_clip_pixels(image: Image.Image) -> torch.Tensor:
    """open_clip's eval transform on a PIL image: bicubic resize of the short side, centre crop, CLIP mean/std."""
    width, height = image.size
    scale = VISION["size"] / min(width, height)
    resized = image.convert("RGB").resize((int(width * scale), int(height * scale)), Image.BICUBIC)
    left, top = (resized.width - VISION["size"]) // 2, (resized.height - VISION["size"]) // 2
    cropped = resized.crop((left, top, left + VISION["size"], top + VISION["size"]))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255)
    return ((pixels - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Two renders at the model's size and one taller render (40 x 48) that must be resized and cropped."""
    scenes = [("circle", "red", "striped"), ("square", "blue", "flat"), ("circle", "blue", "flat")]
    images = [render(Attributes(shape, colour, "large", "left", "white", style), 48) for shape, colour, style in scenes]
    return [images[0].resize((32, 32)), images[1].resize((32, 32)), images[2].resize((40, 48))]


def test_hps_matches_open_clip_written_out_from_the_released_layout(tokenizer, images, tmp_path: Path) -> None:
    weights = released_layout_checkpoint(len(tokenizer))
    path = tmp_path / "HPS_v2_compressed.safetensors"
    save_file(weights, path)
    scorer = HPSv2(str(path), tokenizer=tokenizer, config=tiny_config(len(tokenizer)))
    prompts = ["a red striped circle", "a blue square", "a flat blue circle on a red square, drawn large"]
    assert len(tokenizer.tokenize(prompts[2])) + 2 > TEXT["context"]  # the long prompt is truncated, end token kept

    pixels = torch.stack([open_clip_pixels(image) for image in images])
    expected = reference_scores(weights, pixels, open_clip_tokens(tokenizer, prompts)).numpy()

    scores = scorer(images, prompts)
    assert scores.shape == (3,) and np.allclose(scores, expected, rtol=0, atol=1e-5)
    assert np.allclose(scorer(images[::-1], prompts[::-1]), expected[::-1], rtol=0, atol=1e-5)
    assert np.ptp(expected) > 1e-2  # the three pairs score differently, so a mix-up would show
    assert np.array_equal(scores, scorer(images, prompts))  # no dropout


def test_hps_config_has_the_released_vit_h_14_shapes() -> None:
    from transformers import CLIPModel

    with torch.device("meta"):
        model = CLIPModel(hps_config())
        vision, text = dict(width=1280, layers=32, patch=14, size=224), dict(width=1024, layers=24, context=77)
        released = open_clip_shapes(vision, text, 1024, 49408)
        converted = convert_checkpoint({name: torch.empty(shape) for name, shape in released.items()})
    assert {name: tuple(value.shape) for name, value in converted.items()} == {
        name: tuple(value.shape) for name, value in model.state_dict().items()
    }
    assert model.config.vision_config.hidden_act == model.config.text_config.hidden_act == "gelu"


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ("missing", RuntimeError, r"layer_norm2\.bias"),
        ("unknown", ValueError, r"unexpected HPSv2 weight .*attn\.extra"),
    ],
)
def test_hps_loads_every_weight_and_no_stray_one(tokenizer, change: str, error: type, message: str) -> None:
    weights = released_layout_checkpoint(len(tokenizer))
    if change == "missing":
        del weights["visual.transformer.resblocks.1.ln_2.bias"]
    else:
        weights["transformer.resblocks.1.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(error, match=message):
        HPSv2(weights, tokenizer=tokenizer, config=tiny_config(len(tokenizer)))


@pytest.mark.parametrize("name", ["HPS_v2_compressed.pt", "xswu/HPSv2/HPS_v2_compressed.pt"], ids=["local", "hub"])
def test_hps_refuses_the_pickled_release_and_says_how_to_convert(tmp_path: Path, name: str) -> None:
    path = tmp_path / name if "/" not in name else name
    if "/" not in name:
        torch.save({"state_dict": {"logit_scale": torch.zeros(())}}, path)
    convert = (
        r"save_file\(torch.load\('HPS_v2_compressed.pt', weights_only=True\)\['state_dict'\], "
        r"'HPS_v2_compressed.safetensors'\)"
    )
    with pytest.raises(ValueError, match=rf"safetensors only.*{convert}"):
        HPSv2(str(path))
