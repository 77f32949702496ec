"""The evaluation suite: seeded generation, metrics on known inputs, CLIP-based scorers offline, image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusion_pref_trainers.evaluation import (
    ClipScore,
    ClipScorer,
    ClipZeroShotStyleScorer,
    LaionAesthetic,
    PickScore,
    PipelineSampler,
    compare,
    diversity,
    generate,
    make_grid,
    mean_reward,
    reward_scores,
    save_comparison_grid,
    style_alignment,
    win_rate,
)
from diffusion_pref_trainers.evaluation.grid import HEADER_HEIGHT, LABEL_WIDTH, PADDING
from diffusion_pref_trainers.evaluation.scorers import load_state_dict
from diffusion_pref_trainers.testing import tiny_sd_pipeline
from diffusion_pref_trainers.toy import TASKS, Attributes, attribute_embedding, caption, render, toy_fidelity

STEPS = dict(num_inference_steps=2)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_generation_depends_only_on_prompt_and_seed(pipe) -> None:
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    batched = generate(pipe, prompts, seeds, batch_size=3, **STEPS)
    assert [len(row) for row in batched] == [2, 2] and batched[0][0].size == (32, 32)
    single = [[PipelineSampler(pipe, **STEPS)(prompt, seed) for seed in seeds] for prompt in prompts]
    for row_a, row_b in zip(batched, single, strict=True):
        for a, b in zip(row_a, row_b, strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1  # batching changes float rounding only
    assert np.abs(pixels(batched[0][0]) - pixels(batched[0][1])).max() > 10  # seeds matter
    many = PipelineSampler(pipe, batch_size=3, **STEPS).sample_many([(p, s) for p in prompts for s in seeds])
    for a, b in zip(many, [image for row in batched for image in row], strict=True):
        assert np.array_equal(pixels(a), pixels(b))  # same batches as generate: identical
    again = generate(pipe, prompts, seeds, batch_size=3, **STEPS)
    flat_again, flat_batched = [i for row in again for i in row], [i for row in batched for i in row]
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(flat_again, flat_batched, strict=True))


def test_win_rate_counts_wins_and_half_ties() -> None:
    aligned, base = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[0.0, 2.0], [5.0, 1.0]])
    assert win_rate(aligned, base) == pytest.approx((2 + 0.5) / 4)  # win, tie, loss, win
    assert win_rate(aligned, base, tie_margin=1.5) == pytest.approx((1 + 0.5 * 2) / 4)  # tie, tie, loss, win
    assert win_rate(base, aligned) == pytest.approx(1 - win_rate(aligned, base))
    with pytest.raises(ValueError):
        win_rate(aligned, base[:1])


def test_reward_scores_keep_the_prompt_by_seed_layout() -> None:
    images = [[Image.new("RGB", (w, 8)) for w in (1, 2, 3)], [Image.new("RGB", (w, 8)) for w in (4, 5, 6)]]
    prompts = ["ab", "abcd"]

    def reward(flat, flat_prompts):
        return [image.width * 10 + len(prompt) for image, prompt in zip(flat, flat_prompts, strict=True)]

    assert reward_scores(images, prompts, reward).tolist() == [[12, 22, 32], [44, 54, 64]]
    assert mean_reward(images, prompts, reward) == pytest.approx(np.mean([12, 22, 32, 44, 54, 64]))
    with pytest.raises(ValueError, match="rows"):
        reward_scores(images, prompts[:1], reward)


def test_diversity_is_the_mean_pairwise_cosine_distance() -> None:
    scenes = [
        [Attributes("circle", "red", "small", "left", "white", "flat")] * 3,
        [
            Attributes("circle", "red", "small", "left", "white", "flat"),
            Attributes("circle", "blue", "small", "left", "white", "flat"),  # 1 attribute from the first
            Attributes("square", "blue", "large", "left", "white", "flat"),  # 3 from the first, 2 from the second
        ],
    ]
    images = [[render(scene) for scene in row] for row in scenes]
    expected = (0.0 + (1 + 3 + 2) / 3 / 6) / 2
    assert diversity(images, attribute_embedding) == pytest.approx(expected)
    with pytest.raises(ValueError, match="two images"):
        diversity([row[:1] for row in images], attribute_embedding)


def test_compare_on_toy_images_with_known_answers() -> None:
    prompts = [
        caption(Attributes(shape, "green", "large", "center", "black", "flat")) for shape in ("circle", "square")
    ]
    base = [
        [render(Attributes(shape, "green", "large", "center", "black", "flat"))] * 2 for shape in ("circle", "square")
    ]
    aligned = [
        [render(Attributes(shape, "green", "large", "center", "black", style)) for style in ("striped", "dotted")]
        for shape in ("circle", "square")
    ]
    striped = TASKS["striped"]
    report = compare(prompts, base, aligned, striped, toy_fidelity, striped, attribute_embedding, tie_margin=0.01)
    assert report["fidelity/base"] == 1.0 and report["fidelity/aligned"] == pytest.approx(5 / 6)  # style differs
    assert report["diversity/base"] == pytest.approx(0.0, abs=1e-12)
    assert report["diversity/aligned"] == pytest.approx(1 / 6)
    assert report["win_rate"] == pytest.approx(0.5 + 0.5 * 0.5)  # striped cells win, dotted ones tie near 0
    assert report["style/aligned"] == report["reward/aligned"] > 0.45 > 0.01 > report["style/base"]
    assert style_alignment(aligned, TASKS["striped"]) == report["style/aligned"]


def test_toy_metrics_run_on_generated_images(pipe) -> None:
    prompts = [caption(Attributes("circle", "red", "large", "center", "white", "striped"))]
    images = generate(pipe, prompts, [0, 1], **STEPS)
    report = compare(prompts, images, images, TASKS["warm"], toy_fidelity, TASKS["striped"], attribute_embedding)
    assert report["win_rate"] == 0.5 and all(0.0 <= value <= 1.0 for value in report.values())


def _manual_embeddings(clip_dir: str, images, texts) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Unit image and text embeddings and exp(logit_scale), computed directly with transformers."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        output = model(**inputs)
        scale = float(model.logit_scale.exp())
    return output.image_embeds, output.text_embeds, scale


@pytest.fixture(scope="module")
def toy_images() -> list[Image.Image]:
    return [render(Attributes("circle", "red", "large", "center", "white", s), 32) for s in ("striped", "flat")]


def test_clip_zero_shot_style_scorer_matches_the_formula(clip_dir: str, toy_images) -> None:
    scorer = ClipZeroShotStyleScorer("a striped shape", "a plain shape", model=clip_dir)
    image_embeds, text_embeds, scale = _manual_embeddings(clip_dir, toy_images, ["a striped shape", "a plain shape"])
    expected = torch.softmax(scale * image_embeds @ text_embeds.T, dim=-1)[:, 0]
    scores = scorer(toy_images)
    assert scores.shape == (2,) and np.allclose(scores, expected.numpy(), atol=1e-5)
    assert style_alignment([toy_images], scorer) == pytest.approx(float(expected.mean()), abs=1e-5)


def test_pickscore_and_clip_score_score_each_image_with_its_own_prompt(clip_dir: str, toy_images) -> None:
    prompts = ["zzzz", "a flat circle on white"]  # with this tiny CLIP: one positive and one negative cosine
    image_embeds, text_embeds, scale = _manual_embeddings(clip_dir, toy_images, prompts)
    cosine = (image_embeds * text_embeds).sum(-1)
    pick = PickScore(clip_dir)
    assert np.allclose(pick(toy_images, prompts), (scale * cosine).numpy(), atol=1e-4)
    assert np.allclose(pick(toy_images[::-1], prompts[::-1]), (scale * cosine).numpy()[::-1], atol=1e-4)
    assert (cosine > 0).any() and (cosine < 0).any()  # the clamp below is tested on both sides
    clip_score = ClipScore(clip_dir, weight=2.5)
    assert np.allclose(clip_score(toy_images, prompts), 2.5 * cosine.clamp(min=0).numpy(), atol=1e-5)


def test_a_preloaded_model_needs_its_processor(clip_dir: str) -> None:
    from transformers import CLIPModel

    with pytest.raises(ValueError, match="CLIPProcessor"):
        ClipScorer(CLIPModel.from_pretrained(clip_dir))


def test_laion_aesthetic_applies_its_mlp_to_unit_image_embeddings(clip_dir: str, toy_images, tmp_path: Path) -> None:
    torch.manual_seed(0)
    sizes = [32, 24, 12, 8, 4, 1]  # the tiny CLIP's projection width in, one score out
    indices = [0, 2, 4, 6, 7]
    head = {}
    for index, (fan_in, fan_out) in zip(indices, zip(sizes, sizes[1:], strict=False), strict=True):
        head[f"layers.{index}.weight"], head[f"layers.{index}.bias"] = (
            torch.randn(fan_out, fan_in),
            torch.randn(fan_out),
        )
    path = tmp_path / "head.safetensors"
    save_file(head, path)
    scorer = LaionAesthetic(str(path), model=clip_dir)
    image_embeds, _, _ = _manual_embeddings(clip_dir, toy_images, ["x"])
    expected = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    for index in indices:
        expected = expected @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    scores = scorer(toy_images)
    assert np.allclose(scores, expected[:, 0].numpy(), rtol=1e-4, atol=1e-4)
    assert np.array_equal(scores, scorer(toy_images))  # dropout is off


@pytest.mark.parametrize("name", ["head.pth", "owner/repo/head.pth"], ids=["local", "hub"])
def test_laion_aesthetic_refuses_pickled_heads_and_says_how_to_convert(tmp_path: Path, name: str) -> None:
    path = tmp_path / name if name == "head.pth" else name
    if name == "head.pth":
        torch.save({"layers.0.weight": torch.zeros(1, 1)}, path)
    with pytest.raises(ValueError, match=r"safetensors only.*save_file\(torch.load\('head.pth', weights_only=True\)"):
        load_state_dict(str(path))


def test_grid_places_each_image_in_its_cell(tmp_path: Path) -> None:
    colours = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 0)]]
    rows = [[Image.new("RGB", (20, 10), colour) for colour in row] for row in colours]
    grid = make_grid(rows, row_labels=["first prompt, long enough to wrap onto two lines", "second"],
                     column_labels=["a", "b"])  # fmt: skip
    assert grid.size == (LABEL_WIDTH + 2 * (20 + PADDING), HEADER_HEIGHT + 2 * (10 + PADDING))
    array = np.asarray(grid)
    for i, row in enumerate(colours):
        for j, colour in enumerate(row):
            top, left = HEADER_HEIGHT + i * (10 + PADDING), LABEL_WIDTH + j * (20 + PADDING)
            assert (array[top : top + 10, left : left + 20] == colour).all()
    assert (array[:, :LABEL_WIDTH] < 128).any()  # label text was drawn
    assert make_grid(rows).size == (2 * (20 + PADDING), 2 * (10 + PADDING))


def test_comparison_grid_puts_base_beside_aligned(tmp_path: Path) -> None:
    base = [[Image.new("RGB", (8, 8), (255, 0, 0))] * 2]
    aligned = [[Image.new("RGB", (8, 8), (0, 0, 255))] * 2]
    path = tmp_path / "nested" / "grid.png"
    save_comparison_grid(["a prompt"], base, aligned, path, seeds=[5, 6])
    array = np.asarray(Image.open(path).convert("RGB"))
    lefts = [LABEL_WIDTH + j * (8 + PADDING) for j in range(4)]
    assert [tuple(array[HEADER_HEIGHT + 2, left + 2]) for left in lefts] == [(255, 0, 0), (0, 0, 255)] * 2
