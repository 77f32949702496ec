"""The shipped toy CLIP: loads by path like a Hub CLIP, reads every attribute, orders scenes sensibly, trains
reproducibly, and serves Diffusion-RPO's three similarity modes in the toy world."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_pref_trainers import DiffusionRPOConfig, DiffusionRPOTrainer
from diffusion_pref_trainers.similarity import ClipEmbedder
from diffusion_pref_trainers.toy import RendererSampler, build_preference_dataset, caption, render, task_prompts
from diffusion_pref_trainers.toy.clip_train import (
    CLIP_DIR,
    ClipConfig,
    evaluate_toy_clip,
    image_features,
    load_toy_clip,
    one_attribute_changes,
    pixel_values,
    text_features,
    train_toy_clip,
)
from diffusion_pref_trainers.toy.model import load_toy_pipeline
from diffusion_pref_trainers.toy.world import Attributes, sample_attributes

SCENE = Attributes("triangle", "orange", "large", "right", "gray", "dotted")


@pytest.fixture(scope="module")
def toy_clip():
    """The shipped model (eval mode, no gradient) and its processor."""
    return load_toy_clip()


def test_the_shipped_model_loads_by_path_like_a_hub_clip() -> None:
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(str(CLIP_DIR)), CLIPProcessor.from_pretrained(str(CLIP_DIR))
    inputs = processor(
        text=[caption(SCENE), caption(SCENE, ["colour"])], images=[render(SCENE)], padding=True, return_tensors="pt"
    )
    assert torch.allclose(inputs["pixel_values"], pixel_values([render(SCENE)]), atol=1e-6)  # training's input
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (1, 2)
    files = [path for path in CLIP_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 10e6


def test_one_attribute_changes_are_every_other_value_of_one_attribute() -> None:
    changes = one_attribute_changes(SCENE)
    assert len(changes) == 2 + 5 + 1 + 4 + 2 + 3 and SCENE not in changes
    differing = [sum(value != getattr(SCENE, name) for name, value in c.as_dict().items()) for c in changes]
    assert set(differing) == {1}


@pytest.fixture(scope="module")
def held_out(toy_clip) -> dict[str, float]:
    """Retrieval and cosine order on 64 fresh scenes, apart from training and the report's."""
    model, processor = toy_clip
    return evaluate_toy_clip(model, processor.tokenizer, 64, seed=424242)


@pytest.mark.xfail(strict=True, reason="issue 16 target not met: the shipped model ignores position (see docs)")
def test_retrieval_target_on_fresh_held_out_scenes(held_out) -> None:
    assert held_out["retrieval_top1"] >= 0.9, held_out
    report = json.loads((CLIP_DIR / "clip_report.json").read_text())
    assert report["held_out"]["retrieval_top1"] >= 0.9


def test_cosine_order_on_fresh_held_out_scenes(held_out) -> None:
    report = held_out
    for kind in ("text", "image"):
        assert report[f"{kind}_one_closer_than_four"] >= 0.9, report
        assert report[f"{kind}_cosine_one_change"] > report[f"{kind}_cosine_four_changes"], report


def test_the_true_caption_beats_other_colours_and_backgrounds_for_a_known_scene(toy_clip) -> None:
    model, processor = toy_clip
    others = one_attribute_changes(SCENE, ["colour", "background"])
    texts = [caption(SCENE)] + [caption(other) for other in others]
    with torch.no_grad():
        scores = text_features(model, processor.tokenizer, texts) @ image_features(model, [render(SCENE)])[0]
    assert int(scores.argmax()) == 0


def test_training_is_reproducible_with_a_seed() -> None:
    config = ClipConfig(steps=2, batch_size=8, hard_negatives=2, vision_layers=1, text_layers=1, warmup_steps=1)
    first, _, losses = train_toy_clip(config)
    second, _, again = train_toy_clip(config)
    assert losses == again and np.isfinite(losses).all()
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other_seed, _, _ = train_toy_clip(dataclasses.replace(config, seed=1))
    assert not torch.equal(other_seed.text_projection.weight, first.text_projection.weight)


def test_rpo_embeds_toy_images_as_the_toy_clip_does(toy_clip) -> None:
    model, _ = toy_clip
    embedder = ClipEmbedder(str(CLIP_DIR), torch.device("cpu"))
    scenes = [sample_attributes(np.random.default_rng(seed)) for seed in range(4)]
    images = [render(scene) for scene in scenes]
    rpo = torch.nn.functional.normalize(embedder.embed_images(pixel_values(images)), dim=-1)
    assert torch.allclose(rpo, image_features(model, images), atol=1e-5)


@pytest.fixture(scope="module")
def toy_pairs():
    """Pairs of rendered toy scenes labelled by the `large` task (64 px)."""
    prompts, _ = task_prompts("large", 16, 1)
    return build_preference_dataset(RendererSampler(follow=0.5), prompts, "large", samples_per_prompt=3)


@pytest.mark.parametrize("similarity", ["image", "text", "multimodal"])
def test_rpo_trains_in_the_toy_world_with_the_toy_clip(similarity: str, toy_pairs, tmp_path: Path) -> None:
    args = DiffusionRPOConfig(
        output_dir=str(tmp_path), resolution=64, per_device_train_batch_size=4, max_steps=2, beta=500.0,
        learning_rate=1e-3, logging_steps=1, save_steps=0, similarity=similarity,
        similarity_model_name_or_path=str(CLIP_DIR),
    )  # fmt: skip
    trainer = DiffusionRPOTrainer(load_toy_pipeline(), args, toy_pairs)
    trainer.train()
    assert isinstance(trainer.embedder, ClipEmbedder)
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2 and all(np.isfinite(row["loss"]) for row in logged)
    assert all(0.0 < row["rpo/weight_diagonal"] < 1.0 for row in logged)


def test_world_distance_is_small_for_renders_and_large_for_blank_images(toy_clip) -> None:
    from PIL import Image

    from diffusion_pref_trainers.toy.quality import world_distance, world_renders

    model, _ = toy_clip
    rng = np.random.default_rng(3)
    prompts = [caption(sample_attributes(rng), ["style"]) for _ in range(48)]
    renders = world_renders(prompts, seed=1)  # other draws of the same prompts
    blanks = [Image.new("RGB", (64, 64), (128, 128, 128))] * 24 + [render(SCENE)] * 24
    near, far = world_distance(model, renders, prompts), world_distance(model, blanks, prompts)
    assert 0.0 < near < far / 3, (near, far)
