"""The lock that keeps two runs out of one output folder: `output_dir/.lock`, holding its owner's pid and host.

The main process of a run creates it (O_CREAT | O_EXCL: of two runs starting at once, one wins) when `train()`
starts and deletes it when `train()` ends, by success or error. A lock whose process is gone from this host
(killed before it could clean up) is taken over with a warning; one held from another host is always respected.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class OutputDirLock:
    """`acquire()` / `release()` the lock of one output folder."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False
        self.created_folder = False

    def acquire(self) -> None:
        """Take the lock, or raise FileExistsError naming the run that holds it."""
        self.created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._create()
        except FileExistsError:
            owner = self._owner()
            if not _is_stale(owner):
                raise FileExistsError(
                    f"{self.path.parent} is in use by another run (process {owner.get('pid')} on "
                    f"{owner.get('host')}, lock file {self.path}). Wait for it to finish or choose another "
                    f"output_dir; if no run uses this folder any more, delete {self.path}."
                ) from None
            logger.warning("Taking over %s: its process %s on this host no longer runs.", self.path, owner.get("pid"))
            self.path.unlink(missing_ok=True)
            self._create()
        self.held = True

    def release(self) -> None:
        """Delete the lock if this object holds it, and the output folder if taking the lock made it and it is empty
        (a run that failed before writing anything leaves no trace)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()

    def _create(self) -> None:
        """Create the lock file atomically, failing if it exists, and write this process's pid and host."""
        descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)

    def _owner(self) -> dict:
        """The pid and host the lock file names (empty when unreadable: a lock being written counts as held)."""
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}


def _is_stale(owner: dict) -> bool:
    """Whether a lock's process is known to be gone: it ran on this host and no process has its pid."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False
