"""A first run is quiet: importing the package and training the tiny pipeline print no warnings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
import torch

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer
from diffusion_pref_trainers.dtypes import cast_model, needs_cast
from diffusion_pref_trainers.testing import tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]
# The loggers whose warnings a user would see during a run.
LOGGERS = ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "diffusion_pref_trainers")


def test_importing_the_package_and_its_trainers_prints_nothing() -> None:
    # A fresh interpreter with the default warning filters, as a user runs it (this process imported everything).
    code = "import diffusion_pref_trainers as d; d.DiffusionDPOTrainer; from diffusers import StableDiffusionPipeline"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"} | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout + result.stderr == ""


def test_building_and_training_one_step_emits_no_warning(
    make_config: Callable[..., DiffusionDPOConfig], pairs: datasets.Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(max_steps=1), pairs)
        trainer.train()
    assert trainer.state.global_step == 1
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.name.split(".")[0] in LOGGERS] == []


def test_cast_model_casts_only_when_needed_and_without_the_float32_warning(caplog: pytest.LogCaptureFixture) -> None:
    vae = tiny_sd_pipeline().vae
    caplog.set_level(logging.WARNING, logger="diffusers")
    assert not needs_cast(vae, torch.float32)
    assert cast_model(vae, torch.bfloat16) is vae
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16} and not needs_cast(vae, torch.bfloat16)
    assert caplog.records == []
