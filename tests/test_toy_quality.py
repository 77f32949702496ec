"""Toy image-quality measures: validity, the Fréchet distance, and their columns in ``compare``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffusion_pref_trainers.evaluation import compare
from diffusion_pref_trainers.toy import TASKS, Attributes, caption, detect_attributes, parse_prompt, render
from diffusion_pref_trainers.toy.quality import (
    CLEAN_SHARE,
    clean_background_share,
    frechet_distance,
    frechet_distance_gaussians,
    is_valid,
    prompt_scene,
    validity,
)
from diffusion_pref_trainers.toy.world import UNKNOWN, sample_attributes

SCENE = Attributes("square", "blue", "small", "center", "white", "striped")


def _speckled(share: float, seed: int = 0) -> Image.Image:
    """SCENE with ``share`` of its pixels set to mid gray (far from white, on the background mostly)."""
    pixels = np.asarray(render(SCENE)).copy()
    rows, cols = np.nonzero(np.random.default_rng(seed).random(pixels.shape[:2]) < share)
    pixels[rows, cols] = 200
    return Image.fromarray(pixels)


def test_true_renders_are_valid() -> None:
    rng = np.random.default_rng(0)
    images = [render(sample_attributes(rng), 64, rng) for _ in range(24)]
    assert validity(images).tolist() == [1.0] * 24
    assert all(clean_background_share(image) == 1.0 for image in images)


def test_a_speckled_background_is_invalid_though_every_attribute_is_read() -> None:
    slightly, heavily = _speckled(0.02), _speckled(0.10)
    assert is_valid(slightly) and clean_background_share(slightly) >= CLEAN_SHARE
    assert UNKNOWN not in detect_attributes(heavily).values()
    assert clean_background_share(heavily) < CLEAN_SHARE and not is_valid(heavily)


def test_an_image_without_a_shape_is_invalid() -> None:
    blank = Image.new("RGB", (64, 64), (0, 0, 0))
    assert clean_background_share(blank) == 1.0  # the background is clean, but nothing is there to read
    assert validity([blank, render(SCENE)]).tolist() == [0.0, 1.0]


def test_frechet_distance_of_hand_computed_gaussians() -> None:
    # Commuting covariances: |mu|^2 = 2, traces 5 + 5, tr sqrt(C1 C2) = 2 + 2, so 2 + 10 - 8 = 4.
    distance = frechet_distance_gaussians(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 1.0]))
    assert distance == pytest.approx(4.0, abs=1e-12)
    # Against the identity, tr sqrt(C2) = sqrt(3) + sqrt(1) (eigenvalues of [[2, 1], [1, 2]]): 2 + 4 - 2 (sqrt 3 + 1).
    distance = frechet_distance_gaussians(np.zeros(2), np.eye(2), np.zeros(2), np.array([[2.0, 1.0], [1.0, 2.0]]))
    assert distance == pytest.approx(4 - 2 * np.sqrt(3), abs=1e-12)


def test_frechet_distance_of_feature_sets() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    a -= a.mean(0)  # so scaling it leaves the mean at 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + np.array([3.0, 0.0, 0.0])) == pytest.approx(9.0, abs=1e-9)  # a pure shift
    assert frechet_distance(a, 2 * a) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-9)  # (2 - 1)^2 tr C
    with pytest.raises(ValueError, match="two feature rows"):
        frechet_distance(a[:1], a)


def test_prompt_scene_keeps_what_the_prompt_names() -> None:
    rng = np.random.default_rng(0)
    scenes = [prompt_scene("a red circle on the left", rng) for _ in range(30)]
    assert {(s.shape, s.colour, s.position) for s in scenes} == {("circle", "red", "left")}
    assert len({s.background for s in scenes}) > 1  # what it leaves open varies
    assert parse_prompt(caption(scenes[0])) == scenes[0].as_dict()


def test_compare_reports_validity_and_distance_for_base_and_aligned() -> None:
    prompts = [caption(SCENE)]
    base, aligned = [[render(SCENE), _speckled(0.10)]], [[render(SCENE), render(SCENE)]]
    seen = []

    def distance(images: list, texts: list) -> float:
        seen.append(list(texts))
        return float(len(seen))

    report = compare(prompts, base, aligned, TASKS["striped"], validity=validity, distance=distance)
    assert report["validity/base"] == 0.5 and report["validity/aligned"] == 1.0
    assert (report["distance/base"], report["distance/aligned"]) == (1.0, 2.0)
    assert seen == [prompts * 2, prompts * 2]  # flat prompts, one per image
