"""Time the README's commands as a new user runs them (fresh output folders, plain `python`), and write JSON.

The README states these times; re-run this script when they change:
`python benchmarks/readme_times.py --out benchmarks/results/readme_times_cpu.json`. The test suite's time comes from
CI's own log (`.ci/run` prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The README's commands; `{out}` is a fresh folder, so no run finds an earlier one's output.
COMMANDS = {
    "default example (python examples/train.py)": "{python} examples/train.py --output_dir {out}/default",
    "tiny-kit smoke test (examples/configs/tiny_kit_rpo.yaml)": (
        "{python} examples/train.py --config examples/configs/tiny_kit_rpo.yaml --output_dir {out}/tiny"
    ),
}


def time_command(command: str) -> dict[str, float | int]:
    """Wall seconds and exit code of one shell command run from the checkout's root."""
    start = time.perf_counter()
    result = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(result.stderr[-3000:])
    return {"seconds": round(time.perf_counter() - start, 1), "returncode": result.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "runs" / "readme_times.json"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as out:
        runs = {
            name: {"command": template.format(python="python", out="<tmp>"), **time_command(
                template.format(python=sys.executable, out=out)
            )}
            for name, template in COMMANDS.items()
        }  # fmt: skip
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
