"""The benchmark suite in one command: every objective against the straightforward baseline (on the tiny kit and
on the SD1.5-shaped kit), every model family's DPO step, every speed lever and the cached-row read; a table per part and
one JSON.

    python benchmarks/suite.py --quick    # CI-sized: 6 steps a case, no torch.compile on CPU
    python benchmarks/suite.py            # 12 steps a case, and levers.py's torch.compile case (minutes on a CPU)
    python benchmarks/suite.py --full-size  # the GPU targets: SD1.5 at 512 px and SDXL at 1024 px, bf16
        [--threads 1] [--out benchmarks/results/suite_<cpu|cuda>[_quick|_full_size].json]

Each part is one of the scripts next to this one (run alone for more options: pairs, resolution, a real
checkpoint). The suite runs them one after the other with the same thread count, passes their tables through,
and gathers their rows into one file with the machine, the versions, each part's settings and its wall time.
Every case runs in its own process; warm-up steps are discarded and the median of the rest is reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import base_parser, default_out, write_result

HERE = Path(__file__).parent
PARTS = {
    "objectives_tiny": ["step_time.py", "--kit", "tiny"],
    "objectives_sd15_shaped": ["step_time.py", "--kit", "sd15_shaped"],
    "families": ["family_step_time.py"],
    "levers": ["levers.py"],
    "cache_read": ["cache_read.py"],
}
# The GPU targets, on the full-size architectures with random weights (kits.py), bf16 autocast: SD1.5 LoRA
# DPO at 512 px against the baseline (speed, memory) and its levers (MFU, 8-bit AdamW with full fine-tuning);
# SDXL at 1024 px, 4 pairs a step, with and without gradient checkpointing (does it fit 80 GB?).
FULL_SIZE_PARTS = {
    "objectives_sd15_512": ["step_time.py", "--kit", "sd15", "--pairs", "4", "--mixed-precision", "bf16"],
    "levers_sd15_512": ["levers.py", "--kit", "sd15", "--mixed-precision", "bf16", "--cases", "gradient_checkpointing",
                        "channels_last", "attention_eager", "no_offload", "full_finetune", "full_finetune_adamw_8bit"],
    "levers_sdxl_1024": ["levers.py", "--kit", "sdxl", "--mixed-precision", "bf16", "--cases",
                         "gradient_checkpointing", "no_offload", "--steps", "8"],
}  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__, "Every part in its quick mode (CI-sized).", None, "suite_<device>.json")
    parser.add_argument("--full-size", action="store_true", help="The full-size GPU parts instead (hours on a CPU).")
    args = parser.parse_args()
    out = args.out or default_out("suite_full_size" if args.full_size else "suite", args.quick)
    start = time.perf_counter()
    parts: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (script, *options) in (FULL_SIZE_PARTS if args.full_size else PARTS).items():
            print(f"\n== {name}: {script} {' '.join(options)}", flush=True)
            began = time.perf_counter()
            part_out = f"{tmp}/{name}.json"
            command = [sys.executable, str(HERE / script), *options, "--threads", str(args.threads), "--out", part_out]
            code = subprocess.run(command + ["--quick"] * args.quick).returncode
            parts[name] = {"wall_s": round(time.perf_counter() - began, 1)}
            if code:  # e.g. out of memory: recorded, and the other parts still run
                parts[name]["failed"] = f"exit code {code}"
            else:
                result = json.loads(Path(part_out).read_text())
                parts[name]["settings"] = result["settings"]
                rows += [{"part": name, **row} for row in result["rows"]]
            # Written after every part, so that a run stopped midway keeps what it measured.
            settings = {"quick": args.quick, "full_size": args.full_size, "threads": args.threads, "parts": parts}
            write_result(out, {**settings, "wall_s": round(time.perf_counter() - start, 1)}, rows, args.threads)
    times = ", ".join(f"{name} {part['wall_s']} s" + " (failed)" * ("failed" in part) for name, part in parts.items())
    print(f"\nsuite: {round(time.perf_counter() - start, 1)} s in all ({times})")
    if any("failed" in part for part in parts.values()):
        sys.exit("some parts failed: see their output above")


if __name__ == "__main__":
    main()
