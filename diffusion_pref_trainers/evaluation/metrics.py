"""Evaluation metrics on image grids ``images[prompt][seed]`` (as :func:`generate` returns them).

Scorers are plain callables, so the same metric runs with an exact toy-world detector or a learned model:

- reward model: ``reward(images, prompts) -> scores`` (PickScore, CLIP score, a toy task, ...);
- fidelity: ``fidelity(images, prompts) -> scores in [0, 1]`` (toy: share of prompt attributes detected);
- style scorer: ``style_scorer(images) -> P(style)`` (`docs/evaluation.md`, "style alignment");
- embedding: ``embed(images) -> (N, D) array`` (toy: one-hot attributes; real: CLIP image embeddings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

ImageGrid = Sequence[Sequence[Image.Image]]
RewardModel = Callable[[Sequence[Image.Image], Sequence[str]], Any]
StyleScorer = Callable[[Sequence[Image.Image]], Any]
Embedder = Callable[[Sequence[Image.Image]], Any]


def _flatten(images: ImageGrid, prompts: Sequence[str]) -> tuple[list[Image.Image], list[str], tuple[int, int]]:
    """Row-major flat images, each with its prompt, and the grid's (prompts, seeds) shape."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} rows of images for {len(prompts)} prompts")
    widths = {len(row) for row in images}
    if len(widths) > 1:
        raise ValueError(f"every prompt needs the same number of images, got {sorted(widths)}")
    flat = [image for row in images for image in row]
    flat_prompts = [prompt for prompt, row in zip(prompts, images, strict=True) for _ in row]
    return flat, flat_prompts, (len(prompts), widths.pop() if widths else 0)


def reward_scores(images: ImageGrid, prompts: Sequence[str], reward: RewardModel) -> np.ndarray:
    """``scores[i, j]``: reward of image ``j`` of prompt ``i`` (one call of the reward model)."""
    flat, flat_prompts, shape = _flatten(images, prompts)
    return np.asarray(reward(flat, flat_prompts), dtype=np.float64).reshape(shape)


def mean_reward(images: ImageGrid, prompts: Sequence[str], reward: RewardModel) -> float:
    """Mean reward over all prompts and seeds."""
    return float(reward_scores(images, prompts, reward).mean())


def win_rate(aligned: np.ndarray, base: np.ndarray, tie_margin: float = 0.0) -> float:
    """Share of (prompt, seed) cells where the aligned image scores higher than the base image of the same cell.

    A cell whose two scores differ by at most ``tie_margin`` is a tie and counts one half.
    """
    aligned, base = np.asarray(aligned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if aligned.shape != base.shape or aligned.size == 0:
        raise ValueError(f"need two equally shaped, non-empty score arrays, got {aligned.shape} and {base.shape}")
    difference = aligned - base
    ties = np.abs(difference) <= tie_margin
    return float(((difference > 0) & ~ties).mean() + 0.5 * ties.mean())


def prompt_fidelity(images: ImageGrid, prompts: Sequence[str], fidelity: RewardModel) -> float:
    """Mean fidelity of each image to its own prompt."""
    return mean_reward(images, prompts, fidelity)


def diversity(images: ImageGrid, embed: Embedder) -> float:
    """Mean over prompts of the mean cosine distance ``1 - cos(e_j, e_k)`` between its images (pairs j < k).

    Needs at least two seeds per prompt; 0 means every seed gave the same embedding.
    """
    flat, _, (n_prompts, n_seeds) = _flatten(images, [""] * len(images))
    if n_seeds < 2:
        raise ValueError("diversity needs at least two images per prompt")
    vectors = np.asarray(embed(flat), dtype=np.float64).reshape(n_prompts, n_seeds, -1)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    unit = vectors / np.maximum(norms, 1e-12)
    cosines = unit @ unit.transpose(0, 2, 1)
    upper = np.triu_indices(n_seeds, k=1)
    return float(np.clip(1.0 - cosines[:, upper[0], upper[1]], 0.0, 2.0).mean())  # clip float rounding


def style_alignment(images: ImageGrid, style_scorer: StyleScorer) -> float:
    """Mean style probability over all images (`docs/evaluation.md`, "style alignment"); report it beside the base's."""
    flat = [image for row in images for image in row]
    return float(np.asarray(style_scorer(flat), dtype=np.float64).mean())


def compare(
    prompts: Sequence[str],
    base: ImageGrid,
    aligned: ImageGrid,
    reward: RewardModel,
    fidelity: RewardModel | None = None,
    style_scorer: StyleScorer | None = None,
    embed: Embedder | None = None,
    tie_margin: float = 0.0,
) -> dict[str, float]:
    """Every metric for base and aligned images of the same prompts and seeds, in one flat dict.

    Keys: ``reward/base``, ``reward/aligned``, ``win_rate``, and, when their scorer is given,
    ``fidelity/*``, ``style/*``, ``diversity/*``.
    """
    base_scores, aligned_scores = reward_scores(base, prompts, reward), reward_scores(aligned, prompts, reward)
    report = {
        "reward/base": float(base_scores.mean()),
        "reward/aligned": float(aligned_scores.mean()),
        "win_rate": win_rate(aligned_scores, base_scores, tie_margin),
    }
    for name, images in (("base", base), ("aligned", aligned)):
        if fidelity is not None:
            report[f"fidelity/{name}"] = prompt_fidelity(images, prompts, fidelity)
        if style_scorer is not None:
            report[f"style/{name}"] = style_alignment(images, style_scorer)
        if embed is not None:
            report[f"diversity/{name}"] = diversity(images, embed)
    return report
