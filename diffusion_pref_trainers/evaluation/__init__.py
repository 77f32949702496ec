"""Evaluation suite: seeded generation, metrics with pluggable scorers, learned reward models, image grids.

Works the same on a real pipeline (learned scorers from :mod:`.scorers`) and in the toy world (exact
detectors from :mod:`diffusion_pref_trainers.toy`). See docs/evaluation.md.
"""

from diffusion_pref_trainers.evaluation.generation import PipelineSampler, generate
from diffusion_pref_trainers.evaluation.grid import make_comparison_grid, make_grid, save_comparison_grid, save_grid
from diffusion_pref_trainers.evaluation.hps import HPSv2
from diffusion_pref_trainers.evaluation.image_reward import ImageReward
from diffusion_pref_trainers.evaluation.metrics import (
    compare,
    diversity,
    mean_reward,
    prompt_fidelity,
    reward_scores,
    style_alignment,
    win_rate,
)
from diffusion_pref_trainers.evaluation.scorers import (
    ClipScore,
    ClipScorer,
    ClipZeroShotStyleScorer,
    LaionAesthetic,
    PickScore,
)

__all__ = [
    "ClipScore",
    "ClipScorer",
    "ClipZeroShotStyleScorer",
    "HPSv2",
    "ImageReward",
    "LaionAesthetic",
    "PickScore",
    "PipelineSampler",
    "compare",
    "diversity",
    "generate",
    "make_comparison_grid",
    "make_grid",
    "mean_reward",
    "prompt_fidelity",
    "reward_scores",
    "save_comparison_grid",
    "save_grid",
    "style_alignment",
    "win_rate",
]
