"""The bad-input catalogue: each input known to be wrong fails at once, in our words, before any compute.

Every case names the error type and a phrase of its message. The harness checks three more things for all of
them: the denoiser never ran a forward (the failure came before any compute), and `output_dir` holds exactly
what it held before (nothing new, nothing lost). Add a case to the table of its area; see
docs/troubleshooting.md for what each failure means to a user.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pytest
from diffusers import UNet2DConditionModel

from diffusion_pref_trainers import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionKTOTrainer,
    DiffusionRPOTrainer,
    checkpoints,
)
from diffusion_pref_trainers.adapters import ADAPTER_FILE
from diffusion_pref_trainers.configs import DiffusionKTOConfig, DiffusionMaPOConfig, DiffusionRPOConfig
from diffusion_pref_trainers.folder_lock import LOCK_FILE
from diffusion_pref_trainers.optim import build_scheduler
from diffusion_pref_trainers.state import STATE_FILE
from diffusion_pref_trainers.testing import make_preference_dataset


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
    Case("lora_alpha 0 trains nothing", lambda env: env.config(lora_alpha=0), ValueError, "`lora_alpha` must be > 0"),
    Case("fractional max_steps", lambda env: env.config(max_steps=2.5), TypeError, "`max_steps` must be a whole"),
    Case("fractional lora_rank", lambda env: env.config(lora_rank=4.5), TypeError, "`lora_rank` must be a whole"),
    Case("fractional seed", lambda env: env.config(seed=1.5), TypeError, "`seed` must be a whole number"),
    Case("negative seed", lambda env: env.config(seed=-1), ValueError, "`seed` must be >= 0"),
    Case("learning rate as text", lambda env: env.config(learning_rate="1e-3"), TypeError, "a number, e.g. 1e-4"),
    Case("beta as text", lambda env: env.config(beta="5000"), TypeError, "`beta` must be a number"),
    Case("output_dir None", lambda env: env.config(output_dir=None), TypeError, "`output_dir` must be a string"),
    Case("output_dir empty", lambda env: env.config(output_dir=""), ValueError, "`output_dir` is empty"),
    Case("output_dir is a file", lambda env: env.config(output_dir=_a_file(env)), ValueError, "must name a folder"),
    Case("use_lora as text", lambda env: env.config(use_lora="no"), TypeError, "`use_lora` must be True or False"),
    Case(
        "batch size True",
        lambda env: env.config(per_device_train_batch_size=True),
        TypeError,
        "`per_device_train_batch_size` must be a whole number",
    ),
    Case("report_to a number", lambda env: env.config(report_to=5), TypeError, "`report_to` must be a list"),
    Case(
        "lora_target_modules a number",
        lambda env: env.config(lora_target_modules=3),
        TypeError,
        "`lora_target_modules` must be a list of strings",
    ),
    Case("fsdp, a TrainingArguments setting not used", lambda env: env.config(fsdp="full_shard"), TypeError, "launch"),
    Case("a misspelled field", lambda env: env.config(learnin_rate=1e-4), TypeError, "did you mean `learning_rate`"),
    Case("bf16 against fp16", lambda env: env.config(bf16=True, mixed_precision="fp16"), ValueError, "contradicts"),
    Case("an optimizer not offered", lambda env: env.config(optim="galore_adamw"), ValueError, "adamw_torch_fused"),
    Case("fractional warm-up steps above 1", lambda env: env.config(warmup_steps=2.5), ValueError, "ratio"),
    Case("optim_args not k=v", lambda env: env.config(optim_args="momentum"), ValueError, "'key=value"),
    Case(
        "eval_steps without eval_strategy='steps'",
        lambda env: env.config(eval_strategy="no", eval_steps=5),
        ValueError,
        "set eval_strategy='steps'",
    ),
    Case(
        "eval_on_start without an eval set",
        lambda env: env.trainer(args=env.config(eval_on_start=True)),
        ValueError,
        "no eval set",
    ),
]


def _a_file(env: Env) -> str:
    """A file beside `output_dir`, to be given as `output_dir`."""
    path = env.tmp / "notes.txt"
    path.write_text("not a folder")
    return str(path)


# ------------------------------------------------------------------------------------------------ data
def _with(dataset: datasets.Dataset, column: str, value: Any, row: int | None = 3) -> datasets.Dataset:
    """`dataset` with `column` set to `value` in `row` (every row when None); a string turns the column to text."""
    values = [str(cell) for cell in dataset[column]] if isinstance(value, str) else list(dataset[column])
    for index in range(len(values)) if row is None else [row]:
        values[index] = value
    return dataset.remove_columns(column).add_column(column, values)


def _pickapic(column: str = "label_0", value: Any = 1.0, row: int | None = 3) -> datasets.Dataset:
    """Eight Pick-a-Pic pairs with one cell (or a whole column) replaced."""
    return _with(make_preference_dataset(8, schema="pickapic"), column, value, row)


def _label_0(value: Any) -> Callable[[Env], Any]:
    """A trigger: a DPO trainer on Pick-a-Pic pairs whose row 3 has `label_0 == value`."""
    return lambda env: env.trainer(dataset=_pickapic(value=value))


def _kto(label: Any) -> Callable[[Env], Any]:
    """A trigger: a KTO trainer on eight labelled images whose row 3 has `label`."""

    def trigger(env: Env) -> Any:
        images = env.pairs.select_columns(["prompt", "chosen"]).rename_column("chosen", "image")
        labelled = _with(images.add_column("label", [1, 0] * 4), "label", label)
        return env.trainer(DiffusionKTOTrainer, dataset=labelled)

    return trigger


DATA_CASES = [
    Case(
        "too few rows for one batch",
        lambda env: env.trainer(dataset=env.pairs.select(range(2))).train(),
        ValueError,
        "smaller than one batch",
    ),
    Case("pickapic label_0 of 2", _label_0(2.0), ValueError, "row 3: `label_0` is 2.0"),
    Case("pickapic label_0 of -1", _label_0(-1.0), ValueError, "row 3: `label_0` is -1.0"),
    Case("pickapic label_0 of 0.3", _label_0(0.3), ValueError, "row 3: `label_0` is 0.3"),
    Case("pickapic label_0 NaN", _label_0(math.nan), ValueError, "row 3: `label_0` is nan"),
    Case("pickapic label_0 'yes'", _label_0("yes"), ValueError, "row 3: `label_0` is 'yes'"),
    Case(
        "streamed pickapic label_0 of 2",
        lambda env: env.trainer(dataset=_pickapic(value=2.0).to_iterable_dataset()),
        ValueError,
        "streamed row 3: `label_0` is 2.0",
    ),
    Case("KTO label 'maybe'", _kto("maybe"), ValueError, "row 3: `label` is 'maybe'"),
    Case("KTO label 0.5", _kto(0.5), ValueError, "row 3: `label` is 0.5"),
    Case("KTO label None", _kto(None), ValueError, "row 3: `label` is None"),
    Case(
        "image column of numbers",
        lambda env: env.trainer(dataset=_with(env.pairs, "chosen", 7, row=None)),
        ValueError,
        "column `chosen` holds int64 values, not images",
    ),
    Case(
        "every image unreadable",
        lambda env: env.trainer(dataset=_pickapic("jpg_1", b"not an image", row=None)),
        ValueError,
        "none of the 8 rows probed",
    ),
    Case(
        "unreadable probed row with skip_bad_images=False",
        lambda env: env.trainer(args=env.config(skip_bad_images=False), dataset=_pickapic("jpg_0", b"broken", row=0)),
        ValueError,
        "row 0: cannot read its image",
    ),
    Case(
        "columns of no schema",
        lambda env: env.trainer(dataset=env.pairs.rename_column("chosen", "good")),
        ValueError,
        "match no known schema",
    ),
    Case(
        "column_mapping from a missing column",
        lambda env: env.trainer(args=env.config(column_mapping={"good": "chosen"})),
        ValueError,
        "names columns the dataset lacks",
    ),
    Case(
        "dataset_test_split of a plain Dataset",
        lambda env: env.trainer(args=env.config(dataset_test_split="test")),
        ValueError,
        "a datasets.Dataset has no splits",
    ),
    Case(
        "training split missing from a DatasetDict",
        lambda env: env.trainer(dataset=datasets.DatasetDict(fit=env.pairs)),
        ValueError,
        "has no split 'train'",
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
    Case(
        "RPO similarity model path that does not exist",
        lambda env: env.trainer(
            DiffusionRPOTrainer,
            args=env.config(
                DiffusionRPOConfig, similarity="image", similarity_model_name_or_path=str(env.tmp / "clip")
            ),
        ),
        FileNotFoundError,
        "neither an existing folder nor a Hub id",
    ),
    Case(
        "RPO similarity model not cached, offline",
        lambda env: env.trainer(
            DiffusionRPOTrainer,
            args=env.config(DiffusionRPOConfig, similarity="image", similarity_model_name_or_path="nobody/no-clip"),
        ),
        FileNotFoundError,
        "not in the local Hub cache and HF_HUB_OFFLINE is set",
    ),
]


# ------------------------------------------------------------------------------------------------ resume
def _old_run(env: Env, step: int = 1, **settings: Any) -> Path:
    """`env.tmp/old`, holding a checkpoint at `step` of a run of `settings` (written without training)."""
    args = env.config(output_dir=str(env.tmp / "old"), **settings)
    trainer = env.trainer(args=args)
    trainer.lr_scheduler = build_scheduler(args, trainer.optimizer, args.max_steps)
    trainer.state.global_step = step
    trainer._save_checkpoint()
    return checkpoints.checkpoint_path(args.output_dir, step)


def _resume(env: Env, checkpoint: Path, requested: str | None = None, **settings: Any) -> None:
    """Resume `checkpoint` (or `requested`, e.g. 'latest', in its folder, which must come out unchanged) with the
    default config and `settings`."""
    args = env.config(output_dir=str(checkpoint.parent), **settings)
    before = _snapshot(checkpoint.parent)
    try:
        env.trainer(args=args).train(resume_from_checkpoint=requested or str(checkpoint))
    finally:
        assert _snapshot(checkpoint.parent) == before, "the old run's folder changed"


def _truncate(path: Path) -> Path:
    """Cut `path` to half its size, as a crash while copying would; returns its checkpoint folder."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path.parent


def _fresh_run_into(env: Env, folder: Path, **settings: Any) -> None:
    """A fresh run writing to `folder` (which must come out unchanged)."""
    before = _snapshot(folder)
    try:
        env.trainer(args=env.config(output_dir=str(folder), **settings)).train()
    finally:
        assert _snapshot(folder) == before, "the folder changed"


def _locked(env: Env) -> Path:
    """`env.tmp/locked`, whose lock names a live process on this host (this test's parent)."""
    folder = env.tmp / "locked"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    return folder


def _without_run_record(checkpoint: Path) -> Path:
    """A checkpoint as versions before run.json wrote it."""
    (checkpoint / checkpoints.RUN_FILE).unlink()
    return checkpoint


RESUME_CASES = [
    Case(
        "resume from a folder that does not exist",
        lambda env: env.trainer().train(resume_from_checkpoint=str(env.tmp / "nowhere")),
        FileNotFoundError,
        "not a checkpoint folder",
    ),
    Case(
        "resume a checkpoint of another run (other seed)",
        lambda env: _resume(env, _old_run(env, seed=1), seed=2),
        ValueError,
        "checkpoint of another run; it differs in `seed`: 1 -> 2",
    ),
    Case(
        "resume with another LoRA rank",
        lambda env: _resume(env, _old_run(env, lora_rank=8), lora_rank=4),
        ValueError,
        "`lora_rank`: 8 -> 4",
    ),
    Case(
        "resume with other LoRA target modules",
        lambda env: _resume(env, _old_run(env), lora_target_modules=["to_q", "to_v"]),
        ValueError,
        "`lora_target_modules`: None -> ['to_q', 'to_v']",
    ),
    Case(
        "resume full fine-tuning from a LoRA checkpoint",
        lambda env: _resume(env, _old_run(env), use_lora=False),
        ValueError,
        "`use_lora`: True -> False",
    ),
    Case(
        "resume with 'latest' where only another run's checkpoints are",
        lambda env: _resume(env, _old_run(env, seed=3), "latest", seed=4),
        ValueError,
        "checkpoint of another run",
    ),
    Case(
        "resume a checkpoint without run.json (older version)",
        lambda env: _resume(env, _without_run_record(_old_run(env))),
        ValueError,
        "has no run.json",
    ),
    Case(
        "resume a checkpoint already at max_steps",
        lambda env: _resume(env, _old_run(env, step=2), max_steps=2),
        ValueError,
        "already complete at step 2",
    ),
    Case(
        "resume from a truncated optimizer file",
        lambda env: _resume(env, _truncate(_old_run(env) / "optimizer.safetensors")),
        ValueError,
        "is damaged: optimizer.safetensors",
    ),
    Case(
        "resume from a truncated trainer_state.json",
        lambda env: _resume(env, _truncate(_old_run(env) / STATE_FILE)),
        ValueError,
        "is damaged: trainer_state.json",
    ),
    Case(
        "resume from truncated adapter weights",
        lambda env: _resume(env, _truncate(_old_run(env) / ADAPTER_FILE)),
        ValueError,
        f"is damaged: {ADAPTER_FILE}",
    ),
    Case(
        "fresh run into a folder holding another run's checkpoints",
        lambda env: _fresh_run_into(env, _old_run(env).parent, seed=2),
        ValueError,
        "already holds another run's output",
    ),
    Case(
        "run into a folder another live run has locked",
        lambda env: _fresh_run_into(env, _locked(env)),
        FileExistsError,
        f"in use by another run (process {os.getppid()} ",
    ),
]


# ------------------------------------------------------------------------------------------------ guard
GUARD_CASES: list[Case] = [
    Case("infinite learning rate", lambda env: env.config(learning_rate=float("inf")), ValueError, "learning_rate"),
    Case("NaN max_grad_norm", lambda env: env.config(max_grad_norm=float("nan")), ValueError, "`max_grad_norm`"),
    Case("infinite DPO beta", lambda env: env.config(beta=float("inf")), ValueError, "`beta` must be a finite"),
    Case(
        "NaN KTO beta",
        lambda env: env.config(DiffusionKTOConfig, beta=float("nan")),
        ValueError,
        "`beta` must be a finite",
    ),
    Case(
        "infinite MaPO beta",
        lambda env: env.config(DiffusionMaPOConfig, beta=float("inf")),
        ValueError,
        "`beta` must be a finite",
    ),
    Case(
        "infinite RPO distance temperature",
        lambda env: env.config(DiffusionRPOConfig, distance_temperature=float("inf")),
        ValueError,
        "`distance_temperature` must be a finite",
    ),
    Case("max_nonfinite_steps of 0", lambda env: env.config(max_nonfinite_steps=0), ValueError, "max_nonfinite_steps"),
]


# ------------------------------------------------------------------------------------------------ command line
def _cli(env: Env, *tokens: str, recipe: str | None = None) -> Any:
    """What the command line `[--config recipe] --output_dir env.out tokens` builds."""
    from diffusion_pref_trainers.cli import parse_command_line

    config = ["--config", recipe] if recipe else []
    return parse_command_line([*config, "--output_dir", str(env.out), *tokens])


def _recipe(env: Env, text: str) -> str:
    """A recipe file holding `text`, beside `output_dir`."""
    path = env.tmp / "recipe.yaml"
    path.write_text(text)
    return str(path)


CLI_CASES: list[Case] = [
    Case("misspelt setting", lambda env: _cli(env, "--lora_alha", "4"), ValueError, "did you mean lora_alpha"),
    Case("abbreviated setting", lambda env: _cli(env, "--lora_alp", "4"), ValueError, "did you mean lora_alpha"),
    Case(
        "setting of another method",
        lambda env: _cli(env, "--method", "dpo", "--similarity", "text"),
        ValueError,
        "Unknown settings for method 'dpo': `similarity`",
    ),
    Case(
        "value without its option",
        lambda env: _cli(env, "learning_rate", "1"),
        ValueError,
        "values without an option ['learning_rate', '1']",
    ),
    Case(
        "fractional --max_steps",
        lambda env: _cli(env, "--max_steps", "2.5"),
        argparse.ArgumentError,
        "argument --max_steps/--max-steps: invalid int value: '2.5'",
    ),
    Case(
        "--use_lora maybe",
        lambda env: _cli(env, "--use_lora", "maybe"),
        argparse.ArgumentError,
        "argument --use_lora/--use-lora: Truthy value expected",
    ),
    Case(
        "--learning_rate as a word",
        lambda env: _cli(env, "--learning_rate", "fast"),
        argparse.ArgumentError,
        "argument --learning_rate/--learning-rate: invalid float value",
    ),
    Case(
        "--max_steps without a value",
        lambda env: _cli(env, "--max_steps"),
        argparse.ArgumentError,
        "argument --max_steps/--max-steps: expected one argument",
    ),
    Case(
        "--column_mapping not JSON",
        lambda env: _cli(env, "--column_mapping", "{text: prompt}"),
        ValueError,
        "`column_mapping` takes a mapping, or a JSON object as text",
    ),
    Case("unknown --method", lambda env: _cli(env, "--method", "xyz"), ValueError, "Unknown method 'xyz'"),
    Case(
        "--mixed_precision yes",
        lambda env: _cli(env, "--mixed_precision", "yes"),
        ValueError,
        "`mixed_precision='yes'` is not supported",
    ),
    Case(
        "recipe that is a list",
        lambda env: _cli(env, recipe=_recipe(env, "- method\n- dpo\n")),
        ValueError,
        "must hold a mapping",
    ),
    Case(
        "recipe with an unknown key",
        lambda env: _cli(env, recipe=_recipe(env, "lora_alha: 4\n")),
        ValueError,
        "`lora_alha` (did you mean lora_alpha",
    ),
    Case(
        "recipe that does not exist",
        lambda env: _cli(env, recipe=str(env.tmp / "nowhere.yaml")),
        FileNotFoundError,
        "does not exist",
    ),
]


# ------------------------------------------------------------------------------------------------ hub
def _online_trainer(env: Env, endpoint: str, **overrides: Any) -> Any:
    """A trainer built with offline mode lifted, the Hub at `endpoint`, no token file and no token variable."""
    import huggingface_hub

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setenv("HF_HUB_OFFLINE", "0")
        patch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        patch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(env.tmp / "no-token-file"))
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            patch.delenv(name, raising=False)
        return env.trainer(args=env.config(push_to_hub=True, **overrides))


HUB_CASES: list[Case] = [
    Case(
        "push_to_hub offline",
        lambda env: env.trainer(args=env.config(push_to_hub=True)),
        RuntimeError,
        "HF_HUB_OFFLINE is set",
    ),
    Case(
        "push_to_hub with the Hub unreachable",
        lambda env: _online_trainer(env, "http://127.0.0.1:9", hub_token="hf_test"),
        RuntimeError,
        "cannot be reached",
    ),
    Case(
        "push_to_hub without a token",
        lambda env: _online_trainer(env, "http://127.0.0.1:9"),
        RuntimeError,
        "needs a Hugging Face token",
    ),
    Case("unknown hub_strategy", lambda env: env.config(hub_strategy="checkpoint"), ValueError, "hub_strategy"),
    Case(
        "every_save with no saves",
        lambda env: env.config(push_to_hub=True, hub_strategy="every_save", save_steps=0),
        ValueError,
        "save_steps=0",
    ),
]


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


CASES = CONFIG_CASES + DATA_CASES + MODEL_CASES + RESUME_CASES + GUARD_CASES + CLI_CASES + HUB_CASES + DEVICE_CASES


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
