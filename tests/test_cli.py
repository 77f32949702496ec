"""The command line is TRL's `TrlParser`: values typed by the field they set, the method pre-parsed, errors naming
the setting."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trl

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionRPOConfig
from diffusion_pref_trainers.cli import ScriptArguments, main, parse_command_line
from diffusion_pref_trainers.config_fields import field_types
from diffusion_pref_trainers.configs import METHOD_CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def _config(*tokens: str) -> Any:
    """The config the command line `tokens` builds."""
    return parse_command_line(list(tokens)).config


def _recipe(tmp_path: Path, text: str) -> str:
    """A recipe file holding `text`."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "tokens,field,expected",
    [
        (["--use_lora", "no"], "use_lora", False),
        (["--use-lora=false"], "use_lora", False),
        (["--no_use_lora"], "use_lora", False),
        (["--use_lora", "Y"], "use_lora", True),
        (["--random_flip", "1"], "random_flip", True),
        (["--gradient_checkpointing"], "gradient_checkpointing", True),
        (["--gradient_checkpointing", "--seed", "3"], "gradient_checkpointing", True),
        (["--mixed_precision", "no"], "mixed_precision", "no"),
        (["--learning_rate", "1e-4"], "learning_rate", 1e-4),
        (["--learning_rate", "3"], "learning_rate", 3.0),
        (["--max_steps", "-1"], "max_steps", -1),
        (["--lora_target_modules", "to_q"], "lora_target_modules", ["to_q"]),
        (["--lora_target_modules", "to_q", "to_v"], "lora_target_modules", ["to_q", "to_v"]),
        (["--validation_prompts", "a cat, in snow"], "validation_prompts", ["a cat, in snow"]),
        (["--report_to", "none"], "report_to", []),
        (["--save_total_limit", "none"], "save_total_limit", None),
        (["--hub_model_id", "123"], "hub_model_id", "123"),
        (["--column_mapping", '{"text": "prompt"}'], "column_mapping", {"text": "prompt"}),
    ],
)
def test_values_are_typed_by_the_field_they_set(tokens: list[str], field: str, expected: Any) -> None:
    value = getattr(_config(*tokens), field)
    assert value == expected and type(value) is type(expected)


def test_the_method_picks_the_config_and_script_arguments_are_typed_too() -> None:
    script, config, given = parse_command_line(["--method", "rpo", "--builtin_pairs", "8", "--similarity", "text"])
    assert isinstance(script, ScriptArguments) and script.method == "rpo" and script.builtin_pairs == 8
    assert isinstance(config, DiffusionRPOConfig) and config.similarity == "text"
    assert given == {"method", "builtin_pairs", "similarity"}


def test_the_recipe_method_picks_the_config_and_the_command_line_wins(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "method: rpo\nsimilarity: text\nbeta: 10.0\nsimilarity_model_name_or_path: null\n")
    script, config, given = parse_command_line(["--config", recipe, "--beta", "20"])
    assert script.method == "rpo" and isinstance(config, DiffusionRPOConfig)
    assert (config.beta, config.similarity, config.similarity_model_name_or_path) == (20.0, "text", None)
    assert given == {"method", "similarity", "beta", "similarity_model_name_or_path"}
    recipe = _recipe(tmp_path, "method: rpo\nbeta: 10.0\n")
    script, config, _ = parse_command_line([f"--config={recipe}", "--method", "dpo"])
    assert script.method == "dpo" and type(config) is DiffusionDPOConfig and config.beta == 10.0


def test_the_recipe_env_section_sets_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPT_TEST_VARIABLE", raising=False)
    parse_command_line(["--config", _recipe(tmp_path, "env:\n  DPT_TEST_VARIABLE: 7\nmax_steps: 2\n")])
    assert os.environ["DPT_TEST_VARIABLE"] == "7"


@pytest.mark.parametrize(
    "tokens,error,message",
    [
        (["--max_steps", "2.5"], argparse.ArgumentError, r"argument --max_steps.*invalid int value: '2.5'"),
        (["--use_lora", "maybe"], argparse.ArgumentError, r"argument --use_lora.*Truthy value expected: got maybe"),
        (["--learning_rate", "fast"], argparse.ArgumentError, r"argument --learning_rate.*invalid float value"),
        (["--max_steps"], argparse.ArgumentError, r"argument --max_steps.*expected one argument"),
        (["--max_steps", "--seed", "1"], argparse.ArgumentError, r"argument --max_steps.*expected one argument"),
        (["--mixed_precision", "yes"], ValueError, r"`mixed_precision='yes'` is not supported"),
        (["--lora_alha", "4"], ValueError, r"for method 'dpo': `lora_alha` \(did you mean lora_alpha"),
        (["--lora_alp", "4"], ValueError, r"`lora_alp` \(did you mean lora_alpha"),  # no abbreviations
        (["--similarity", "text"], ValueError, r"Unknown settings for method 'dpo': `similarity`"),
        (["--method", "ppo"], ValueError, r"Unknown method 'ppo'; choose one of .*dpo.*rpo"),
        (["learning_rate", "1"], ValueError, r"values without an option \['learning_rate', '1'\]"),
        (["--column_mapping", "{text: prompt}"], ValueError, r"`column_mapping` takes .* a JSON object"),
        (["--column_mapping", "[1]"], TypeError, r"`column_mapping` must be a mapping of strings"),
    ],
)
def test_bad_command_lines_are_errors_naming_the_option(tokens: list[str], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _config(*tokens)


def test_recipes_are_typed_by_the_fields_they_set(tmp_path: Path) -> None:
    text = "learning_rate: 1e-5\nmixed_precision: no\nuse_lora: off\nlora_target_modules: to_q\nmax_steps: 3\n"
    config = parse_command_line(["--config", _recipe(tmp_path, text)]).config
    assert type(config) is DiffusionDPOConfig and config.learning_rate == 1e-5 and config.max_steps == 3
    assert (config.mixed_precision, config.use_lora, config.lora_target_modules) == ("no", False, ["to_q"])


@pytest.mark.parametrize(
    "text,error,message",
    [
        ("- a\n- b\n", ValueError, "must hold a mapping of settings, not a list"),
        ("max_steps: 2.5\n", TypeError, r"`max_steps` must be a whole number, got 2.5"),
        ("use_lora: maybe\n", argparse.ArgumentError, r"argument --use_lora.*Truthy value expected"),
        ("lora_alha: 4\n", ValueError, r"`lora_alha` \(did you mean lora_alpha"),
        ("method: ppo\n", ValueError, r"Unknown method 'ppo'"),
    ],
)
def test_bad_recipes_are_errors_naming_the_setting(tmp_path: Path, text: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        parse_command_line(["--config", _recipe(tmp_path, text)])


def test_a_missing_recipe_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.yaml does not exist: pass --config a YAML file"):
        parse_command_line(["--config", str(tmp_path / "nowhere.yaml")])


def test_the_script_reports_a_bad_setting_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for tokens, message in [
        (["--config", "none.yaml", "--max_steps", "2"], "error: Recipe none.yaml does not exist"),
        (["--max_steps", "2.5"], "invalid int value: '2.5'"),
        (["--lora_alha", "4"], "did you mean lora_alpha"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(tokens)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_dataset_reading_lives_in_the_config_only_and_script_names_are_trls() -> None:
    # TRL's ScriptArguments dataset_* fields are config fields here: one place only, and none of them twice.
    trl_dataset_fields = {name for name in field_types(trl.ScriptArguments) if name.startswith("dataset_")}
    assert trl_dataset_fields - {"dataset_name"} <= set(field_types(DiffusionDPOConfig))
    assert "dataset_name" in field_types(ScriptArguments)
    for config_class in METHOD_CONFIGS.values():
        assert not set(field_types(ScriptArguments)) & set(field_types(config_class))


def test_help_lists_every_setting_of_the_chosen_method_without_torch() -> None:
    # Runs the worktree's package (PYTHONPATH) as `python -m`; the installed `dpt-train` is the same `main`.
    script = (
        "import runpy, sys\n"
        "sys.argv = ['dpt-train', '--method', 'rpo', '--help']\n"
        "try:\n"
        "    runpy.run_module('diffusion_pref_trainers.cli', run_name='__main__')\n"
        "except SystemExit as exited:\n"
        "    print('exit', exited.code, 'torch imported:', 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert "exit 0 torch imported: False" in result.stdout, result.stderr[-3000:]
    assert "Settings of method 'rpo': ScriptArguments, then DiffusionRPOConfig" in " ".join(result.stdout.split())
    for name in [*field_types(ScriptArguments), *field_types(DiffusionRPOConfig)]:
        assert f"--{name} " in result.stdout


def test_the_console_script_names_the_command_line_main() -> None:
    entry = re.search(r'^dpt-train = "([\w.]+):(\w+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert entry is not None, "pyproject.toml's [project.scripts] must install dpt-train"
    assert getattr(importlib.import_module(entry[1]), entry[2]) is main
