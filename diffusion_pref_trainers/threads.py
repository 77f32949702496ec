"""How many torch threads a command-line run uses: one process per machine gets every physical core.

Plain `python` leaves torch's own default, but `accelerate launch` exports `OMP_NUM_THREADS=1` unless told
otherwise, which makes the same single-process CPU run several times slower per step. Only the command line
(`cli.main`) calls `set_run_threads`; the trainer classes never change global thread settings.

Precedence: `DPT_NUM_THREADS` (the user's explicit choice) > an `OMP_NUM_THREADS` the user set (any value
outside `accelerate launch`; a value other than accelerate's default 1 under it, since accelerate does not mark
the value as its own) > physical cores // processes on this machine (accelerate's own split for CPU runs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

THREADS_ENV = "DPT_NUM_THREADS"
# `accelerate launch` exports this to every process it starts (both the simple and the multi-process launcher).
_ACCELERATE_MARKER = "ACCELERATE_DYNAMO_BACKEND"


def physical_cores() -> int:
    """Physical cores this process may run on: psutil's count (an accelerate dependency) capped by the affinity
    mask, so a container or `taskset` limit is respected."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil
    except ImportError:
        return available
    return max(1, min(psutil.cpu_count(logical=False) or available, available))


def choose_num_threads(environ: Mapping[str, str], cores: int) -> tuple[int | None, str]:
    """The thread count for one process of a run (None: keep the user's `OMP_NUM_THREADS`) and why."""
    explicit = environ.get(THREADS_ENV)
    if explicit is not None:
        if not explicit.isdigit() or int(explicit) < 1:
            raise ValueError(f"{THREADS_ENV}={explicit!r} must be a whole number of threads, 1 or more (e.g. 4).")
        return int(explicit), f"set by {THREADS_ENV}"
    omp = environ.get("OMP_NUM_THREADS")
    launched = _ACCELERATE_MARKER in environ
    if omp is not None and (not launched or omp != "1"):
        return None, "OMP_NUM_THREADS set by the user"
    processes = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // processes), f"{cores} physical cores / {processes} process(es) on this machine"


def set_run_threads(environ: Mapping[str, str] | None = None) -> str:
    """Apply `choose_num_threads` to torch for this process; returns the one-line report the CLI prints."""
    import torch

    count, reason = choose_num_threads(os.environ if environ is None else environ, physical_cores())
    if count is not None:
        torch.set_num_threads(count)
    return f"torch threads per process: {torch.get_num_threads()} ({reason}; override with {THREADS_ENV}=N)."
