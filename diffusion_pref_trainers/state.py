"""Training state (TRL-like `state.log_history`) and the callback protocol."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands: enough to resume exactly and to read the run's history."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
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


class TrainerCallback:
    """Hooks called by the trainer; override the ones you need (all default to doing nothing).

    Between `on_train_begin` and `on_train_end` a cached run keeps its idle encoders on the CPU
    (`offload_cached_encoders`): a hook that generates with `trainer.pipe` does it inside
    `with trainer.encoder_offload.on_device():`.
    """

    def on_train_begin(self, trainer: Any) -> None:
        """Called once before the first step."""

    def on_step_end(self, trainer: Any) -> None:
        """Called after every optimizer step."""

    def on_log(self, trainer: Any, logs: dict[str, float]) -> None:
        """Called with each dict appended to `state.log_history`."""

    def on_save(self, trainer: Any, checkpoint_dir: str) -> None:
        """Called after a checkpoint is complete on disk."""

    def on_train_end(self, trainer: Any) -> None:
        """Called once after the last step and the final save."""
