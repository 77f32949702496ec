"""Configs reject bad values before any model is loaded, with a message that names the fix."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from diffusion_pref_trainers import (
    DiffusionDPOConfig,
    DiffusionKTOConfig,
    DiffusionRPOConfig,
    DiffusionTrainingConfig,
)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(beta=0.0), r"`beta` must be > 0.*default is 5000"),
        (dict(beta=-5.0), r"`beta` must be > 0"),
        (dict(loss_type="kto"), r"`loss_type='kto'` is not supported; choose one of sigmoid, hinge, ipo, robust"),
        (dict(per_device_train_batch_size=0), r"`per_device_train_batch_size` must be >= 1, got 0"),
        (dict(per_device_eval_batch_size=0), r"`per_device_eval_batch_size` must be >= 1"),
        (dict(gradient_accumulation_steps=0), r"`gradient_accumulation_steps` must be >= 1"),
        (dict(optim="galore_adamw"), r"`optim='galore_adamw'` is not supported; choose one of adamw_torch, adamw_"),
        (dict(mixed_precision="fp8"), r"`mixed_precision='fp8'` is not supported; choose one of no, fp16, bf16"),
        (dict(lr_scheduler_type="onecycle"), r"`lr_scheduler_type='onecycle'` is not supported; choose one of"),
        (dict(learning_rate=0.0), r"`learning_rate` must be > 0"),
        (dict(max_steps=0), r"Set `max_steps` to a positive number"),
        (dict(max_steps=-1, num_train_epochs=0), r"`num_train_epochs` > 0"),
        (dict(save_total_limit=0), r"`save_total_limit` must be None \(keep all\) or >= 1"),
        (dict(save_steps=-1), r"`save_steps` must be >= 0 \(0 disables"),
        (dict(logging_steps=0), r"`logging_steps` must be >= 1"),
        (dict(eval_noise_draws=0), r"`eval_noise_draws` must be >= 1"),
        (dict(resolution=4), r"`resolution` must be at least 8 pixels"),
        (dict(lora_rank=0), r"`lora_rank` must be >= 1"),
        (dict(lora_dropout=1.0), r"`lora_dropout` must be in \[0, 1\)"),
        (dict(max_grad_norm=-1.0), r"`max_grad_norm` must be >= 0 \(0 disables clipping\)"),
        (dict(label_smoothing=0.5), r"`label_smoothing` must be in \[0, 0.5\)"),
        (dict(loss_type="hinge", label_smoothing=0.1), r"`label_smoothing` only applies to loss_type='robust'"),
        (dict(sft_weight=-0.1), r"`sft_weight` must be >= 0"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_bad_values_raise_a_value_error_naming_the_fix(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        DiffusionDPOConfig(**overrides)


def test_adamw_8bit_without_bitsandbytes_says_how_to_install_it(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "bitsandbytes" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=r"pip install bitsandbytes.*optim='adamw_torch'"):
        DiffusionDPOConfig(optim="adamw_8bit")


def test_adamw_8bit_is_accepted_when_bitsandbytes_is_installed() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed here")
    assert DiffusionDPOConfig(optim="adamw_8bit").optim == "adamw_8bit"


@pytest.mark.parametrize("config_class", [DiffusionTrainingConfig, DiffusionDPOConfig])
def test_every_field_has_help_text(config_class) -> None:
    missing = [f.name for f in dataclasses.fields(config_class) if not f.metadata.get("help", "").strip()]
    assert missing == []


def test_dpo_defaults_follow_the_paper() -> None:
    args = DiffusionDPOConfig()
    # beta None: the model family's default, resolved by the trainer (5000 for SD, see test_trainer.py)
    assert (args.beta, args.loss_type, args.label_smoothing, args.sft_weight) == (None, "sigmoid", 0.0, 0.0)
    assert args.swap_preferences is False


def test_label_smoothing_is_accepted_for_robust_and_sigmoid() -> None:
    assert DiffusionDPOConfig(loss_type="robust", label_smoothing=0.1).label_smoothing == 0.1
    assert DiffusionDPOConfig(loss_type="sigmoid", label_smoothing=0.1).label_smoothing == 0.1


def test_report_to_accepts_a_string_like_trl() -> None:
    assert DiffusionDPOConfig(report_to="none").report_to == []
    assert DiffusionDPOConfig(report_to="tensorboard").report_to == ["tensorboard"]


def test_to_dict_never_carries_the_hub_token() -> None:
    values = DiffusionDPOConfig(hub_token="hf_secret", beta=10.0).to_dict()
    assert "hub_token" not in values
    assert "hf_secret" not in repr(values)
    assert values["beta"] == 10.0


def test_mutable_defaults_are_not_shared_between_configs() -> None:
    first, second = DiffusionDPOConfig(), DiffusionDPOConfig()
    first.report_to.append("wandb")
    assert second.report_to == []


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(max_steps=2.5), r"`max_steps` must be a whole number, got 2.5 \(float\)"),
        (dict(lora_rank=4.5), r"`lora_rank` must be a whole number, got 4.5"),
        (dict(seed="3"), r"`seed` must be a whole number, got '3' \(str\)"),
        (dict(per_device_train_batch_size=True), r"`per_device_train_batch_size` must be a whole number, got True"),
        (dict(save_total_limit=2.0), r"`save_total_limit` must be a whole number or None, got 2.0"),
        (dict(learning_rate="1e-3"), r"`learning_rate` must be a number, e.g. 1e-4, got '1e-3' \(str\)"),
        (dict(beta=False), r"`beta` must be a number, e.g. 1e-4 or None, got False \(bool\)"),
        (dict(use_lora="no"), r"`use_lora` must be True or False, got 'no' \(str\)"),
        (dict(gradient_checkpointing=1), r"`gradient_checkpointing` must be True or False, got 1 \(int\)"),
        (dict(output_dir=None), r"`output_dir` must be a string, got None"),
        (dict(mixed_precision=False), r"`mixed_precision` must be a string, got False"),
        (dict(hub_model_id=3), r"`hub_model_id` must be a string or None, got 3"),
        (dict(report_to=5), r"`report_to` must be a list of strings \(or one string\), got 5"),
        (dict(lora_target_modules=3), r"`lora_target_modules` must be a list of strings \(or one string\) or None"),
        (dict(validation_prompts=["a", 2]), r"`validation_prompts` must be a list of strings"),
        (dict(column_mapping=[("a", "b")]), r"`column_mapping` must be a mapping of strings to strings or None"),
        (
            dict(column_mapping='["a"]'),
            r"`column_mapping` must be a mapping of strings to strings or None, got \['a'\]",
        ),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_values_of_the_wrong_type_name_the_field_the_value_and_the_type(overrides, message) -> None:
    with pytest.raises(TypeError, match=message):
        DiffusionDPOConfig(**overrides)


@pytest.mark.parametrize(
    "overrides,field,expected",
    [
        (dict(learning_rate=1), "learning_rate", 1.0),
        (dict(beta=100), "beta", 100.0),
        (dict(lora_target_modules="to_q"), "lora_target_modules", ["to_q"]),
        (dict(lora_target_modules=("to_q", "to_v")), "lora_target_modules", ["to_q", "to_v"]),
        (dict(validation_prompts="a cat"), "validation_prompts", ["a cat"]),
        (dict(output_dir=Path("runs/a")), "output_dir", "runs/a"),
        (dict(save_total_limit=None), "save_total_limit", None),
        (dict(max_steps=np.int64(5)), "max_steps", 5),
        (dict(learning_rate=np.float32(0.5)), "learning_rate", 0.5),
        (dict(column_mapping='{"a": "prompt"}'), "column_mapping", {"a": "prompt"}),  # TRL's dict | str: JSON text
        (dict(report_to=["none"]), "report_to", []),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_values_of_a_compatible_type_are_converted(overrides, field, expected) -> None:
    value = getattr(DiffusionDPOConfig(**overrides), field)
    assert value == expected and type(value) is type(expected)


def test_mapping_text_that_is_not_json_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"`column_mapping` takes a mapping, or a JSON object as text .*not JSON"):
        DiffusionDPOConfig(column_mapping="{a: prompt}")


def test_subclass_fields_are_type_checked_too() -> None:
    with pytest.raises(TypeError, match=r"`distance_temperature` must be a number"):
        DiffusionRPOConfig(distance_temperature="0.5", similarity="text", similarity_model_name_or_path=None)
    with pytest.raises(TypeError, match=r"`desirable_weight` must be a number"):
        DiffusionKTOConfig(desirable_weight="2")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(lora_alpha=0), r"`lora_alpha` must be > 0, got 0.*trains nothing"),
        (dict(seed=-1), r"`seed` must be >= 0, got -1"),
        (dict(output_dir=""), r"`output_dir` is empty"),
        (dict(output_dir=" "), r"`output_dir` is empty"),
    ],
)
def test_ranges_of_lora_alpha_seed_and_output_dir(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        DiffusionDPOConfig(**overrides)


def test_an_output_dir_that_is_a_file_is_rejected(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt'` is a file: it must name a folder"):
        DiffusionDPOConfig(output_dir=str(path))
