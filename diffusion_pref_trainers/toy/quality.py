"""Image-quality measures for toy-world samples: validity (the world's detectors read a clean scene) and distance
to the world (Fréchet distance of toy-CLIP image features to true renders of the same prompts).

Both are pure functions of the images (and prompts, and the toy CLIP model for the distance); ``compare`` reports
them for base and aligned images when given (``validity=``, ``distance=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffusion_pref_trainers.toy.clip_train import image_features
from diffusion_pref_trainers.toy.model import RESOLUTION
from diffusion_pref_trainers.toy.world import (
    ATTRIBUTE_VALUES,
    BACKGROUND_PALETTE,
    BACKGROUNDS,
    UNKNOWN,
    Attributes,
    ImageLike,
    _dilate,
    _nearest,
    _palette_array,
    border_width,
    detect_attributes,
    parse_prompt,
    render,
    segment,
)

CLEAN_TOLERANCE = 0.15  # max RGB distance (in [0, 1] units) of a clean background pixel to the background colour
CLEAN_SHARE = 0.95  # min share of background pixels within CLEAN_TOLERANCE of it


def clean_background_share(image: ImageLike) -> float:
    """Share of background pixels whose nearest background-palette colour is the detected background and lies
    within ``CLEAN_TOLERANCE`` of it (0 when the background is unknown).

    Background pixels are those outside the shape's silhouette dilated by one outline width, so the shape's own
    edge does not count against the background.
    """
    seg = segment(image)
    if seg.background == UNKNOWN:
        return 0.0
    background = ~_dilate(seg.silhouette, border_width(min(seg.silhouette.shape)))
    if not background.any():
        return 0.0
    index, distance = _nearest(seg.pixels[background], _palette_array(BACKGROUND_PALETTE))
    clean = (index == BACKGROUNDS.index(seg.background)) & (distance <= CLEAN_TOLERANCE)
    return float(clean.mean())


def is_valid(image: ImageLike) -> bool:
    """The detectors read every attribute (none ``unknown``) and the background is clean (see :func:`validity`)."""
    return UNKNOWN not in detect_attributes(image).values() and clean_background_share(image) >= CLEAN_SHARE


def validity(images: Sequence[ImageLike]) -> np.ndarray:
    """Per image, 1.0 when it is a valid toy scene: every attribute detected, and at least ``CLEAN_SHARE`` of the
    background pixels within ``CLEAN_TOLERANCE`` of the one background colour (:func:`clean_background_share`)."""
    return np.array([float(is_valid(image)) for image in images])


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative rounding clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_gaussians(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)``.

    ``C1^1/2 C2 C1^1/2`` is symmetric and has the eigenvalues of ``C1 C2``, so symmetric eigendecompositions give
    the trace term stably, without a general matrix square root.
    """
    root = psd_sqrt(cov1)
    middle = root @ cov2 @ root
    trace_term = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_term
    return float(max(distance, 0.0))


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets (N >= 2 each)."""
    a, b = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least two feature rows on each side, got {len(a)} and {len(b)}")
    return frechet_distance_gaussians(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def prompt_scene(prompt: str, rng: np.random.Generator) -> Attributes:
    """A scene matching a (possibly partial) toy prompt, attributes it leaves open drawn from ``rng``."""
    named = parse_prompt(prompt)
    values = {name: named.get(name, options[rng.integers(len(options))]) for name, options in ATTRIBUTE_VALUES.items()}
    return Attributes(**values)


def world_renders(prompts: Sequence[str], seed: int = 0) -> list[Any]:
    """One true (jittered) render per prompt, open attributes drawn at random, reproducible with ``seed``."""
    rng = np.random.default_rng(seed)
    return [render(prompt_scene(prompt, rng), RESOLUTION, rng) for prompt in prompts]


@torch.no_grad()
def clip_image_features(model: Any, images: Sequence[ImageLike], batch_size: int = 256) -> np.ndarray:
    """Normalised toy-CLIP image embeddings ``(N, D)`` of 64 px images, in batches."""
    chunks = [list(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([image_features(model, chunk) for chunk in chunks]).numpy()


def world_distance(model: Any, images: Sequence[ImageLike], prompts: Sequence[str], seed: int = 0) -> float:
    """Fréchet distance between toy-CLIP features of ``images`` and of true renders of their ``prompts``."""
    reference = world_renders(prompts, seed)
    return frechet_distance(clip_image_features(model, images), clip_image_features(model, reference))
