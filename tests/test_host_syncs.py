"""The training step reads one flag back from the device, the non-finite guard's (may this step update the weights?);
its metrics stay there until a logging step reads them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

from diffusion_pref_trainers import DiffusionDPOTrainer
from diffusion_pref_trainers.testing import tiny_sd_pipeline

# The tensor methods that copy a value to the host: on a GPU each one waits for every queued kernel.
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


class StepReads:
    """Counts, per optimizer step, reads to the host of tensors that live on the training device.

    Two kinds of tensor stay on the host whatever the device, so reading them waits for nothing: the batch
    the data loader collates (moved to the device inside the step, never read back) and the optimizer's step
    counters (torch keeps them on the CPU unless the optimizer is fused or capturable).
    """

    def __init__(self, trainer: DiffusionDPOTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.trainer = trainer
        self.reads: Counter[int] = Counter()
        self.steps: set[int] = set()  # the steps watched
        self.step: int | None = None  # the optimizer step being run, None outside the step
        self.batch: list[torch.Tensor] = []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))
        # gradient_accumulation_steps=1: the micro-step of global step s-1 is optimizer step s, then its bookkeeping
        monkeypatch.setattr(trainer, "_train_micro_step", self._within(trainer._train_micro_step, 1))
        monkeypatch.setattr(trainer, "_after_optimizer_step", self._within(trainer._after_optimizer_step, 0))

    def _within(self, method: Callable[..., None], offset: int) -> Callable[..., None]:
        """`method`, with the reads it makes counted against the step it belongs to."""

        def run(*args: Any) -> None:
            self.step = self.trainer.state.global_step + offset
            self.steps.add(self.step)
            self.batch = [value for value in args[0].values() if isinstance(value, torch.Tensor)] if offset else []
            try:
                method(*args)
            finally:
                self.step = None

        return run

    def _counting(self, read: Callable[..., Any]) -> Callable[..., Any]:
        """`read`, counted when it happens inside a step on a tensor of the device."""

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.step is not None and not self._on_host(tensor):
                self.reads[self.step] += 1
            return read(tensor, *args, **kwargs)

        return counted

    def _on_host(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is one the loop keeps on the host on any device (see the class docstring)."""
        counters = [state.get("step") for state in self.trainer.optimizer.state.values()]
        return any(tensor is kept for kept in [*self.batch, *counters])


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_steps_that_do_not_log_read_only_the_guards_flag_back_from_the_device(
    pairs, make_config, monkeypatch, max_grad_norm
) -> None:
    config = make_config(per_device_train_batch_size=2, max_steps=4, logging_steps=2, max_grad_norm=max_grad_norm)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), config, pairs)
    counter = StepReads(trainer, monkeypatch)
    trainer.train()
    assert [log["step"] for log in trainer.state.log_history] == [2, 4]
    assert counter.steps == {1, 2, 3, 4}
    assert counter.reads[1] == counter.reads[3] == 1  # whether the step's loss and gradient norm are finite
    # the logging steps read the window's metrics and the data counts back: the one sync per log is seen
    assert counter.reads[2] > 0 and counter.reads[4] > 0
