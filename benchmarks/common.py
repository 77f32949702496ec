"""What the benchmark scripts share: a step clock, one case per process, FLOP counting, and the JSON result file."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Measure this checkout, not an installed copy: here, and in the case processes (the forkserver that starts them
# would otherwise import the package from wherever it is installed, e.g. another checkout's editable install).
ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
from diffusion_pref_trainers import TrainerCallback  # noqa: E402

# Dense bf16 tensor-core peak FLOP/s per GPU (vendor datasheets; SXM parts), matched against the device name.
RUNS = Path(__file__).parent / "runs"  # default output folder, git-ignored
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# Variants with other clocks than the SXM part their name would match: no peak is assumed for them.
OTHER_VARIANTS = ("PCIe", "NVL")


def base_parser(doc: str, quick: str, steps: int | None = 12, out: str = "") -> argparse.ArgumentParser:
    """The options every benchmark script takes: --quick, --threads and --out; --steps and --warmup unless `steps`
    is None (a script that times no optimizer steps)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps, help="Optimizer steps per case, warm-up included.")
        parser.add_argument("--warmup", type=int, default=2, help="Steps discarded before timing.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    parser.add_argument(
        "--out",
        default=None,
        help=f"Result JSON; default: benchmarks/runs/{out} (untracked). Name a file under benchmarks/results/ to "
        "record a result in the repository.",
    )
    return parser


def default_out(name: str, quick: bool) -> str:
    """Where a script writes its JSON without `--out`: ``benchmarks/runs/<name>_<cpu|cuda>[_quick].json``, an
    untracked folder, so a trial run never overwrites the recorded results in ``benchmarks/results/``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(RUNS / f"{name}_{device}{'_quick' * quick}.json")


def throughput(step_flops: int, ms_per_step: float, peak: float | None) -> dict[str, Any]:
    """Achieved GFLOP/s of a step, and its MFU where the device's peak FLOP/s is known (else None)."""
    achieved = step_flops / (ms_per_step / 1000)
    return {"achieved_gflops_per_s": round(achieved / 1e9, 2), "mfu": round(achieved / peak, 4) if peak else None}


class StepClock(TrainerCallback):
    """A trainer callback that stamps the start of training and the end of every optimizer step.

    On CUDA it waits for the GPU before each stamp (kernels run asynchronously) and resets the peak-memory
    counter when training begins, so `peak_cuda_mib` covers the training steps only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[float] = []
        self.rss_at_train_begin_mib: float | None = None

    def on_train_begin(self, args: Any = None, state: Any = None, control: Any = None, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.rss_at_train_begin_mib = current_rss_mib()
        self.stamps.append(time.perf_counter())

    def on_step_end(self, args: Any = None, state: Any = None, control: Any = None, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds of each optimizer step."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def summarize(seconds: list[float], warmup: int, pairs: int) -> dict[str, Any]:
    """Median step time after `warmup` steps, pairs/s, this process's peak resident memory and, on CUDA, the peak
    memory allocated by tensors since `StepClock.on_train_begin`."""
    kept = seconds[warmup:]
    median = statistics.median(kept)
    row = {
        "ms_per_step": round(1000 * median, 1),
        "pairs_per_s": round(pairs / median, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "steps_timed": len(kept),
        "step_ms": [round(1000 * second, 1) for second in kept],
    }
    if torch.cuda.is_available():
        row["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def pool(runs: list[dict[str, Any]], pairs: int) -> dict[str, Any]:
    """One row from repeated runs of a case: the median of all their timed steps, and the largest memory.

    Repeats run round-robin over the cases, so a busy spell on a shared machine slows every case a little
    instead of one case a lot."""
    steps = [ms for run in runs for ms in run["step_ms"]]
    median = statistics.median(steps)
    row = {**runs[0], "ms_per_step": round(median, 1), "pairs_per_s": round(1000 * pairs / median, 2)}
    row.update(min_ms_per_step=min(steps), steps_timed=len(steps), runs=len(runs), step_ms=steps)
    for key in ("peak_rss_mib", "model_step_mib", "peak_cuda_mib"):
        if key in row:
            row[key] = max(run[key] for run in runs)
    return row


def current_rss_mib() -> float | None:
    """This process's resident memory now (Linux `/proc`; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def training_step_flops(trainer: Any, rows: int) -> int:
    """FLOPs of one training step's model math, counted by `torch.utils.flop_counter.FlopCounterMode`.

    The policy forward and backward and the reference forward on `rows` training rows (plus the encoders when
    latents are not cached); the optimizer's elementwise work is not counted. Run it on an uncompiled model
    without gradient checkpointing, so that it counts the model's FLOPs, not recomputation (MFU, not HFU).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion_pref_trainers.data import collate

    batch = collate([trainer.train_dataset[index] for index in range(rows)])
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_formulas())
    with counter:
        model_err, ref_err = trainer.denoising_errors(batch, torch.Generator().manual_seed(0))
        loss, _ = trainer.compute_loss(model_err, ref_err, batch)
        trainer.accelerator.backward(loss)
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def cpu_attention_flop_formulas() -> dict[Any, Any]:
    """FLOP formulas for the CPU flash-attention kernels, which `FlopCounterMode` does not know (it counts them as
    zero): the same formulas as its CUDA attention kernels (two batched matmuls forward, five backward)."""
    from torch.utils import flop_counter

    def forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_backward_flop_count(grad, query, key, value)

    formulas = {}
    for name, formula in (("", forward), ("_backward", backward)):
        op = getattr(torch.ops.aten, f"_scaled_dot_product_flash_attention_for_cpu{name}", None)
        if op is not None:
            formulas[op] = formula
    return formulas


def peak_bf16_flops() -> tuple[float | None, str]:
    """The device's dense bf16 peak FLOP/s when it is a GPU listed in `PEAK_BF16_FLOPS`, else None; and a note."""
    if not torch.cuda.is_available():
        return None, "no peak FLOP/s is tabulated for CPUs: MFU is not reported"
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name and not any(variant in name for variant in OTHER_VARIANTS):
            return peak, f"MFU against the dense bf16 peak of {key} ({peak / 1e12:.0f} TFLOP/s)"
    return None, f"no peak FLOP/s is tabulated for {name!r}: MFU is not reported"


def device_description(threads: int) -> str:
    """The GPU's name, or the CPU's, its core count and the torch thread count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {threads} torch thread(s))"


def run_case(threads: int, function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`function(*args)` in a fresh process with `threads` torch threads, so that its peak memory is its own.

    The process is forked from a server that has imported the libraries once (multiprocessing's forkserver, which
    initialises no CUDA before forking): a case then starts without importing torch, diffusers and transformers
    again, which takes seconds a process.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "diffusers", "peft", "diffusion_pref_trainers.testing"])
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_case_process, args=(send, threads, function, args))
    process.start()
    send.close()
    try:
        succeeded, value = receive.recv()
    except EOFError:  # it died without a word (killed, out of memory)
        succeeded, value = False, "the case's process died"
    process.join()
    if not succeeded:
        sys.exit(f"{function.__name__}{args} failed:\n{value}")
    return value


def _case_process(send: Any, threads: int, function: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    """The case's process: quiet (progress bars, warnings), `threads` torch threads; sends (succeeded, row or
    traceback) back."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    torch.set_num_threads(threads)
    try:
        send.send((True, function(*args)))
    except BaseException:  # noqa: BLE001 (any failure goes back to the parent, which stops the run)
        send.send((False, traceback.format_exc()))


def write_result(path: str, settings: dict[str, Any], rows: list[dict[str, Any]], threads: int) -> None:
    """The result file: device, date, versions, settings and rows."""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for package in ("diffusers", "transformers", "accelerate", "peft", "bitsandbytes"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    result = {
        "device": device_description(threads),
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions,
        "settings": settings,
        "rows": rows,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
