"""The quality benchmark: every objective on every toy task, same data, budget and seeds; a Markdown table,
JSON and base-vs-aligned grids in benchmarks/runs/toy_alignment/ (untracked; the recorded run is
benchmarks/results/toy_alignment/, written with `--out`).

    python benchmarks/toy_alignment.py                      # large, warm, centred x all objectives
    python benchmarks/toy_alignment.py --out benchmarks/results/toy_alignment  # record the run
    python benchmarks/toy_alignment.py --tasks warm --methods dpo rpo --quick

Per task, the shipped toy pipeline is sampled once for the task's prompts (which leave the rewarded attribute
open) and the samples are paired and labelled by the exact reward; every objective then trains a LoRA on those
same pairs from a fresh copy of the pipeline with the same settings and seed, and is evaluated on the same
held-out prompts and seeds. RPO runs with text similarity (the pipeline's own text encoder); image and
multimodal similarity need a CLIP vision model, which the toy world does not have. The striped task is left out
by default: the shipped pipeline's VAE cannot draw stripes (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from diffusion_pref_trainers.toy import TASKS  # noqa: E402
from diffusion_pref_trainers.toy.alignment import (  # noqa: E402
    TRAINING_DEFAULTS,
    ToyExperiment,
    prepare_task,
    run_experiment,
)
from diffusion_pref_trainers.toy.model import load_toy_pipeline  # noqa: E402

METHODS = ("dpo", "rpo", "kto", "mapo", "sft")
COLUMNS = (
    ("method", "objective"),
    ("reward/base", "reward base"),
    ("reward/aligned", "reward aligned"),
    ("win_rate", "win rate"),
    ("fidelity/base", "fidelity base"),
    ("fidelity/aligned", "fidelity aligned"),
    ("style/base", "style base"),
    ("style/aligned", "style aligned"),
    ("diversity/aligned", "diversity aligned"),
    ("eval_accuracy/after", "held-out pair acc."),
    ("train_seconds", "train s"),
)


def markdown(rows: list[dict], header: str) -> str:
    """One table per task: a row per objective, columns from ``COLUMNS``."""
    lines = [header, ""]
    for task in dict.fromkeys(row["task"] for row in rows):
        lines += [f"**{task}**: {TASKS[task].description}", ""]
        lines.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for row in (r for r in rows if r["task"] == task):
            cells = [f"{row[key]:.3f}" if isinstance(row[key], float) else str(row[key]) for key, _ in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["large", "warm", "centred"], choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-steps", type=int, default=TRAINING_DEFAULTS["max_steps"])
    parser.add_argument("--train-prompts", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="8 prompts, 10 steps: checks the pipeline, not quality")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", default="benchmarks/runs/toy_alignment", help="Folder; benchmarks/results/toy_alignment records it."
    )
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    steps, prompts = (10, 8) if options.quick else (options.max_steps, options.train_prompts)
    out = Path(options.out)
    rows = []
    for task in options.tasks:
        experiment = ToyExperiment(task=task, train_prompts=prompts, eval_prompts=8 if options.quick else 16)
        started = time.perf_counter()
        data = prepare_task(load_toy_pipeline(), experiment)
        print(f"{task}: {len(data.train)} pairs sampled in {time.perf_counter() - started:.0f} s", flush=True)
        for method in options.methods:
            row = run_experiment(method, experiment, out / task / method, {"max_steps": steps}, data=data)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("experiment", "settings")}), flush=True)
    header = f"Toy-world alignment, {steps} steps per run ({time.strftime('%Y-%m-%d')}, CPU, {options.threads} thread)"
    table = markdown(rows, header)
    print(table)
    (out / "table.md").write_text(table + "\n")
    settings = {"max_steps": steps, "train_prompts": prompts, "tasks": options.tasks, "methods": options.methods}
    write_result(str(out / "results.json"), settings, rows, options.threads)


if __name__ == "__main__":
    main()
