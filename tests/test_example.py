"""The example script and its command line: recipes, overrides, errors, and one real end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionRPOConfig
from diffusion_pref_trainers.cli import ScriptArguments, parse_command_line, run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def test_settings_split_into_script_arguments_and_the_method_config() -> None:
    script, config, _ = parse_command_line(["--method", "rpo", "--dataset_name", "x/y", "--beta", "10", "--similarity",
                                            "text"])  # fmt: skip
    assert script.dataset_name == "x/y"
    assert isinstance(config, DiffusionRPOConfig) and config.beta == 10.0 and config.similarity == "text"


def test_dataset_reading_settings_belong_to_the_config_not_the_script() -> None:
    assert [field.name for field in dataclasses.fields(ScriptArguments)] == [
        "method", "model_name_or_path", "dataset_name", "builtin_pairs", "toy_task", "toy_prompts"
    ]  # fmt: skip
    tokens = ["--method", "dpo", "--dataset_name", "x/y", "--dataset_config", "v2", "--dataset_train_split", "fit",
              "--dataset_test_split", "held", "--dataset_streaming", "--max_steps", "5",
              "--column_mapping", '{"text": "prompt"}']  # fmt: skip
    script, config, _ = parse_command_line(tokens)
    assert script.dataset_name == "x/y"
    assert (config.dataset_config, config.dataset_train_split, config.dataset_test_split) == ("v2", "fit", "held")
    assert config.dataset_streaming and config.column_mapping == {"text": "prompt"}


def test_a_local_dataset_runs_with_its_test_split_evaluated(tmp_path: Path) -> None:
    from diffusion_pref_trainers.testing import make_preference_dataset

    data = tmp_path / "data"
    datasets.DatasetDict(train=make_preference_dataset(4), test=make_preference_dataset(4, seed=1)).save_to_disk(data)
    summary = run(parse_command_line(["--method", "dpo", "--dataset_name", str(data), "--dataset_test_split", "test",
                                      "--resolution", "32", "--per_device_train_batch_size", "4", "--max_steps", "1",
                                      "--beta", "50", "--eval_noise_draws", "1", "--output_dir", str(tmp_path / "out"),
                                      "--save_steps", "0"]))  # fmt: skip
    assert summary["steps"] == 1
    assert summary["eval_before"]["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference
    assert "eval_loss" in summary["eval_after"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_shipped_recipe_is_a_valid_config(recipe: Path) -> None:
    script, config, _ = parse_command_line(["--config", str(recipe)])
    assert isinstance(config, DiffusionDPOConfig)  # RPO's config extends DPO's


def test_example_script_trains_on_the_builtin_kit_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = str(ROOT / "examples" / "configs" / "tiny_kit_rpo.yaml")
    command = [sys.executable, str(ROOT / "examples" / "train.py"), "--config", recipe, "--max_steps", "3",
               "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert summary["method"] == "rpo" and summary["steps"] == 3
    assert Path(summary["adapter"]) == out.resolve()
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()
    assert set(summary["eval_after"]) >= {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"}


def test_the_default_example_aligns_the_toy_pipeline_and_reports_rewards(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    command = [sys.executable, str(ROOT / "examples" / "train.py"), "--max_steps", "2", "--toy_prompts", "24",
               "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert summary["method"] == "rpo" and summary["task"] == "large" and summary["steps"] == 2
    assert all(0.0 <= summary[key] <= 1.0 for key in ("reward/base", "reward/aligned", "win_rate"))
    assert "held-out reward" in result.stdout and Path(summary["grid"]).is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_the_light_method_map_matches_the_trainers() -> None:
    from diffusion_pref_trainers.configs import METHOD_CONFIGS
    from diffusion_pref_trainers.trainers import TRAINERS

    assert METHOD_CONFIGS == {method: trainer.config_class for method, trainer in TRAINERS.items()}


def test_help_lists_every_setting_of_the_method_quickly_and_without_torch() -> None:
    # Runs the worktree's package (PYTHONPATH), then reports whether `--help` imported torch.
    script = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', '--method', 'dpo', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'examples' / 'train.py')!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    print('torch imported:', 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch imported: False" in result.stdout
    assert seconds < 20  # under 5 s on an idle machine; generous for loaded CI runners
    assert "Settings of method 'dpo': ScriptArguments, then DiffusionDPOConfig" in " ".join(result.stdout.split())
    for field in dataclasses.fields(DiffusionDPOConfig):
        assert f"--{field.name} " in result.stdout
    help_text = DiffusionDPOConfig.__dataclass_fields__["learning_rate"].metadata["help"]
    assert " ".join(help_text.split()[:3]) in " ".join(result.stdout.split())
