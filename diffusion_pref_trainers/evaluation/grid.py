"""Image grids for reports: rows of images with a label column on the left and optional column headers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 192  # pixels of the left label column
HEADER_HEIGHT = 16  # pixels of the column-header row
PADDING = 2  # pixels of white between cells and around the text


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def make_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
) -> Image.Image:
    """One RGB image: cell ``(i, j)`` shows ``rows[i][j]`` resized to the first image's size.

    With ``row_labels``, a white column of width ``LABEL_WIDTH`` on the left holds each row's wrapped label;
    with ``column_labels``, a header row of height ``HEADER_HEIGHT`` names the columns.
    """
    if not rows or not rows[0]:
        raise ValueError("a grid needs at least one image")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    cell_w, cell_h = rows[0][0].size
    n_cols = max(len(row) for row in rows)
    left = LABEL_WIDTH if row_labels is not None else 0
    top = HEADER_HEIGHT if column_labels is not None else 0
    size = (left + n_cols * (cell_w + PADDING), top + len(rows) * (cell_h + PADDING))
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for j, label in enumerate(column_labels or []):
        draw.text((left + j * (cell_w + PADDING) + PADDING, PADDING), label, fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + i * (cell_h + PADDING)
        if row_labels is not None:
            draw.multiline_text((PADDING, y + PADDING), _wrap(draw, row_labels[i], left - 2 * PADDING), fill="black")
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((cell_w, cell_h)), (left + j * (cell_w + PADDING), y))
    return grid


def save_grid(
    rows: Sequence[Sequence[Image.Image]],
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
) -> Image.Image:
    """:func:`make_grid`, written to ``path`` (format from the extension; folders created) and returned."""
    grid = make_grid(rows, row_labels, column_labels)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def make_comparison_grid(
    prompts: Sequence[str],
    base: Sequence[Sequence[Image.Image]],
    aligned: Sequence[Sequence[Image.Image]],
    seeds: Sequence[int] | None = None,
) -> Image.Image:
    """Base next to aligned for each seed, one row per prompt labelled with the prompt."""
    rows = [[image for pair in zip(b, a, strict=True) for image in pair] for b, a in zip(base, aligned, strict=True)]
    seeds = list(seeds) if seeds is not None else list(range(len(base[0]) if base else 0))
    columns = [f"{name} {seed}" for seed in seeds for name in ("base", "aligned")]
    return make_grid(rows, row_labels=list(prompts), column_labels=columns)


def save_comparison_grid(
    prompts: Sequence[str],
    base: Sequence[Sequence[Image.Image]],
    aligned: Sequence[Sequence[Image.Image]],
    path: str | Path,
    seeds: Sequence[int] | None = None,
) -> Image.Image:
    """:func:`make_comparison_grid`, written to ``path`` (folders created) and returned."""
    grid = make_comparison_grid(prompts, base, aligned, seeds)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid
