"""TrainingArguments' names on the configs: each has its TRL meaning, and every other one is refused by name."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer, DiffusionKTOConfig
from diffusion_pref_trainers.configs import DiffusionRPOConfig
from diffusion_pref_trainers.optim import build_optimizer, build_scheduler
from diffusion_pref_trainers.testing import tiny_sd_pipeline
from diffusion_pref_trainers.trl_names import FORMER, REFUSED, RENAMED, trl_users_page

ROOT = Path(__file__).resolve().parents[1]
OURS = {item.name for item in dataclasses.fields(DiffusionRPOConfig)}


def test_every_training_arguments_field_is_same_renamed_or_refused() -> None:
    theirs = {item.name for item in dataclasses.fields(TrainingArguments)}
    assert theirs - OURS - set(RENAMED) - set(REFUSED) == set()
    assert set(RENAMED) | set(REFUSED) <= theirs - OURS  # no stale entry, none for a field we have
    assert set(RENAMED.values()) <= OURS
    assert not set(FORMER) & (theirs | OURS)


def test_trl_users_page_matches_the_table() -> None:
    page = (ROOT / "docs" / "trl_users.md").read_text()
    regenerate = "python -m diffusion_pref_trainers.trl_names > docs/trl_users.md"
    assert page == trl_users_page(TrainingArguments, DiffusionRPOConfig), f"stale page: run `{regenerate}`"


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"fsdp": "full_shard"}, "`fsdp` is a TrainingArguments setting DiffusionDPOConfig does not use: launch"),
        ({"deepspeed": "ds.json"}, "accelerate config"),
        ({"gradient_checkpointing_kwargs": {"use_reentrant": False}}, "set `gradient_checkpointing=True`"),
        ({"activation_checkpointing": True}, "pass `gradient_checkpointing`"),
        ({"warmup_ratio": 0.1}, "as `warmup_steps`"),
        ({"evaluation_strategy": "steps"}, "pass `eval_strategy`"),
        ({"learnin_rate": 1e-4}, "unexpected keyword argument `learnin_rate`. Did you mean `learning_rate`?"),
    ],
)
def test_names_the_trainer_does_not_honour_are_refused_by_name(overrides: dict, phrase: str) -> None:
    with pytest.raises(TypeError) as error:
        DiffusionDPOConfig(**overrides)
    assert phrase in str(error.value)


def test_a_dpo_name_on_another_method_says_which_configs_have_it() -> None:
    with pytest.raises(TypeError, match="DiffusionKTOConfig does not use"):
        DiffusionKTOConfig(label_smoothing_factor=0.1)


def test_bf16_and_fp16_are_mixed_precision() -> None:
    assert DiffusionDPOConfig(bf16=True).mixed_precision == "bf16"
    assert DiffusionDPOConfig(fp16=True).mixed_precision == "fp16"
    assert DiffusionDPOConfig(mixed_precision="bf16").bf16
    assert not DiffusionDPOConfig().bf16
    with pytest.raises(ValueError, match="`bf16=True` contradicts `mixed_precision='fp16'`"):
        DiffusionDPOConfig(bf16=True, mixed_precision="fp16")
    with pytest.raises(ValueError, match="both True"):
        DiffusionDPOConfig(bf16=True, fp16=True)


def _parameters() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(64))]


@pytest.mark.parametrize(("warmup", "expected"), [(0.1, 2), (0.25, 5), (3, 3), (0, 0)])
def test_warmup_below_one_is_a_ratio_of_the_total_steps(warmup: float, expected: int) -> None:
    args = DiffusionDPOConfig(learning_rate=1.0, warmup_steps=warmup, lr_scheduler_type="constant_with_warmup")
    optimizer = build_optimizer(args, _parameters())
    scheduler = build_scheduler(args, optimizer, total_steps=20)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates.index(1.0) == expected


def test_lr_scheduler_kwargs_reach_the_schedule_and_unknown_keys_are_refused() -> None:
    args = DiffusionDPOConfig(
        learning_rate=1.0, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.5}
    )
    optimizer = build_optimizer(args, _parameters())
    scheduler = build_scheduler(args, optimizer, total_steps=4)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5)
    args = DiffusionDPOConfig(lr_scheduler_type="linear", lr_scheduler_kwargs={"num_cycles": 2})
    with pytest.raises(ValueError, match=r"keys \['num_cycles'\] are not arguments of lr_scheduler_type='linear'"):
        build_scheduler(args, build_optimizer(args, _parameters()), total_steps=4)
    with pytest.raises(ValueError, match="constant_with_warmup"):
        DiffusionDPOConfig(lr_scheduler_type="constant", warmup_steps=10)


@pytest.mark.parametrize(
    ("optim", "class_name"),
    [
        ("adamw_torch", "AdamW"),
        ("adamw_torch_fused", "AdamW"),
        ("adamw_8bit", "AdamW8bit"),
        ("adamw_bnb_8bit", "AdamW8bit"),
        ("paged_adamw_8bit", "PagedAdamW8bit"),
        ("paged_adamw_32bit", "PagedAdamW32bit"),
        ("adafactor", "Adafactor"),
        ("sgd", "SGD"),
    ],
)
def test_optim_names_build_their_optimizer(optim: str, class_name: str) -> None:
    if "8bit" in optim or "32bit" in optim:
        pytest.importorskip("bitsandbytes")
    params = _parameters()
    optimizer = build_optimizer(DiffusionDPOConfig(optim=optim, learning_rate=0.1, weight_decay=0.0), params)
    assert type(optimizer).__name__ == class_name
    assert bool(optimizer.defaults.get("fused")) == (optim == "adamw_torch_fused")
    params[0].grad = torch.ones(64)
    paged_on_cpu = pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU")
    with paged_on_cpu if optim.startswith("paged") else contextlib.nullcontext():
        optimizer.step()
    assert (params[0] < 1).all()


def test_optim_args_reach_the_optimizer_and_a_wrong_one_is_named() -> None:
    optimizer = build_optimizer(
        DiffusionDPOConfig(optim="sgd", optim_args="momentum=0.9, nesterov=true"), _parameters()
    )
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True
    with pytest.raises(TypeError, match="`optim_args='colour=1'` does not fit SGD"):
        build_optimizer(DiffusionDPOConfig(optim="sgd", optim_args="colour=1"), _parameters())
    with pytest.raises(ValueError, match="galore_adamw"):
        DiffusionDPOConfig(optim="galore_adamw")


def _steps(history: list[dict], key: str) -> list[int]:
    return [entry["step"] for entry in history if key in entry]


def test_eval_and_logging_schedules(pairs, make_config) -> None:
    args = make_config(
        max_steps=4, logging_steps=3, logging_first_step=True, eval_steps=2, eval_on_start=True, eval_noise_draws=1
    )
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)
    trainer.train()
    history = trainer.state.log_history
    assert _steps(history, "eval_loss") == [0, 2, 4]  # before step 1, on schedule, no repeat at the end
    assert _steps(history, "loss") == [1, 3, 4]


def test_epoch_strategies_evaluate_and_save_at_each_epoch_end(pairs, make_config) -> None:
    args = make_config(max_steps=3, eval_strategy="epoch", save_strategy="epoch", save_steps=1, eval_noise_draws=1)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)  # 2 steps per epoch
    trainer.train()
    history = trainer.state.log_history
    assert _steps(history, "eval_loss") == [2, 3]  # the epoch's end, then the end of training
    assert sorted(path.name for path in Path(args.output_dir).glob("checkpoint-*")) == ["checkpoint-2"]


def test_strategy_no_never_evaluates_nor_saves(pairs, make_config) -> None:
    args = make_config(eval_strategy="no", save_strategy="no", save_steps=1)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)
    trainer.train()
    assert _steps(trainer.state.log_history, "eval_loss") == []
    assert not list(Path(args.output_dir).glob("checkpoint-*"))


def test_evaluation_asked_without_an_eval_set_is_an_error(pairs, make_config) -> None:
    with pytest.raises(ValueError, match="`eval_on_start` asks for evaluation, but there is no eval set"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(eval_on_start=True), pairs)


def _first_step(pairs, make_config, **overrides) -> tuple[list[str], list[int]]:
    """The prompts of the first batch and the seed of its noise generator."""
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(max_steps=1, **overrides), pairs)
    seen: list = []
    errors = trainer.denoising_errors

    def record(batch, generator, **kwargs):
        seen.append((list(batch["prompt"]), generator.initial_seed()))
        return errors(batch, generator, **kwargs)

    trainer.denoising_errors = record
    trainer.train()
    return seen[0]


def test_data_seed_changes_the_data_order_but_not_the_noise(pairs, make_config) -> None:
    prompts_a, noise_a = _first_step(pairs, make_config, data_seed=1)
    prompts_b, noise_b = _first_step(pairs, make_config, data_seed=2, overwrite_output_dir=True)
    assert prompts_a != prompts_b
    assert noise_a == noise_b
