"""The command line reads values as TRL's parser does: by the annotation of the field they set, never by guessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionRPOConfig
from diffusion_pref_trainers.cli import ScriptArguments, main, parse_overrides, read_recipe, split_settings


def _config(*tokens: str) -> Any:
    """The config the command line `tokens` builds."""
    return split_settings(parse_overrides(list(tokens)))[1]


@pytest.mark.parametrize(
    "tokens,field,expected",
    [
        (["--use_lora", "no"], "use_lora", False),
        (["--use-lora=false"], "use_lora", False),
        (["--use_lora", "Y"], "use_lora", True),
        (["--random_flip", "1"], "random_flip", True),
        (["--gradient_checkpointing"], "gradient_checkpointing", True),
        (["--gradient_checkpointing", "--seed", "3"], "gradient_checkpointing", True),
        (["--mixed_precision", "no"], "mixed_precision", "no"),
        (["--learning_rate", "1e-4"], "learning_rate", 1e-4),
        (["--learning_rate", "3"], "learning_rate", 3.0),
        (["--max_steps", "-1"], "max_steps", -1),
        (["--lora_target_modules", "to_q"], "lora_target_modules", ["to_q"]),
        (["--lora_target_modules", "[to_q, to_v]"], "lora_target_modules", ["to_q", "to_v"]),
        (["--validation_prompts", "a cat, in snow"], "validation_prompts", ["a cat, in snow"]),
        (["--report_to", "none"], "report_to", []),
        (["--save_total_limit", "none"], "save_total_limit", None),
        (["--hub_model_id", "123"], "hub_model_id", "123"),
        (["--column_mapping", "{text: prompt}"], "column_mapping", {"text": "prompt"}),
    ],
)
def test_values_are_typed_by_the_field_they_set(tokens: list[str], field: str, expected: Any) -> None:
    value = getattr(_config(*tokens), field)
    assert value == expected and type(value) is type(expected)


def test_script_arguments_are_typed_too() -> None:
    script, config = split_settings(parse_overrides(["--method", "rpo", "--builtin_pairs", "8", "--similarity",
                                                     "text", "--similarity_model_name_or_path", "none"]))  # fmt: skip
    assert isinstance(script, ScriptArguments) and script.builtin_pairs == 8
    assert isinstance(config, DiffusionRPOConfig) and config.similarity_model_name_or_path is None


@pytest.mark.parametrize(
    "tokens,message",
    [
        (["--max_steps", "2.5"], r"--max_steps 2.5: `max_steps` takes a whole number"),
        (["--use_lora", "maybe"], r"`use_lora` takes a boolean \(true/false, yes/no, 1/0\)"),
        (["--learning_rate", "fast"], r"`learning_rate` takes a number, e.g. 1e-4"),
        (["--max_steps"], r"Option --max_steps needs a value"),
        (["--max_steps", "--seed", "1"], r"Option --max_steps needs a value"),
        (["--mixed_precision", "yes"], r"`mixed_precision='yes'` is not supported"),
        (["--lora_alha", "4"], r"`lora_alha` \(did you mean lora_alpha"),
        (["--method", "ppo"], r"Unknown method 'ppo'; choose one of .*dpo.*rpo"),
    ],
)
def test_bad_command_lines_are_errors_naming_the_option(tokens: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(*tokens)


def test_a_value_without_its_option_is_rejected() -> None:
    with pytest.raises(ValueError, match="Expected an option like --learning_rate"):
        parse_overrides(["learning_rate", "1"])


def test_a_key_of_another_method_is_unknown_with_a_suggestion() -> None:
    with pytest.raises(ValueError, match=r"for method 'dpo': `similarity`"):
        split_settings({"method": "dpo", "similarity": "text"})


def test_recipes_are_typed_by_the_fields_they_set(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-5\nmixed_precision: no\nuse_lora: off\nlora_target_modules: to_q\n")
    config = split_settings(read_recipe(str(recipe)))[1]
    assert isinstance(config, DiffusionDPOConfig) and config.learning_rate == 1e-5
    assert (config.mixed_precision, config.use_lora, config.lora_target_modules) == ("no", False, ["to_q"])


@pytest.mark.parametrize(
    "text,error,message",
    [
        ("- a\n- b\n", ValueError, "must hold a mapping of settings, not a list"),
        ("max_steps: 2.5\n", TypeError, r"`max_steps` must be a whole number, got 2.5"),
        ("use_lora: maybe\n", ValueError, r"`use_lora` takes a boolean"),
    ],
)
def test_bad_recipes_are_errors_naming_the_setting(tmp_path: Path, text: str, error: type, message: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(error, match=message):
        split_settings(read_recipe(str(recipe)))


def test_a_missing_recipe_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.yaml does not exist: pass --config a YAML file"):
        read_recipe(str(tmp_path / "nowhere.yaml"))


def test_the_script_reports_a_bad_setting_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--config", "none.yaml", "--max_steps", "2"])
    assert exited.value.code == 2
    assert "error: Recipe none.yaml does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--max_steps", "2.5"])
    assert exited.value.code == 2
    assert "`max_steps` takes a whole number" in capsys.readouterr().err
