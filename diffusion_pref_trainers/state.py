"""Training state and callbacks: transformers' `TrainerState`, `TrainerControl` and `TrainerCallback`.

The state is transformers' `TrainerState` (the fields its callbacks read) plus the counts an exact resume needs;
it is written as `trainer_state.json` into every checkpoint. Callbacks are `transformers.TrainerCallback` objects,
called with transformers' signature `(args, state, control, **kwargs)`.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers.trainer_callback import TrainerCallback, TrainerControl
from transformers.trainer_callback import TrainerState as TransformersTrainerState

__all__ = ["STATE_FILE", "TrainerCallback", "TrainerControl", "TrainerState", "check_callback"]

STATE_FILE = "trainer_state.json"
# The hooks the loop calls; a callback's own versions of them must take transformers' arguments.
HOOKS = (
    "on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
    "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_evaluate", "on_log", "on_save",
)  # fmt: skip


@dataclass
class TrainerState(TransformersTrainerState):
    """transformers' `TrainerState`, plus the counts of specially handled rows and skipped steps (resumed exactly)."""

    skipped_rows: int = 0
    empty_prompts: int = 0
    truncated_prompts: int = 0
    dropped_ties: int = 0
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm, in all
    nonfinite_streak: list[int] = field(default_factory=list)  # the steps of the current run of such skips

    def save(self, folder: str | Path) -> None:
        """Write the state as JSON into `folder`."""
        Path(folder, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> TrainerState:
        """Read a state written by `save`."""
        return cls(**json.loads(Path(folder, STATE_FILE).read_text()))


def check_callback(callback: Any) -> TrainerCallback:
    """A callback instance (a class is instantiated, as transformers does) whose hooks take transformers' arguments.

    Hooks written for this package's earlier signature (`on_step_end(self, trainer)`) are refused by name.
    """
    callback = callback() if isinstance(callback, type) else callback
    if not isinstance(callback, TrainerCallback):
        raise TypeError(
            f"callbacks must be transformers.TrainerCallback objects, got a {type(callback).__name__}: subclass "
            "transformers.TrainerCallback (or diffusion_pref_trainers.TrainerCallback, the same class)."
        )
    for name in HOOKS:
        try:
            inspect.signature(getattr(callback, name)).bind_partial(None, None, None)
        except TypeError:
            raise TypeError(
                f"{type(callback).__name__}.{name} does not take transformers' arguments: hooks are called as "
                f"`{name}(self, args, state, control, **kwargs)` (the trainer is no longer passed: read "
                "`state`, `args` and the kwargs `model`, `optimizer`, `lr_scheduler`, or give the callback the "
                "trainer when you create it)."
            ) from None
    return callback
