"""The bad-input catalogue: each input known to be wrong fails at once, in our words, before any compute.

Every case names the error type and a phrase of its message. The harness checks three more things for all of
them: the denoiser never ran a forward (the failure came before any compute), and `output_dir` holds exactly
what it held before (nothing new, nothing lost). Add a case to the table of its area; see
docs/troubleshooting.md for what each failure means to a user.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pytest
from diffusers import UNet2DConditionModel

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer


@dataclass
class Env:
    """What a case builds on: a tiny saved pipeline, eight pairs and an output folder under the test's tmp path."""

    tmp: Path
    pipe_dir: str
    pairs: datasets.Dataset

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def config(self, cls: type = DiffusionDPOConfig, **overrides: Any) -> Any:
        """A small valid config of `cls` writing to `out`; keyword arguments override."""
        values = dict(
            output_dir=str(self.out), resolution=32, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
            logging_steps=1, save_steps=0, eval_noise_draws=1,
        )  # fmt: skip
        values.update(overrides)
        return cls(**values)

    def trainer(self, cls: type = DiffusionDPOTrainer, args: Any = None, dataset: Any = None, **kwargs: Any) -> Any:
        """A trainer of `cls` on the tiny pipeline (by path) and the pairs, unless given others."""
        args = args if args is not None else self.config(cls.config_class)
        return cls(self.pipe_dir, args, self.pairs if dataset is None else dataset, **kwargs)


@dataclass(frozen=True)
class Case:
    """One bad input: `trigger` raises `error`, whose message contains `phrase` (case-insensitive)."""

    name: str
    trigger: Callable[[Env], Any]
    error: type[BaseException]
    phrase: str


# ------------------------------------------------------------------------------------------------ config
CONFIG_CASES = [
    Case("negative learning rate", lambda env: env.config(learning_rate=-1.0), ValueError, "learning_rate"),
]


# ------------------------------------------------------------------------------------------------ data
DATA_CASES = [
    Case(
        "too few rows for one batch",
        lambda env: env.trainer(dataset=env.pairs.select(range(2))).train(),
        ValueError,
        "smaller than one batch",
    ),
]


# ------------------------------------------------------------------------------------------------ model
MODEL_CASES = [
    Case(
        "resolution the VAE cannot divide",
        lambda env: env.trainer(args=env.config(resolution=33)),
        ValueError,
        "multiple of",
    ),
]


# ------------------------------------------------------------------------------------------------ resume
RESUME_CASES = [
    Case(
        "resume from a folder that does not exist",
        lambda env: env.trainer().train(resume_from_checkpoint=str(env.tmp / "nowhere")),
        FileNotFoundError,
        "not a checkpoint folder",
    ),
]


# ------------------------------------------------------------------------------------------------ command line
CLI_CASES: list[Case] = []


# ------------------------------------------------------------------------------------------------ hub
HUB_CASES: list[Case] = []


# ------------------------------------------------------------------------------------------------ device
DEVICE_CASES: list[Case] = [
    Case(
        "fp16 on a CPU",
        lambda env: env.trainer(args=env.config(mixed_precision="fp16")),
        ValueError,
        "`mixed_precision='fp16'` cannot train on a CPU",
    ),
    Case(
        "a Hub model that is not cached, offline",
        lambda env: DiffusionDPOTrainer("someone/not-there", env.config(), env.pairs),
        OSError,
        "Cannot load the pipeline 'someone/not-there'",
    ),
    Case(
        "a Hub dataset that is not cached, offline",
        lambda env: env.trainer(dataset="someone/not-there"),
        OSError,
        "Cannot load the dataset 'someone/not-there'",
    ),
]


CASES = CONFIG_CASES + DATA_CASES + MODEL_CASES + RESUME_CASES + CLI_CASES + HUB_CASES + DEVICE_CASES


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (empty when the folder does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def env(tmp_path: Path, tiny_pipe_dir: str, pairs: datasets.Dataset) -> Env:
    return Env(tmp_path, tiny_pipe_dir, pairs)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_fails_before_compute_and_leaves_output_dir(
    case: Case, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    forwards = []
    original = UNet2DConditionModel.forward

    def counted(self, *args, **kwargs):
        forwards.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    before = _snapshot(env.out)
    with pytest.raises(case.error) as raised:
        case.trigger(env)
    assert case.phrase.lower() in str(raised.value).lower(), str(raised.value)
    assert not forwards, f"the denoiser ran {len(forwards)} forward(s) before the error"
    assert _snapshot(env.out) == before, "output_dir changed"


def test_the_catalogue_covers_every_area() -> None:
    assert len(CASES) >= 40, len(CASES)
    assert len({case.name for case in CASES}) == len(CASES), "case names must be unique"
