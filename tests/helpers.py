"""Test helpers shared by several test files (imported as `helpers`: pytest puts this folder on `sys.path`)."""

from __future__ import annotations

from typing import Any

from diffusion_pref_trainers import TrainerCallback


class Interrupted(Exception):
    """Stands for a job killed between two steps."""


class InterruptAt(TrainerCallback):
    """Interrupts training after the optimizer step `step` (and after its checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise Interrupted
