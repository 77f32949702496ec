"""Every long phase shows one progress bar named for what it does, with counts; pipelines' own bars stay hidden."""

from __future__ import annotations

import re
from collections.abc import Callable

import datasets
import pytest

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer
from diffusion_pref_trainers.evaluation import generate
from diffusion_pref_trainers.testing import tiny_sd_pipeline


def _bars(stderr: str) -> list[str]:
    """The tqdm renderings written to stderr (one per refresh)."""
    return [part for part in re.split(r"[\r\n]", stderr) if "%|" in part]


def test_generation_shows_one_named_bar_and_restores_the_pipelines_setting(capsys: pytest.CaptureFixture) -> None:
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(leave=True)
    generate(pipe, ["a red circle"], [0, 1, 2], batch_size=2, desc="sampling test images", num_inference_steps=2)
    bars = _bars(capsys.readouterr().err)
    assert bars and all(bar.startswith("sampling test images") for bar in bars)  # no per-call pipeline bar
    assert "3/3" in bars[-1]
    assert pipe._progress_bar_config == {"leave": True}


def test_training_and_evaluation_bars_are_named(
    make_config: Callable[..., DiffusionDPOConfig], pairs: datasets.Dataset, capsys: pytest.CaptureFixture
) -> None:
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(max_steps=2), pairs, eval_dataset=pairs)
    trainer.evaluate()
    trainer.train()
    names = {bar.split(":")[0] for bar in _bars(capsys.readouterr().err)}
    assert names == {"evaluating before training", "training", "evaluating at step 2"}
