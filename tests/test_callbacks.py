"""transformers' callbacks in the loop: hooks and their arguments, control flags, state fields, `TrainOutput`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import EarlyStoppingCallback, PrinterCallback, TrainerCallback, TrainerControl
from transformers.trainer_utils import TrainOutput

from diffusion_pref_trainers import DiffusionDPOTrainer, TrainerState
from diffusion_pref_trainers.state import STATE_FILE
from diffusion_pref_trainers.testing import tiny_sd_pipeline


class Recorder(TrainerCallback):
    """Every hook called, with the step, and the arguments of the first call of each."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.first: dict[str, tuple[Any, Any, Any, dict[str, Any]]] = {}

    def _record(self, name: str, args: Any, state: Any, control: Any, kwargs: dict[str, Any]) -> None:
        self.events.append((name, state.global_step))
        self.first.setdefault(name, (args, state, control, kwargs))

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda args, state, control, **kwargs: self._record(name, args, state, control, kwargs)
        return super().__getattribute__(name)


class StopAt(TrainerCallback):
    """Sets one control flag at the end of step `step`."""

    def __init__(self, step: int, flag: str) -> None:
        self.step, self.flag = step, flag

    def on_step_end(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step == self.step:
            setattr(control, self.flag, True)


def _names(events: list[tuple[str, int]]) -> list[str]:
    return [name for name, _ in events]


def test_a_transformers_callback_gets_the_hooks_in_order_with_args_state_and_control(pairs, make_config) -> None:
    args = make_config(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, logging_steps=2)
    recorder = Recorder()
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, callbacks=[recorder])
    output = trainer.train()

    step = ["on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]
    expected = ["on_init_end", "on_train_begin", "on_epoch_begin", *step, *step, "on_log", "on_epoch_end"]
    assert _names(recorder.events) == [*expected, "on_train_end"]
    assert [s for name, s in recorder.events if name == "on_step_end"] == [1, 2]
    hook_args, state, control, kwargs = recorder.first["on_train_begin"]
    assert hook_args is trainer.args and state is trainer.state and isinstance(control, TrainerControl)
    assert kwargs["model"] is trainer._unwrapped and kwargs["optimizer"] is trainer.optimizer
    assert kwargs["lr_scheduler"] is trainer.lr_scheduler and kwargs["processing_class"] is trainer.pipe.tokenizer
    assert recorder.first["on_log"][3]["logs"]["step"] == 2
    assert (state.max_steps, state.num_train_epochs, state.train_batch_size) == (2, 1, 2)
    assert (state.logging_steps, state.is_world_process_zero, state.is_local_process_zero) == (2, True, True)
    assert isinstance(output, TrainOutput) and output.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert output.training_loss == pytest.approx(losses[0], rel=1e-5)  # one window of both steps
    assert set(output.metrics) == {
        "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch"
    }  # fmt: skip
    assert output.metrics["train_loss"] == output.training_loss and output.metrics["epoch"] == 1.0


def test_should_training_stop_ends_training_with_the_final_evaluation_and_save(pairs, make_config) -> None:
    args = make_config(per_device_train_batch_size=2, max_steps=4)
    recorder = Recorder()
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)
    trainer.add_callback(StopAt(2, "should_training_stop"))
    trainer.add_callback(recorder)
    output = trainer.train()
    assert output.global_step == 2 == trainer.state.global_step
    # Step 2's log, the epoch's end, then the final evaluation and save as after any run.
    assert _names(recorder.events)[-5:] == ["on_log", "on_epoch_end", "on_evaluate", "on_log", "on_train_end"]
    assert Path(args.output_dir, "pytorch_lora_weights.safetensors").is_file()


def test_should_save_writes_a_checkpoint_now_and_should_evaluate_evaluates(pairs, make_config) -> None:
    args = make_config(per_device_train_batch_size=2, max_steps=3, save_steps=0, logging_steps=10)
    callbacks = [StopAt(1, "should_save"), StopAt(1, "should_evaluate"), StopAt(2, "should_log")]
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs, callbacks=callbacks)
    trainer.train()
    checkpoint = Path(args.output_dir, "checkpoint-1")
    assert sorted(path.name for path in Path(args.output_dir).glob("checkpoint-*")) == ["checkpoint-1"]
    assert TrainerState.load(checkpoint).global_step == 1
    evaluated = [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]
    logged = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert evaluated == [1, 3] and logged == [2, 3]  # the final step's log and evaluation, as always


def _early_stopping(pairs: Any, args: Any, monkeypatch: pytest.MonkeyPatch, losses: list[float]) -> Any:
    """A trainer with `EarlyStoppingCallback(early_stopping_patience=2)` whose evaluations give `losses`."""
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=2))
    measure, scripted = trainer._measure, iter(losses)
    monkeypatch.setattr(trainer, "_measure", lambda dataset: {**measure(dataset), "eval_loss": next(scripted)})
    return trainer


def test_early_stopping_callback_stops_on_a_metric_that_does_not_improve(pairs, make_config, monkeypatch) -> None:
    args = make_config(
        per_device_train_batch_size=2, max_steps=8, eval_strategy="steps", eval_steps=1, save_steps=1,
        save_total_limit=1, metric_for_best_model="loss",
    )  # fmt: skip
    trainer = _early_stopping(pairs, args, monkeypatch, [0.5, 0.4, 0.45, 0.6, 0.3])
    trainer.train()
    assert trainer.state.global_step == 4  # 0.45 and 0.6 do not beat 0.4
    assert (trainer.state.best_metric, trainer.state.best_global_step) == (0.4, 2)
    best = str(Path(args.output_dir, "checkpoint-2"))
    assert trainer.state.best_model_checkpoint == best
    # save_total_limit keeps the best checkpoint as well as the newest, as transformers.
    assert sorted(path.name for path in Path(args.output_dir).glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    saved = TrainerState.load(Path(args.output_dir, "checkpoint-4"))
    assert saved.best_model_checkpoint == best
    assert saved.stateful_callbacks["EarlyStoppingCallback"]["attributes"] == {"early_stopping_patience_counter": 2}


def test_early_stopping_resumes_its_patience_count(pairs, make_config, monkeypatch) -> None:
    args = make_config(
        per_device_train_batch_size=2,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=1,
        save_steps=1,
        metric_for_best_model="loss",
    )
    _early_stopping(pairs, args, monkeypatch, [0.5, 0.4, 0.45, 0.6]).train()
    resumed = _early_stopping(pairs, args, monkeypatch, [0.7])
    resumed.train(resume_from_checkpoint=str(Path(args.output_dir, "checkpoint-3")))  # patience count 1 there
    assert resumed.state.global_step == 4 and resumed.state.best_metric == 0.4


def test_add_pop_and_remove_callback_take_a_class_or_an_instance(tiny_pipe_dir, pairs, make_config) -> None:
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, make_config(), pairs)
    recorder = Recorder()
    trainer.add_callback(PrinterCallback)
    trainer.add_callback(recorder)
    names = [type(callback).__name__ for callback in trainer.callback_handler.callbacks]
    assert names == ["StepSchedule", "PrinterCallback", "Recorder"]
    assert isinstance(trainer.pop_callback(PrinterCallback), PrinterCallback)
    assert trainer.pop_callback(recorder) is recorder
    trainer.add_callback(recorder)
    trainer.remove_callback(Recorder)
    assert [type(callback).__name__ for callback in trainer.callback_handler.callbacks] == ["StepSchedule"]


def test_a_callback_written_for_the_trainer_signature_is_refused_by_name(tiny_pipe_dir, pairs, make_config) -> None:
    class Old(TrainerCallback):
        def on_step_end(self, trainer: Any) -> None:
            pass

    with pytest.raises(TypeError, match=r"Old.on_step_end does not take transformers' arguments"):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(), pairs, callbacks=[Old()])
    with pytest.raises(TypeError, match="must be transformers.TrainerCallback objects"):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(), pairs, callbacks=[object()])


def test_should_epoch_stop_is_refused(pairs, make_config) -> None:
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), pairs, callbacks=[StopAt(1, "should_epoch_stop")])
    with pytest.raises(ValueError, match="should_epoch_stop"):
        trainer.train()


def test_optimizers_are_the_ones_given(pairs, make_config) -> None:
    probe = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), pairs)
    params = probe.trainable_parameters
    optimizer = torch.optim.SGD(params, lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), pairs, optimizers=(optimizer, scheduler))
    assert trainer.optimizer.optimizer is optimizer and trainer.lr_scheduler is scheduler
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert rates == pytest.approx([0.05, 0.005])
    with pytest.raises(ValueError, match=r"optimizers=\(None, lr_scheduler\)"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), pairs, optimizers=(None, scheduler))


def test_the_state_file_keeps_transformers_fields_and_the_resume_counts(tmp_path) -> None:
    state = TrainerState(global_step=3, best_metric=0.2, nonfinite_steps=1, nonfinite_streak=[3], skipped_rows=2)
    state.save(tmp_path)
    assert TrainerState.load(tmp_path) == state
    assert {"best_model_checkpoint", "stateful_callbacks", "nonfinite_streak"} <= set(
        json.loads(Path(tmp_path, STATE_FILE).read_text())
    )
    assert {field.name for field in dataclasses.fields(TrainerState)} >= {"trial_name", "eval_steps", "log_history"}


def test_best_model_settings_as_transformers(make_config) -> None:
    assert make_config(metric_for_best_model="loss").greater_is_better is False
    assert make_config(metric_for_best_model="rewards/accuracies").greater_is_better is True
    with pytest.raises(ValueError, match="`load_best_model_at_end=True` is not supported"):
        make_config(load_best_model_at_end=True)


def test_metric_for_best_model_needs_an_eval_set(tiny_pipe_dir, pairs, make_config) -> None:
    with pytest.raises(ValueError, match="`metric_for_best_model='loss'` tracks an evaluation metric"):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(metric_for_best_model="loss"), pairs)
