"""The output folder belongs to one run: no stale checkpoint is resumed or rotated, a resume applies what it says,
and two runs never write into one folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import InterruptAt, Interrupted

from diffusion_pref_trainers import DiffusionDPOTrainer, TrainerCallback, checkpoints
from diffusion_pref_trainers.folder_lock import LOCK_FILE
from diffusion_pref_trainers.testing import tiny_sd_pipeline


class _Optimizer(TrainerCallback):
    """Records the optimizer's settings as training begins (after any resume)."""

    def on_train_begin(self, args, state, control, optimizer, **kwargs) -> None:
        self.groups = [dict(group) for group in optimizer.param_groups]


def _names(folder: str | Path) -> list[str]:
    return sorted(path.name for path in Path(folder).iterdir() if "checkpoint-" in path.name)


def _files(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


def test_a_stale_run_in_the_folder_is_never_resumed_rotated_or_mixed_in(pairs, make_config, tmp_path) -> None:
    old_args = make_config(seed=1, max_steps=2, save_steps=2)
    DiffusionDPOTrainer(tiny_sd_pipeline(), old_args, pairs).train()
    out = Path(old_args.output_dir)
    foreign = shutil.copytree(out / "checkpoint-2", tmp_path / "foreign-checkpoint")

    # A fresh run with another seed and learning rate refuses the folder, leaving it as it was...
    before = _files(out)
    new_args = make_config(seed=2, learning_rate=5e-4, max_steps=2, save_steps=1, save_total_limit=1)
    with pytest.raises(ValueError, match="already holds another run's output.*overwrite_output_dir=True"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), new_args, pairs).train()
    assert _files(out) == before

    # ...and with overwrite_output_dir deletes the old checkpoints, then trains its own steps.
    new_args.overwrite_output_dir = True
    with pytest.raises(Interrupted):
        DiffusionDPOTrainer(tiny_sd_pipeline(), new_args, pairs, callbacks=[InterruptAt(1)]).train()
    assert _names(out) == ["checkpoint-1"]
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "README.md").exists()  # old model

    # The old run's checkpoint is back, at a later step: 'latest' resumes this run's, rotation keeps the foreign one.
    shutil.copytree(foreign, out / "checkpoint-40")
    resumed = DiffusionDPOTrainer(tiny_sd_pipeline(), new_args, pairs)
    resumed.train(resume_from_checkpoint="latest")
    assert [entry["step"] for entry in resumed.state.log_history if "loss" in entry] == [1, 2]  # step 1 restored
    assert _names(out) == ["checkpoint-2", "checkpoint-40"]
    record = json.loads((out / checkpoints.RUN_FILE).read_text())
    assert record["fingerprint"] == resumed._fingerprint != checkpoints.read_run(foreign)["fingerprint"]
    assert json.loads((out / "training_config.json").read_text())["seed"] == 2
    assert not (out / LOCK_FILE).exists()


def test_resume_applies_a_new_learning_rate_and_weight_decay(pairs, make_config, caplog) -> None:
    DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(max_steps=1, save_steps=1), pairs).train()
    args = make_config(max_steps=2, save_steps=1, learning_rate=2e-4, weight_decay=0.5, adam_beta2=0.99)
    seen = _Optimizer()
    resumed = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, callbacks=[seen])
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint="latest")
    assert [(g["lr"], g["weight_decay"], g["betas"]) for g in seen.groups] == [(2e-4, 0.5, (0.9, 0.99))]
    assert resumed.state.log_history[-1]["learning_rate"] == pytest.approx(2e-4)
    assert "`learning_rate`: 0.001 -> 0.0002" in caplog.text
    [resume] = json.loads(Path(args.output_dir, checkpoints.RUN_FILE).read_text())["resumes"]
    assert resume["step"] == 1 and any("weight_decay" in change for change in resume["changed"])


def test_resume_past_max_steps_is_refused(pairs, make_config) -> None:
    args = make_config(max_steps=1, save_steps=1)
    DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs).train()
    with pytest.raises(ValueError, match="already complete at step 1.*raise max_steps"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs).train(resume_from_checkpoint="latest")


def test_a_truncated_optimizer_file_is_a_damaged_checkpoint(pairs, make_config) -> None:
    args = make_config(max_steps=2, save_steps=1)
    with pytest.raises(Interrupted):
        DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, callbacks=[InterruptAt(1)]).train()
    optimizer = Path(args.output_dir, "checkpoint-1", "optimizer.safetensors")
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    with pytest.raises(ValueError, match="checkpoint-1 is damaged: optimizer.*earlier checkpoint"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs).train(resume_from_checkpoint="latest")


def test_a_second_run_is_locked_out_and_a_dead_runs_lock_is_taken_over(pairs, make_config, caplog) -> None:
    args = make_config(max_steps=1)
    lock = Path(args.output_dir, LOCK_FILE)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # a live process
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    with pytest.raises(FileExistsError, match=f"in use by another run \\(process {os.getppid()} "):
        trainer.train()
    assert lock.is_file()  # the other run's lock is left alone

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "no longer runs" in caplog.text
    assert not lock.exists() and Path(args.output_dir, "pytorch_lora_weights.safetensors").is_file()


def test_the_fingerprint_ignores_cadence_and_length_but_not_what_is_learned(make_config) -> None:
    def fingerprint(**overrides) -> str:
        config = make_config(**overrides).to_dict()
        identity = checkpoints.run_identity(config, method="dpo", base_model="m", dataset="d", adapter="a")
        return checkpoints.fingerprint(identity)

    same = fingerprint()
    for harmless in (dict(max_steps=9), dict(output_dir="elsewhere"), dict(logging_steps=3), dict(learning_rate=1)):
        assert fingerprint(**harmless) == same, harmless
    for learned in (dict(seed=7), dict(beta=1.0), dict(lora_rank=4), dict(resolution=64), dict(use_lora=False)):
        assert fingerprint(**learned) != same, learned
