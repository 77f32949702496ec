"""How long reading one cached row takes in the training process: `datasets`' torch formatting against the
library's Arrow reader (`cache.ArrowRows`), on rows shaped like each model family's cache at full size.

    python benchmarks/cache_read.py [--quick] [--rows 64] [--threads 1]
        [--out benchmarks/results/cache_read_<cpu|cuda>.json]

A row holds what `cache_latents` stores for a pair (no flips): the winner's and loser's latents, the prompt
conditioning and the image-size entries, as float32 arrays of the shapes below, written with the cache's own
Arrow features. Every row is read once in random order after one warm-up pass over all of them (the file is in
the page cache, as it is after the first epoch); the median over rows is reported.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from typing import Any

import datasets
import numpy as np
import torch
from common import base_parser, default_out, write_result

from diffusion_pref_trainers import cache

# Per-row arrays of a pair's cache entry at each family's native resolution (latents: 1 orientation x 2 images).
SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "sd15_512": {"latents": (1, 2, 4, 64, 64), "cond/encoder_hidden_states": (77, 768)},
    "sdxl_1024": {
        "latents": (1, 2, 4, 128, 128),
        "cond/prompt_embeds": (77, 2048),
        "cond/pooled_prompt_embeds": (1280,),
    },
}


def _rows(shapes: dict[str, tuple[int, ...]], count: int) -> datasets.Dataset:
    """`count` random rows of `shapes` with the cache's features (plus its image-size entries)."""
    rng = np.random.default_rng(0)
    template = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    template.update(original_sizes=np.zeros((2, 2), np.int64), crop_top_lefts=np.zeros((1, 2, 2), np.int64))
    columns: dict[str, list[Any]] = {
        key: [rng.standard_normal(value.shape).astype(value.dtype) for _ in range(count)]
        for key, value in template.items()
    }
    columns.update(prompt=["a photo"] * count, readable=[True] * count)
    return datasets.Dataset.from_dict(columns, features=cache._features(template, labelled=False))


def _median_ms(read: Any, count: int) -> float:
    """Median milliseconds of `read(row)` over all rows in a random order, after a warm-up pass."""
    order = list(range(count))
    for row in order:
        read(row)
    random.Random(0).shuffle(order)
    times = []
    for row in order:
        start = time.perf_counter()
        read(row)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def main() -> None:
    parser = base_parser(__doc__, "16 rows a layout (CI-sized).", None, "cache_read_<device>.json")
    parser.add_argument("--rows", type=int, default=64, help="Rows per layout.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    count = 16 if args.quick else args.rows
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shapes in SHAPES.items():
            path = f"{tmp}/{name}"
            _rows(shapes, count).save_to_disk(path)
            stored = datasets.load_from_disk(path)  # memory-mapped, as the cache is read
            formatted, arrow = stored.with_format("torch"), cache.ArrowRows(stored)
            row = {"layout": name, "floats_per_row": sum(int(np.prod(shape)) for shape in shapes.values())}
            row["formatter_ms"] = _median_ms(formatted.__getitem__, count)
            row["arrow_ms"] = _median_ms(arrow.__getitem__, count)
            row["speedup"] = round(row["formatter_ms"] / row["arrow_ms"], 1)
            rows.append(row)
    print(f"\n{'layout':<12}{'floats/row':>12}{'formatter ms':>14}{'Arrow ms':>10}{'speedup':>9}")
    for r in rows:
        print(f"{r['layout']:<12}{r['floats_per_row']:>12}{r['formatter_ms']:>14}{r['arrow_ms']:>10}{r['speedup']:>9}")
    settings = {"rows": count, "shapes": SHAPES, "quick": args.quick}
    write_result(args.out or default_out("cache_read", args.quick), settings, rows, args.threads)


if __name__ == "__main__":
    main()
