"""Checkpoint folders: written atomically, rotated, and found again for resuming, each marked with its run.

Every checkpoint and every final output holds `run.json`: the run's identity (the settings, data, base model and
method its result depends on) and its fingerprint, a hash of that identity. A resume, 'latest' and rotation only
ever touch checkpoints of the same fingerprint.

The final save (`save_model`) moves its files into place with the same flushing and renaming (`move_into`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

PREFIX = "checkpoint-"
TMP_PREFIX = "tmp-checkpoint-"
RUN_FILE = "run.json"
# Config fields that do not change what a run learns: where and how often it writes, logs, evaluates or uploads,
# how long it runs (extending a run is allowed), and speed switches that compute the same model.
NOT_IDENTITY = frozenset(
    {
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs",
        "logging_steps", "save_steps", "save_total_limit", "eval_steps", "eval_noise_draws",
        "per_device_eval_batch_size", "dataset_test_split", "validation_prompts", "num_validation_images",
        "validation_seed", "validation_inference_steps", "validation_steps", "report_to", "push_to_hub", "hub_model_id",
        "hub_private_repo", "hub_strategy", "hub_token", "dataloader_num_workers", "cache_dir",
        "offload_cached_encoders", "gradient_checkpointing", "channels_last", "attention_backend", "torch_compile",
        "torch_compile_mode", "torch_compile_backend", "logging_first_step", "eval_strategy", "eval_on_start",
        "save_strategy", "dataloader_pin_memory",
    }
)  # fmt: skip
# Optimizer and schedule settings a resume applies anew (`CheckpointingMixin._apply_settings`): not identity either.
APPLIED_ON_RESUME = (
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type",
    "warmup_steps", "max_grad_norm", "lr_scheduler_kwargs",
)  # fmt: skip


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """The final folder of the checkpoint at `step`."""
    return Path(output_dir) / f"{PREFIX}{step}"


def temporary_path(output_dir: str | Path, step: int) -> Path:
    """The folder a checkpoint is written into before it is renamed into place."""
    return Path(output_dir) / f"{TMP_PREFIX}{step}"


def clear_temporary(folder: str | Path) -> None:
    """Delete a temporary checkpoint left by a save that never finished: none of its files may be committed."""
    if Path(folder).exists():
        shutil.rmtree(folder)


def commit(output_dir: str | Path, step: int) -> Path:
    """Move a fully written temporary checkpoint into place in one rename (no half-written folder).

    Its files are flushed to disk first, and the rename after: a crash leaves either the whole checkpoint or none.
    """
    final, tmp = checkpoint_path(output_dir, step), temporary_path(output_dir, step)
    plain_permissions(tmp)
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(output_dir)
    return final


def plain_permissions(folder: str | Path) -> None:
    """Give every file under `folder` the permissions a plain `open()` gives (safetensors writes files as 0600)."""
    probe = Path(folder, ".permissions-probe")
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(mode)


def fsync_path(path: str | Path) -> None:
    """Flush a file's contents, or a folder's list of entries (a rename in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under `folder`, then every folder from the deepest up, to disk."""
    paths = sorted(Path(folder).rglob("*"), key=lambda path: len(path.parts), reverse=True)
    for path in [*(p for p in paths if p.is_file()), *(p for p in paths if p.is_dir()), Path(folder)]:
        fsync_path(path)


def move_into(staging: str | Path, folder: str | Path) -> None:
    """Flush the files written into `staging`, rename each into `folder` (replacing what is there), remove `staging`.

    A file is replaced in one rename; a sub-folder (a full fine-tune's `unet/`) is removed first, then renamed in.
    """
    staging, folder = Path(staging), Path(folder)
    plain_permissions(staging)
    fsync_tree(staging)
    for entry in sorted(staging.iterdir()):
        target = folder / entry.name
        if entry.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    fsync_path(folder)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(rf"{PREFIX}(\d+)", p.name))]
    return [path for _, path in sorted(found)]


def rotate(output_dir: str | Path, limit: int | None, run_fingerprint: str, keep: str | None = None) -> list[Path]:
    """Delete this run's oldest checkpoints beyond `limit` (never another run's, nor `keep`, the best one, as
    transformers keeps it); returns the deleted folders."""
    if limit is None:
        return []
    own = [path for path in list_checkpoints(output_dir) if belongs(path, run_fingerprint)][:-limit]
    doomed = [path for path in own if keep is None or path != Path(keep)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def resolve(output_dir: str | Path, requested: str | bool | None, run_fingerprint: str) -> Path | None:
    """The checkpoint to resume from: an explicit folder, or for `True`/'latest' the newest one of this run."""
    if requested in (None, False):
        return None
    if requested is True or requested == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"No checkpoint-* folder in {output_dir} to resume from.")
        own = [path for path in found if belongs(path, run_fingerprint)]
        return own[-1] if own else found[-1]  # another run's newest: `check_belongs` then says how it differs
    path = Path(str(requested))
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={requested!r} is not a checkpoint folder.")
    return path


# ----------------------------------------------------------------------------------------- run identity
def run_identity(config: dict[str, Any], *, method: str, base_model: str, dataset: str, adapter: str) -> dict:
    """What a run's result depends on, by name: its config fields but `NOT_IDENTITY` and `APPLIED_ON_RESUME`,
    the method, the base model, the training data's fingerprint and the trained weights (LoRA or full)."""
    skipped = NOT_IDENTITY.union(APPLIED_ON_RESUME)
    fields = {key: value for key, value in config.items() if key not in skipped}
    return {**fields, "method": method, "base_model": base_model, "dataset": dataset, "adapter": adapter}


def fingerprint(identity: dict[str, Any]) -> str:
    """A short stable hash of a run identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_run(folder: str | Path, record: dict[str, Any]) -> None:
    """Write a run record (`identity`, `fingerprint`, `settings`, `resumes`) as `run.json` into `folder`."""
    Path(folder, RUN_FILE).write_text(json.dumps(record, indent=2, default=str))


def read_run(folder: str | Path) -> dict[str, Any] | None:
    """The run record of a checkpoint or output folder; None when it has none (older versions wrote none)."""
    path = Path(folder, RUN_FILE)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is damaged ({error}): resume from an earlier checkpoint or start fresh.") from error
    if not isinstance(record, dict) or not {"identity", "fingerprint"} <= record.keys():
        raise ValueError(
            f"{path} is damaged (no identity or fingerprint): resume from an earlier checkpoint or start fresh."
        )
    return record


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The entries two identities (or settings) disagree on, as '`name`: old -> new'."""
    keys = sorted(set(old) | set(new))
    return [f"`{key}`: {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]


def belongs(folder: str | Path, run_fingerprint: str) -> bool:
    """Whether a checkpoint was written by the run of `run_fingerprint` (a damaged or missing record: no)."""
    try:
        record = read_run(folder)
    except ValueError:
        return False
    return record is not None and record["fingerprint"] == run_fingerprint


def check_belongs(folder: str | Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The record of a checkpoint to resume; raises naming every setting it was written with that differs."""
    record = read_run(folder)
    if record is None:
        raise ValueError(
            f"{folder} has no {RUN_FILE} (written by an older version, or not by this library): its settings "
            "cannot be checked, so it is not resumed. Start a fresh run (overwrite_output_dir=True, or another "
            "output_dir)."
        )
    changed = differences(record["identity"], identity)
    if changed:
        raise ValueError(
            f"{folder} is a checkpoint of another run; it differs in {'; '.join(changed)}. Resume it with the "
            "settings it was written with, or start this run fresh (no resume) in another output_dir, or in this "
            "one with overwrite_output_dir=True, which deletes the old checkpoints."
        )
    return record
