"""Checkpoint folders: written atomically (flushed to disk, then renamed), rotated, and found again for resuming.

The final save (`save_model`) moves its files into place with the same flushing and renaming (`move_into`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

PREFIX = "checkpoint-"
TMP_PREFIX = "tmp-checkpoint-"


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


def rotate(output_dir: str | Path, limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit`; returns the deleted folders."""
    if limit is None:
        return []
    doomed = list_checkpoints(output_dir)[:-limit]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def resolve(output_dir: str | Path, requested: str | bool | None) -> Path | None:
    """The checkpoint to resume from: an explicit folder, or the newest one for `True`/'latest'."""
    if requested in (None, False):
        return None
    if requested is True or requested == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"No checkpoint-* folder in {output_dir} to resume from.")
        return found[-1]
    path = Path(str(requested))
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={requested!r} is not a checkpoint folder.")
    return path
