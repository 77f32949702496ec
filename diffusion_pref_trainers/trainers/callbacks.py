"""Callbacks as transformers' Trainer calls them: its `CallbackHandler`, `TrainerControl` and `TrainOutput`.

A mixin of `DiffusionPreferenceTrainer`. The loop's own schedule (`logging_steps`, `eval_strategy` and
`eval_steps`, `save_strategy` and `save_steps`, `eval_on_start`) is a `DefaultFlowCallback`, first in the list: it
sets the control flags at the start of training, at each step's end and at each epoch's end, the callbacks after it
may set or clear them, and the loop does what the flags say.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, ExportableState, TrainerControl
from transformers.trainer_utils import TrainOutput, speed_metrics

from diffusion_pref_trainers.state import TrainerCallback, TrainerState, check_callback


class StepSchedule(DefaultFlowCallback):
    """The loop's schedule, as transformers' `DefaultFlowCallback` sets it: `logging_steps` (and the last step, and
    the first with `logging_first_step`); with an eval set, `eval_on_start`, and `eval_strategy` by `eval_steps` or at
    each epoch's end; `save_strategy` by `save_steps` or at each epoch's end.

    An epoch's end counts only once its last batch has been trained on: the loop sets `epoch_complete` before
    `on_epoch_end` (a run stopping mid-epoch, at `max_steps` or by `should_training_stop`, ends no epoch).
    """

    def __init__(self, evaluates: bool) -> None:
        self.evaluates = evaluates
        self.epoch_complete = False

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        """`eval_on_start`: evaluate before the first step."""
        if self.evaluates and args.eval_on_start:
            control.should_evaluate = True
        return control

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        """Raise the flags due at this step."""
        step = state.global_step
        if step % args.logging_steps == 0 or step == state.max_steps or (step == 1 and args.logging_first_step):
            control.should_log = True
        if self.evaluates and args.eval_strategy == "steps" and args.eval_steps and step % args.eval_steps == 0:
            control.should_evaluate = True
        if args.save_strategy == "steps" and args.save_steps and step % args.save_steps == 0:
            control.should_save = True
        return control

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        """The 'epoch' strategies' evaluation and checkpoint, once the epoch's last batch has been trained on."""
        if self.epoch_complete:
            if self.evaluates and args.eval_strategy == "epoch":
                control.should_evaluate = True
            if args.save_strategy == "epoch":
                control.should_save = True
        return control


class CallbacksMixin:
    """`add_callback`, `pop_callback`, `remove_callback`, the events of the loop and what `train()` returns."""

    def _init_callbacks(self, callbacks: list[TrainerCallback] | None) -> None:
        """The handler (the schedule first, then `callbacks`) and a fresh control; fires `on_init_end`."""
        if self.args.metric_for_best_model is not None and self.eval_dataset is None:
            raise ValueError(
                f"`metric_for_best_model={self.args.metric_for_best_model!r}` tracks an evaluation metric, but no "
                "eval_dataset was given: pass eval_dataset= (or `dataset_test_split`), or unset metric_for_best_model."
            )
        schedule = StepSchedule(evaluates=self.eval_dataset is not None)
        self.callback_handler = CallbackHandler(
            [schedule, *(check_callback(callback) for callback in callbacks or [])],
            self._unwrapped, getattr(self.pipe, "tokenizer", None), self.optimizer, self.lr_scheduler,
        )  # fmt: skip
        self.control = TrainerControl()
        self._event("on_init_end")

    def add_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        """Add a callback (a class is instantiated), as transformers' `Trainer.add_callback`."""
        self.callback_handler.add_callback(check_callback(callback))

    def pop_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> TrainerCallback | None:
        """Remove and return the callback (the first of a class), as transformers' `Trainer.pop_callback`."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        """Remove the callback (the first of a class), as transformers' `Trainer.remove_callback`."""
        self.callback_handler.remove_callback(callback)

    def _event(self, name: str, **kwargs: Any) -> None:
        """Call `name` on every callback with transformers' arguments; keep the control they return."""
        self.callback_handler.lr_scheduler = self.lr_scheduler  # built by `train()`, after the handler
        self.control = getattr(self.callback_handler, name)(self.args, self.state, self.control, **kwargs)
        if self.control.should_epoch_stop:
            raise ValueError(
                "A callback set `control.should_epoch_stop`, which this loop does not honour (an exact resume counts "
                "an epoch's batches from `global_step`): set `control.should_training_stop` to end training."
            )

    def _end_epoch(self, complete: bool) -> None:
        """`on_epoch_end`, the schedule told whether the epoch's last batch was trained on (`complete`)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, StepSchedule):
                callback.epoch_complete = complete
        self._event("on_epoch_end")

    def _export_callback_states(self) -> None:
        """`state.stateful_callbacks`, as transformers writes it: each `ExportableState` callback's `state()` (a list
        for several of a class) and the control's."""
        states: dict[str, list[dict[str, Any]]] = {}
        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):
                states.setdefault(type(callback).__name__, []).append(callback.state())
        self.state.stateful_callbacks = {name: found[0] if len(found) == 1 else found for name, found in states.items()}

    def _restore_callback_states(self) -> None:
        """Give each `ExportableState` callback the attributes a checkpoint saved for it (in order, per class), so
        that e.g. `EarlyStoppingCallback`'s patience count resumes exactly."""
        seen: dict[str, int] = {}
        for callback in self.callback_handler.callbacks:
            name = type(callback).__name__
            saved = self.state.stateful_callbacks.get(name)
            if not isinstance(callback, ExportableState) or saved is None:
                continue
            saved = saved if isinstance(saved, list) else [saved]
            index, seen[name] = seen.get(name, 0), seen.get(name, 0) + 1
            if index < len(saved):
                for key, value in saved[index]["attributes"].items():
                    setattr(callback, key, value)

    def _track_best(self, metrics: dict[str, float]) -> None:
        """`state.best_metric` and `best_global_step` from `metric_for_best_model`, as transformers' Trainer."""
        name = self.args.metric_for_best_model
        if name is None:
            return
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise KeyError(
                f"`metric_for_best_model={name!r}` is not among the evaluation metrics ({', '.join(sorted(metrics))})"
                ": name one of them."
            )
        value, best = metrics[key], self.state.best_metric
        if best is None or (value > best if self.args.greater_is_better else value < best):
            self.state.best_metric, self.state.best_global_step = value, self.state.global_step

    def _train_output(self, start: float, first_step: int, loss_sum: torch.Tensor, kept: int) -> TrainOutput:
        """transformers' `TrainOutput`: the step, the mean loss of this run's kept steps, speed, loss and epoch."""
        steps = self.state.global_step - first_step
        loss = self.accelerator.reduce(loss_sum.to(self.accelerator.device), reduction="mean").item() / max(kept, 1)
        rows = steps * self.args.gradient_accumulation_steps * self.args.per_device_train_batch_size
        metrics = speed_metrics("train", start, num_samples=rows * self.accelerator.num_processes, num_steps=steps)
        metrics.update(train_loss=loss, epoch=self.state.epoch)
        return TrainOutput(self.state.global_step, loss, metrics)
