"""The non-finite guard: a NaN step is skipped and counted, a run of them stops training, and nothing non-finite (or
half-written) is ever saved."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_pref_trainers import DiffusionDPOTrainer, TrainerCallback, adapters, checkpoints
from diffusion_pref_trainers.state import STATE_FILE

LORA_FILE = "pytorch_lora_weights.safetensors"


class _WeightsPerStep(TrainerCallback):
    """Copies of the trainable weights after every optimizer step, by step."""

    def __init__(self) -> None:
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module, **kwargs: Any) -> None:
        trained = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        self.weights[state.global_step] = trained


def _poison_policy(trainer: DiffusionDPOTrainer, monkeypatch: pytest.MonkeyPatch, from_call: int, calls: int) -> None:
    """Make the policy forwards number `from_call` .. `from_call + calls - 1` (1-based) return NaN."""
    predict, seen = trainer.family.predict, []

    def poisoned(denoiser, *args: Any) -> torch.Tensor:
        pred = predict(denoiser, *args)
        if torch.is_grad_enabled():  # the policy's forward; the reference runs without gradients
            seen.append(1)
            if from_call <= len(seen) < from_call + calls:
                return pred * float("nan")
        return pred

    monkeypatch.setattr(trainer.family, "predict", poisoned)


def _plain_mode() -> int:
    """The permissions `open()` gives a new file: 0o666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _all_finite(tensors: Any) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in tensors)


def test_a_nan_micro_batch_skips_its_step_and_training_goes_on(
    tiny_pipe_dir, pairs, make_config, monkeypatch, caplog
) -> None:
    recorder = _WeightsPerStep()
    config = make_config(per_device_train_batch_size=2, max_steps=4, save_steps=2)
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, config, pairs, callbacks=[recorder])
    _poison_policy(trainer, monkeypatch, from_call=2, calls=1)  # step 2's only micro-batch
    with caplog.at_level(logging.WARNING):
        trainer.train()
    state = trainer.state

    assert state.global_step == 4 and state.nonfinite_steps == 1 and state.nonfinite_streak == []
    assert "Step 2: the loss or gradient norm is not finite" in caplog.text
    # the skipped step changed no weight and no optimizer moment; the steps around it trained
    weights = recorder.weights
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights[2], weights[3], strict=True))
    assert all(int(s["step"]) == 3 for s in trainer.optimizer.state.values())
    assert trainer.lr_scheduler.last_epoch == 4  # the schedule counts the skipped step
    assert _all_finite(weights[4])
    # logs: the running count, and no NaN loss from the skipped step
    history = [entry for entry in state.log_history if "train/nonfinite_steps" in entry]
    assert [entry["train/nonfinite_steps"] for entry in history] == [0.0, 1.0, 1.0, 1.0]
    assert "loss" not in history[1] and all(math.isfinite(entry["loss"]) for entry in history if "loss" in entry)
    saved = json.loads((Path(config.output_dir) / "checkpoint-2" / STATE_FILE).read_text())
    assert saved["nonfinite_steps"] == 1 and saved["nonfinite_streak"] == [2]
    assert _all_finite(load_file(str(Path(config.output_dir) / LORA_FILE)).values())


def test_steps_that_stay_nan_stop_training_and_keep_the_last_finite_checkpoint(
    tiny_pipe_dir, pairs, make_config, monkeypatch
) -> None:
    config = make_config(
        per_device_train_batch_size=2, max_steps=8, save_steps=1, save_total_limit=1, max_nonfinite_steps=2
    )
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, config, pairs)
    _poison_policy(trainer, monkeypatch, from_call=2, calls=100)
    with pytest.raises(RuntimeError, match=r"2 optimizer steps in a row \(steps \[2, 3\]\)") as raised:
        trainer.train()
    assert "learning_rate" in str(raised.value)

    out = Path(config.output_dir)
    assert checkpoints.list_checkpoints(out) == [out / "checkpoint-2"]  # step 2 was skipped: step 1's weights
    assert _all_finite(load_file(str(out / "checkpoint-2" / adapters.ADAPTER_FILE)).values())
    assert not (out / LORA_FILE).exists()


def test_a_learning_rate_that_diverges_stops_training(tiny_pipe_dir, pairs, make_config) -> None:
    config = make_config(per_device_train_batch_size=2, max_steps=8, learning_rate=1e6, max_grad_norm=0.0)
    with pytest.raises(RuntimeError, match="in a row"):
        DiffusionDPOTrainer(tiny_pipe_dir, config, pairs).train()
    assert not (Path(config.output_dir) / LORA_FILE).exists()


def test_non_finite_weights_are_never_saved(tiny_pipe_dir, pairs, make_config) -> None:
    config = make_config()
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, config, pairs)
    name, param = next((n, p) for n, p in trainer._unwrapped.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    with pytest.raises(RuntimeError, match=f"unet.{name}"):
        trainer.save_model()
    with pytest.raises(RuntimeError, match="non-finite"):
        trainer._save_checkpoint()
    assert not Path(config.output_dir).exists() or not any(Path(config.output_dir).iterdir())


def test_the_final_save_is_atomic_with_plain_permissions(tiny_pipe_dir, pairs, make_config, monkeypatch) -> None:
    config = make_config()
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, config, pairs)
    out = Path(trainer.save_model())
    before = (out / LORA_FILE).read_bytes()
    assert {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()} == {
        name: _plain_mode() for name in (LORA_FILE, "training_config.json", "run.json", "README.md")
    }

    with torch.no_grad():
        trainer.trainable_parameters[0].add_(1.0)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "model_card", crash)  # fails after the new weights are written
    with pytest.raises(OSError, match="disk full"):
        trainer.save_model()
    assert (out / LORA_FILE).read_bytes() == before  # the previous adapter, whole


def test_commit_flushes_the_checkpoint_to_disk_with_plain_permissions(tmp_path, monkeypatch) -> None:
    flushed: list[str] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    tmp = checkpoints.temporary_path(tmp_path, 3)
    (tmp / "sub").mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(tmp / "sub" / "weights.safetensors"))
    final = checkpoints.commit(tmp_path, 3)
    assert {str(tmp / "sub" / "weights.safetensors"), str(tmp / "sub"), str(tmp), str(tmp_path)} <= set(flushed)
    assert (final / "sub" / "weights.safetensors").stat().st_mode & 0o777 == _plain_mode()


def test_an_adapter_state_missing_weights_is_refused(tiny_pipe_dir, pairs, make_config, tmp_path) -> None:
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, make_config(), pairs)
    path = tmp_path / adapters.ADAPTER_FILE
    adapters.save_adapter_state(trainer._unwrapped, str(path))
    stored = load_file(str(path))
    dropped = sorted(stored)[0]
    del stored[dropped]
    save_file(stored, str(path))
    with pytest.raises(ValueError, match="missing") as raised:
        adapters.load_adapter_state(trainer._unwrapped, str(path))
    assert str(path) in str(raised.value) and dropped in str(raised.value)


def test_a_nan_on_one_process_skips_the_step_on_every_process(tmp_path, launch_two_processes) -> None:
    launch_two_processes("ddp_nonfinite.py", str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["nonfinite_steps"] == 1 and report["optimizer_steps"] == [2]
        assert report["logged"] == [0.0, 1.0, 1.0]
        assert all(math.isfinite(value) for value in report["weights"])
    assert reports[0]["weights"] == reports[1]["weights"]  # still in lockstep
