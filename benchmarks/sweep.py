"""How the cost of a LoRA Diffusion-DPO step grows with batch size and resolution: ms/step, memory and FLOP/s.

    python benchmarks/sweep.py [--quick] [--pairs 1 2 4 8] [--resolutions 32 64 128] [--steps 6] [--warmup 2]
        [--threads 1] [--kit tiny] [--mixed-precision no|bf16] [--out benchmarks/results/sweep_<cpu|cuda>.json]
        [--plot docs/performance_sweep.png]

Every (pairs, resolution) cell runs the levers benchmark's default case (`levers.py`: library defaults plus
`cache_latents=True`; the tiny SD kit unless `--kit` names another) in its own subprocess, so its peak memory is
its own; warm-up steps are discarded and the median of the rest is reported, with the step's FLOPs counted by
`FlopCounterMode`. The plot (drawn with PIL) shows ms/step and peak memory against pairs per step, one line per
resolution.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from common import base_parser, default_out, device_description, peak_bf16_flops, run_case, throughput, write_result
from kits import KITS
from levers import DEFAULT, measure
from PIL import Image, ImageDraw, ImageFont

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: dict[str, list[tuple[float, float]]],
           title: str, ylabel: str) -> None:  # fmt: skip
    """One log-log line chart of `series` (label -> [(x, y)]) inside `box` (left, top, right, bottom)."""
    font = ImageFont.load_default()
    left, top, right, bottom = box
    plot = (left + 70, top + 30, right - 10, bottom - 45)
    points = [point for line in series.values() for point in line]
    xs = sorted({x for x, _ in points})
    y_low, y_high = math.log10(min(y for _, y in points)), math.log10(max(y for _, y in points))
    y_low, y_high = (y_low - 0.1, y_high + 0.1) if y_high - y_low > 1e-9 else (y_low - 0.5, y_high + 0.5)
    x_low, x_high = math.log2(xs[0]) - 0.3, math.log2(xs[-1]) + 0.3

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        u = (math.log2(x) - x_low) / (x_high - x_low)
        v = (math.log10(y) - y_low) / (y_high - y_low)
        return plot[0] + u * (plot[2] - plot[0]), plot[3] - v * (plot[3] - plot[1])

    draw.rectangle(plot, outline="black")
    draw.text((left + 70, top + 8), title, fill="black", font=font)
    draw.text((left + 4, top + 8), ylabel, fill="black", font=font)
    for x in xs:
        px, _ = to_pixel(x, 10**y_low)
        draw.line((px, plot[3], px, plot[3] + 5), fill="black")
        draw.text((px - 4, plot[3] + 8), f"{x:g}", fill="black", font=font)
    draw.text(((plot[0] + plot[2]) / 2 - 40, plot[3] + 25), "pairs per step", fill="black", font=font)
    for exponent in range(math.floor(y_low), math.ceil(y_high) + 1):
        for mantissa in (1, 2, 5) if y_high - y_low > 1 else (1, 1.5, 2, 3, 4, 5, 6, 7, 8):
            value = mantissa * 10**exponent
            if y_low <= math.log10(value) <= y_high:
                _, py = to_pixel(xs[0], value)
                draw.line((plot[0] - 5, py, plot[0], py), fill="black")
                draw.line((plot[0], py, plot[2], py), fill="#e0e0e0")
                draw.text((left + 8, py - 6), f"{value:g}", fill="black", font=font)
    for index, (label, line) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        pixels = [to_pixel(x, y) for x, y in sorted(line)]
        draw.line(pixels, fill=color, width=2)
        for px, py in pixels:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
        draw.text((plot[0] + 8, plot[1] + 6 + 14 * index), label, fill=color, font=font)


def plot(rows: list[dict[str, Any]], path: str, device: str, kit: str = "tiny SD kit") -> None:
    """ms/step and peak memory (CUDA's allocator on a GPU, else resident) against pairs per step, one line per
    resolution, side by side, as a PNG."""
    memory_key, memory_title = ("peak_cuda_mib", "peak CUDA memory") if "peak_cuda_mib" in rows[0] else (
        "peak_rss_mib", "peak resident memory")  # fmt: skip
    resolutions = sorted({row["resolution"] for row in rows})

    def series(key: str) -> dict[str, list[tuple[float, float]]]:
        return {f"{r} px": [(row["pairs"], row[key]) for row in rows if row["resolution"] == r] for r in resolutions}

    image = Image.new("RGB", (960, 420), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 400), f"LoRA Diffusion-DPO step, {kit}, {device}; median after warm-up", fill="black")
    _panel(draw, (0, 0, 480, 395), series("ms_per_step"), "ms per optimizer step (log-log)", "ms")
    _panel(draw, (480, 0, 960, 395), series(memory_key), f"{memory_title} (log-log)", "MiB")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"wrote {path}")


def measure_cell(pairs: int, resolution: int, steps: int, warmup: int, kit: str, precision: str) -> dict[str, Any]:
    """The levers benchmark's default case of `kit` at `pairs` pairs per step and `resolution` px."""
    overrides = {**DEFAULT, "mixed_precision": precision}
    row = measure("default", pairs, steps, warmup, resolution, kit, overrides)
    return {"pairs": pairs, "resolution": resolution, **row}


def main() -> None:
    parser = base_parser(__doc__, "A 2x2 grid (1 and 4 pairs, 32 and 64 px), fewer steps.", 6, "sweep_<device>.json")
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 2, 4, 8], help="Pairs per step to sweep.")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128], help="Resolutions to sweep.")
    parser.add_argument("--kit", choices=sorted(KITS), default="tiny", help="The models (see kits.py).")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="Autocast dtype (GPU: bf16).")
    parser.add_argument("--plot", default=None, help="PNG; default: next to the JSON (docs/performance_sweep.png: the "
                        "documented one).")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs, resolutions, steps = ([1, 4], [32, 64], 5) if args.quick else (args.pairs, args.resolutions, args.steps)
    peak, _ = peak_bf16_flops()
    rows = []
    for resolution in resolutions:
        for count in pairs:
            row = run_case(
                args.threads, measure_cell, count, resolution, steps, args.warmup, args.kit, args.mixed_precision
            )
            row.update(throughput(row["step_flops"], row["ms_per_step"], peak))
            rows.append(row)
            print(f"{count} pairs, {resolution} px: {row['ms_per_step']} ms/step, {row['peak_rss_mib']} MiB peak, "
                  f"{row['achieved_gflops_per_s']} GFLOP/s", flush=True)  # fmt: skip
    settings = {"pairs": pairs, "resolutions": resolutions, "steps": steps, "warmup": args.warmup,
                "model": KITS[args.kit][0], "objective": "DPO, LoRA r8, cache_latents",
                "mixed_precision": args.mixed_precision, "quick": args.quick}  # fmt: skip
    out = args.out or default_out("sweep", args.quick)
    write_result(out, settings, rows, args.threads)
    plot(rows, args.plot or str(Path(out).with_suffix(".png")), device_description(args.threads), KITS[args.kit][0])


if __name__ == "__main__":
    main()
