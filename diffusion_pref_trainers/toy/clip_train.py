"""Train the toy world's CLIP: ``python -m diffusion_pref_trainers.toy.clip_train [--output-dir D]``.

A ``transformers`` :class:`~transformers.CLIPModel` (64 px vision tower, the toy tokenizer's text tower) learns a
contrastive (InfoNCE) objective on freshly rendered, jittered scenes and their captions, which leave each
attribute out with probability ``omit_prob`` as the pipeline's pretraining captions do. Besides the other
captions of the batch, every image is contrasted with ``hard_negatives`` captions that change exactly one of the
attributes its caption names, and batches hold scenes in sibling pairs that differ in one named attribute, so
the model must read each attribute. The model, its :class:`CLIPProcessor` and ``clip_report.json`` (settings,
held-out retrieval, cosine-order checks, time, sizes) are saved to the output folder, which loads by path like any
Hub CLIP.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_pref_trainers.toy.model import END, MAX_TOKENS, RESOLUTION, START, toy_tokenizer
from diffusion_pref_trainers.toy.pretrain import lr_factor
from diffusion_pref_trainers.toy.world import (
    ATTRIBUTE_VALUES,
    Attributes,
    caption,
    render,
    sample_attributes,
    to_array,
)

logger = logging.getLogger(__name__)

CLIP_DIR = Path(__file__).parent / "clip"
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
POSITION_SCALE = 0.5  # amplitude of the initial sine-cosine patch position embeddings


@dataclass
class ClipConfig:
    """Settings of a toy-CLIP training run; the defaults are those of the shipped model."""

    seed: int = 0
    hidden_size: int = 64
    text_layers: int = 2
    vision_layers: int = 3
    patch_size: int = 8
    projection_dim: int = 64
    steps: int = 2000
    batch_size: int = 64
    hard_negatives: int = 4
    lr: float = 2e-3
    warmup_steps: int = 100
    omit_prob: float = 0.2
    eval_scenes: int = 512
    threads: int = 1


def untrained_toy_clip(config: ClipConfig) -> tuple[Any, Any]:
    """A freshly initialised (seeded) toy CLIPModel and its CLIPProcessor (toy tokenizer, 64 px images)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(config.seed)
    tokenizer = toy_tokenizer()
    width = config.hidden_size
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_attention_heads=4,
        num_hidden_layers=config.text_layers, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.convert_tokens_to_ids(START), eos_token_id=tokenizer.convert_tokens_to_ids(END),
        pad_token_id=tokenizer.convert_tokens_to_ids(END),
    )  # fmt: skip
    vision = CLIPVisionConfig(
        image_size=RESOLUTION, patch_size=config.patch_size, hidden_size=width, intermediate_size=4 * width,
        num_attention_heads=4, num_hidden_layers=config.vision_layers,
    )  # fmt: skip
    model_config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=config.projection_dim
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    )  # fmt: skip
    model = CLIPModel(model_config)
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.copy_(
            patch_grid_embedding(RESOLUTION // config.patch_size, width)
        )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def patch_grid_embedding(grid: int, width: int) -> torch.Tensor:
    """2-D sine-cosine position embeddings ``(1 + grid**2, width)`` for the class token (zeros) and the patches,
    the vision tower's starting point (trained further): nearby patches start with similar embeddings."""
    quarter = width // 4
    frequencies = 1.0 / 100.0 ** (torch.arange(quarter) / quarter)
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    angles = [axis.reshape(-1, 1) * frequencies for axis in (rows, cols)]
    patches = torch.cat([f(angle) for angle in angles for f in (torch.sin, torch.cos)], dim=1)
    return torch.cat([torch.zeros(1, 4 * quarter), patches]) * POSITION_SCALE


def load_toy_clip(path: str | Path = CLIP_DIR) -> tuple[Any, Any]:
    """The shipped toy CLIP (or one saved by :func:`train_toy_clip` at ``path``) in eval mode, and its processor."""
    from transformers import CLIPModel, CLIPProcessor

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no toy CLIP at {path}; train one with `python -m {__name__}`")
    model = CLIPModel.from_pretrained(path, use_safetensors=True).eval().requires_grad_(False)
    return model, CLIPProcessor.from_pretrained(path)


def pixel_values(images: list[Image.Image | np.ndarray]) -> torch.Tensor:
    """64 px images (PIL or arrays) as normalised ``(N, 3, 64, 64)`` CLIP input, as the processor makes them."""
    arrays = np.stack([to_array(image) for image in images]).astype(np.float32)
    mean, std = np.array(IMAGE_MEAN, np.float32), np.array(IMAGE_STD, np.float32)
    return torch.from_numpy((arrays - mean) / std).permute(0, 3, 1, 2).contiguous()


def _features(output: Any) -> torch.Tensor:
    """The projected embedding from a transformers 5 pooled output (or a transformers 4 tensor)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def text_features(model: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """L2-normalised projected text embeddings ``(N, D)`` (with gradient when the model has it)."""
    tokens = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
    return F.normalize(_features(model.get_text_features(**tokens)), dim=-1)


def image_features(model: Any, images: list[Image.Image | np.ndarray] | torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings ``(N, D)`` of images or of :func:`pixel_values` input."""
    pixels = images if isinstance(images, torch.Tensor) else pixel_values(images)
    return F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)


def one_attribute_changes(scene: Attributes, names: list[str] | None = None) -> list[Attributes]:
    """Every scene that differs from ``scene`` in exactly one attribute (among ``names``, default all)."""
    names = list(ATTRIBUTE_VALUES) if names is None else names
    values = scene.as_dict()
    return [
        Attributes(**{**values, name: other})
        for name in names
        for other in ATTRIBUTE_VALUES[name]
        if other != values[name]
    ]


def change_attributes(scene: Attributes, names: list[str], rng: np.random.Generator) -> Attributes:
    """``scene`` with each attribute in ``names`` set to a different value drawn from ``rng``."""
    values = scene.as_dict()
    for name in names:
        others = [value for value in ATTRIBUTE_VALUES[name] if value != values[name]]
        values[name] = others[rng.integers(len(others))]
    return Attributes(**values)


Batch = tuple[torch.Tensor, list[str], list[list[str]]]


def training_batch(config: ClipConfig, rng: np.random.Generator) -> Batch:
    """Rendered images, their (possibly partial) captions and, per image, hard-negative captions.

    Scenes come in sibling pairs that differ in exactly one attribute their caption names, so each image also
    meets, within the batch, an image and a caption that only that attribute tells apart.
    """
    scenes, texts, negatives = [], [], []
    for _ in range(config.batch_size // 2):
        # as the pipeline's pretraining captions (pretrain.training_caption), without the empty ones
        omitted = [name for name in ATTRIBUTE_VALUES if rng.random() < config.omit_prob]
        named = [name for name in ATTRIBUTE_VALUES if name not in omitted] or list(ATTRIBUTE_VALUES)
        scene = sample_attributes(rng)
        for member in (scene, change_attributes(scene, [named[rng.integers(len(named))]], rng)):
            pool = one_attribute_changes(member, named)
            picks = rng.choice(len(pool), size=config.hard_negatives, replace=len(pool) < config.hard_negatives)
            scenes.append(member)
            texts.append(caption(member, omitted))
            negatives.append([caption(pool[i], omitted) for i in picks])
    images = [render(scene, RESOLUTION, rng) for scene in scenes]
    return pixel_values(images), texts, negatives


def contrastive_loss(model: Any, tokenizer: Any, batch: Batch) -> Any:
    """Symmetric InfoNCE over the batch, the image side also ranking its hard-negative captions."""
    pixels, texts, negatives = batch
    images = image_features(model, pixels)
    hard = [text for row in negatives for text in row]
    captions = text_features(model, tokenizer, texts + hard)
    own, hard_features = captions[: len(texts)], captions[len(texts) :].view(len(texts), len(negatives[0]), -1)
    scale = model.logit_scale.exp()
    logits = scale * images @ own.T
    hard_logits = scale * torch.einsum("nd,nkd->nk", images, hard_features)
    target = torch.arange(len(texts))
    image_loss = F.cross_entropy(torch.cat([logits, hard_logits], dim=1), target)
    return (image_loss + F.cross_entropy(logits.T, target)) / 2


def train_toy_clip(config: ClipConfig) -> tuple[Any, Any, list[float]]:
    """Train a fresh toy CLIP with ``config``; returns the model (eval mode), its processor and the losses."""
    model, processor = untrained_toy_clip(config)
    rng = np.random.default_rng(config.seed)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps))
    model.train()
    losses = []
    for step in range(config.steps):
        batch = training_batch(config, rng)
        loss = contrastive_loss(model, processor.tokenizer, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("step %d/%d loss %.4f", step + 1, config.steps, np.mean(losses[-100:]))
    return model.eval().requires_grad_(False), processor, losses


@torch.no_grad()
def retrieval_accuracy(model: Any, tokenizer: Any, scenes: list[Attributes], rng: np.random.Generator) -> float:
    """Share of fresh renders whose full caption outranks every caption that changes exactly one attribute."""
    images = image_features(model, [render(scene, RESOLUTION, rng) for scene in scenes])
    hits = []
    for scene, image in zip(scenes, images, strict=True):
        texts = [caption(scene)] + [caption(other) for other in one_attribute_changes(scene)]
        scores = text_features(model, tokenizer, texts) @ image
        hits.append(bool(scores[0] > scores[1:].max()))
    return float(np.mean(hits))


@torch.no_grad()
def cosine_order(model: Any, tokenizer: Any, scenes: list[Attributes], rng: np.random.Generator) -> dict[str, float]:
    """Text-text and image-image: how often a scene is closer to a one-attribute change than to a four-attribute one.

    For each scene, one random attribute (and, separately, four random attributes) take other values; the
    reported shares count the scenes whose cosine to the one-change is higher, and the means are the cosines.
    """
    names = list(ATTRIBUTE_VALUES)
    one = [change_attributes(scene, list(rng.choice(names, 1, replace=False)), rng) for scene in scenes]
    four = [change_attributes(scene, list(rng.choice(names, 4, replace=False)), rng) for scene in scenes]
    report = {}
    for kind in ("text", "image"):
        if kind == "text":
            embed = [text_features(model, tokenizer, [caption(s) for s in group]) for group in (scenes, one, four)]
        else:
            embed = [
                image_features(model, [render(s, RESOLUTION, rng) for s in group]) for group in (scenes, one, four)
            ]
        near, far = (embed[0] * embed[1]).sum(-1), (embed[0] * embed[2]).sum(-1)
        report[f"{kind}_one_closer_than_four"] = float((near > far).float().mean())
        report[f"{kind}_cosine_one_change"] = float(near.mean())
        report[f"{kind}_cosine_four_changes"] = float(far.mean())
    return report


def evaluate_toy_clip(model: Any, tokenizer: Any, n: int, seed: int) -> dict[str, float]:
    """Retrieval accuracy and cosine-order checks on ``n`` held-out scenes drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = [sample_attributes(rng) for _ in range(n)]
    return {
        "retrieval_top1": retrieval_accuracy(model, tokenizer, scenes, rng),
        **cosine_order(model, tokenizer, scenes, rng),
    }


def _folder_megabytes(folder: Path) -> float:
    """Total size of the files in ``folder`` in MB."""
    return round(sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6, 3)


def main(argv: list[str] | None = None) -> None:
    """Command line: every :class:`ClipConfig` field is a ``--flag``; saves the model and its report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(CLIP_DIR))
    for name, value in asdict(ClipConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    output_dir = Path(args.pop("output_dir"))
    config = ClipConfig(**args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    model, processor, losses = train_toy_clip(config)
    train_minutes = (time.perf_counter() - started) / 60
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    report = {
        "config": asdict(config),
        "final_loss": float(np.mean(losses[-100:])),
        "held_out": evaluate_toy_clip(model, processor.tokenizer, config.eval_scenes, config.seed + 10_000),
        "train_minutes": round(train_minutes, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_mb": _folder_megabytes(output_dir),
        "torch_version": torch.__version__,
    }
    (output_dir / "clip_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("saved the toy CLIP to %s: %s", output_dir, json.dumps(report))


if __name__ == "__main__":
    main()
