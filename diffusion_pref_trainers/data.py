"""Preference rows in, image tensors out: schema detection, robust decoding, transforms, collation.

Four schemas are recognised from the column names (after an optional column mapping):

- Pick-a-Pic v2: `caption`, `jpg_0`, `jpg_1`, `label_0` (1: image 0 preferred, 0: image 1, 0.5: tie);
- TRL preference: `prompt`, `chosen`, `rejected`;
- unpaired (KTO): `prompt`, `image`, `label` (True: desirable);
- captioned (SFT): `prompt`, `image`.

Supervised fine-tuning reads the winners of paired data through `winners_only`, lazily (no copy).

Random crops and flips are drawn from a generator seeded by (seed, epoch, row), so a resumed run sees
exactly the pixels the uninterrupted run would have seen.
"""

from __future__ import annotations

import abc
import hashlib
import io
import logging
import numbers
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

SCHEMAS: dict[str, tuple[str, ...]] = {
    "pickapic": ("caption", "jpg_0", "jpg_1", "label_0"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "image", "label"),
    "captioned": ("prompt", "image"),
}
PAIRED_SCHEMAS = ("pickapic", "preference")
IMAGE_COLUMNS = ("jpg_0", "jpg_1", "chosen", "rejected", "image")
# What decoding a broken image cell raises: such rows are skipped (and counted) or reported by index.
DECODE_ERRORS = (OSError, ValueError, TypeError, SyntaxError)
# Images whose long side exceeds this many times the short side are skipped: a square crop of a banner or a
# one-pixel line shows almost nothing the caption describes, and resizing its short side blows up memory.
MAX_ASPECT_RATIO = 10.0
# Arrow types an image column may have besides `Image()`: encoded bytes or file paths.
IMAGE_VALUE_TYPES = ("binary", "large_binary", "string", "large_string")
# The label column of each labelled schema.
LABEL_COLUMNS = {"pickapic": "label_0", "unpaired": "label"}
# A decimal numeral without sign, exponent or spaces: the strings a `label_0` may be written as ("1", "0.5", "1.0").
DECIMAL = re.compile(r"\d+\.?\d*|\.\d+")
UNPAIRED_STRINGS = {"true": True, "false": False, "1": True, "0": False}
LABEL_RULES = {
    "label_0": "a Pick-a-Pic `label_0` must be 1 (image 0 preferred), 0 (image 1 preferred) or 0.5 (a tie): a number, "
    "a boolean or a decimal string such as '1' or '0.5'",
    "label": "an unpaired `label` must be True/1 (desirable) or False/0 (undesirable): a boolean, the number 0 or 1, "
    "or one of the strings 'true', 'false', '1', '0' (any case)",
}
# Rows decoded at construction, spread over the dataset (the first ones of a stream), to catch unreadable data early.
PROBE_ROWS = 8


class BadImageError(ValueError):
    """A row's image cannot be decoded; carries the row index so the user can find it."""


class LabelError(ValueError):
    """A row's preference label is not one of the accepted values; the message names the column, row and value."""


def paired_label(value: Any) -> float:
    """A Pick-a-Pic `label_0` as 1.0, 0.5 or 0.0; raises `LabelError` for anything else (2, NaN, 'yes', None)."""
    if isinstance(value, str) and DECIMAL.fullmatch(value):
        value = float(value)
    if isinstance(value, numbers.Real) and float(value) in (0.0, 0.5, 1.0):
        return float(value)
    raise LabelError(LABEL_RULES["label_0"])


def unpaired_label(value: Any) -> bool:
    """An unpaired `label` as a bool; raises `LabelError` for anything but booleans, 0/1 and their strings."""
    if isinstance(value, str) and value.lower() in UNPAIRED_STRINGS:
        return UNPAIRED_STRINGS[value.lower()]
    if isinstance(value, numbers.Real) and float(value) in (0.0, 1.0):
        return bool(value)
    raise LabelError(LABEL_RULES["label"])


LABEL_PARSERS = {"label_0": paired_label, "label": unpaired_label}


def _label_error(column: str, row: int, value: Any, streamed: bool = False) -> LabelError:
    """The error for one bad label, naming the column, the row and the value, and what is accepted."""
    where = "Streamed row" if streamed else "Row"
    return LabelError(
        f"{where} {row}: `{column}` is {value!r}; {LABEL_RULES[column]}. Fix or drop the row "
        "(e.g. `dataset.filter`), or map the right column with `column_mapping`."
    )


def validate_labels(dataset: Any, schema: str) -> Any:
    """Check the schema's label column before any compute: at once for a map-style dataset, row by row as a stream
    is read. A stream's labels come out normalised (float 0/0.5/1, bool); map-style ones are read through
    `paired_label`/`unpaired_label` (rewriting an Arrow column would copy every image)."""
    column = LABEL_COLUMNS.get(schema)
    if column is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        features = dataset.features.copy() if dataset.features else None
        if features is not None:
            features[column] = datasets.Value("float64" if column == "label_0" else "bool")
        return dataset.map(partial(_normalised_row, column), with_indices=True, features=features)
    _check_label_column(dataset, column)
    return dataset


def _normalised_row(column: str, row: dict[str, Any], index: int) -> dict[str, Any]:
    """A streamed row with its label normalised, or an error naming the row."""
    try:
        return {column: LABEL_PARSERS[column](row[column])}
    except LabelError:
        raise _label_error(column, index, row[column], streamed=True) from None


def _check_label_column(dataset: datasets.Dataset, column: str) -> None:
    """Parse each distinct value of the column once; the first row holding a rejected one raises."""
    feature = dataset.features[column]
    if not isinstance(feature, datasets.Value):
        raise LabelError(
            f"Column `{column}` holds {type(feature).__name__} values; {LABEL_RULES[column]}. "
            "Map the right column with `column_mapping`."
        )
    values = pa.chunked_array(dataset.with_format("arrow")[column])
    accepted = [value for value in pc.unique(values).to_pylist() if _parses(LABEL_PARSERS[column], value)]
    rejected = pc.fill_null(pc.invert(pc.is_in(values, value_set=pa.array(accepted, type=values.type))), True)
    row = pc.index(rejected, True).as_py()
    if row >= 0:
        raise _label_error(column, row, values[row].as_py())


def _parses(parser: Any, value: Any) -> bool:
    """Whether `parser` accepts `value`."""
    try:
        parser(value)
    except LabelError:
        return False
    return True


def detect_schema(column_names: list[str]) -> str:
    """The schema whose columns are all present; an error lists what was found and what is accepted."""
    for schema, required in SCHEMAS.items():
        if set(required) <= set(column_names):
            return schema
    accepted = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in SCHEMAS.items())
    raise ValueError(
        f"The dataset's columns {sorted(column_names)} match no known schema. Accepted schemas: {accepted}. "
        "Rename columns with `column_mapping` (e.g. {'my_prompt': 'prompt'})."
    )


def apply_column_mapping(dataset: Any, column_mapping: Mapping[str, str] | None) -> Any:
    """Rename the user's columns to the schema's names, naming any mapped column that is missing."""
    if not column_mapping:
        return dataset
    columns = list(dataset.column_names or [])
    missing = [name for name in column_mapping if name not in columns]
    if missing:
        raise ValueError(f"`column_mapping` names columns the dataset lacks: {missing}; it has {columns}.")
    known = sorted({name for names in SCHEMAS.values() for name in names})
    unknown = [target for target in column_mapping.values() if target not in known]
    if unknown:
        raise ValueError(f"`column_mapping` renames to {unknown}, which no schema reads; schema columns: {known}.")
    taken = [target for source, target in column_mapping.items() if target in columns and target not in column_mapping]
    if taken:
        raise ValueError(
            f"`column_mapping` renames onto {taken}, which the dataset already has: map or drop those columns first."
        )
    return dataset.rename_columns(dict(column_mapping))


def decode_images_lazily(dataset: Any) -> Any:
    """Leave image decoding to `load_image`: `Image()` columns yield `{"bytes", "path"}` instead of PIL images.

    datasets decodes `Image()` cells while reading a row, so a broken file would raise inside the iterator of a
    streamed dataset (ending it) or outside the row's error handling; decoded here, it is one skipped row.
    """
    features = getattr(dataset, "features", None) or {}
    for column in IMAGE_COLUMNS:
        feature = features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def check_image_columns(dataset: Any, schema: str) -> None:
    """Image columns must hold images (an `Image()` feature, bytes, paths or `{"bytes", "path"}` dicts), not numbers."""
    features = getattr(dataset, "features", None) or {}
    for column in (name for name in SCHEMAS[schema] if name in IMAGE_COLUMNS):
        feature = features.get(column)
        if feature is None or isinstance(feature, datasets.Image):
            continue
        if isinstance(feature, datasets.Value) and feature.dtype in IMAGE_VALUE_TYPES:
            continue
        if isinstance(feature, dict) and {"bytes", "path"} & set(feature):
            continue
        found = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise ValueError(
            f"Column `{column}` holds {found} values, not images: an image column must be a datasets.Image() "
            "feature, encoded bytes, a file path or a {'bytes', 'path'} dict. Point `column_mapping` at the column "
            "that holds the images."
        )


def drop_ties(dataset: Any) -> tuple[Any, int | None]:
    """Remove Pick-a-Pic ties (`label_0` 0.5 in any accepted spelling); returns the dataset and the number dropped
    (None if lazy)."""
    kept = keep_rows(dataset, "label_0", lambda label: paired_label(label) != 0.5)
    if isinstance(dataset, datasets.IterableDataset):
        return kept, None
    return kept, len(dataset) - len(kept)


def keep_rows(dataset: Any, column: str, keep: Callable[[Any], bool]) -> Any:
    """The rows whose `column` value passes `keep`: selected by index (no `filter` pass, so no progress bar for a
    look at one column), the dataset itself when all pass, a lazy filter for a streamed dataset."""
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.filter(keep, input_columns=column)
    mask = np.array([bool(keep(value)) for value in dataset[column]], dtype=bool)
    return dataset if mask.all() else dataset.select(np.flatnonzero(mask))


def load_image(value: Any) -> Image.Image:
    """Decode any image cell (PIL image, bytes, `{"bytes", "path"}` dict, path, array) into RGB.

    Transparent images are composited on white; palette, grayscale, CMYK and 16-bit images are
    converted. Truncated files are an error, not a half-grey image; so is anything else PIL raises on a broken
    or oversized file (decompression bombs, bad EXIF), as an `OSError` the datasets count as a skipped row.
    """
    try:
        image = _decode(value)
    except DECODE_ERRORS:
        raise
    except Exception as error:  # PIL raises many types on broken files; one type lets callers skip the row
        raise OSError(f"cannot decode the image ({type(error).__name__}: {error})") from error
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray((np.clip(array / max(array.max(), 1.0), 0.0, 1.0) * 255).astype(np.uint8))
    return image.convert("RGB")


def _decode(value: Any) -> Image.Image:
    """Open and fully decode one image cell, upright (EXIF orientation applied)."""
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(value)
    elif isinstance(value, np.ndarray):
        image = Image.fromarray(value)
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise TypeError(f"cannot read an image from a {type(value).__name__}")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    image.load()
    return ImageOps.exif_transpose(image)


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side to `resolution`, crop a square, optionally flip; pixels to [-1, 1]."""

    resolution: int
    center_crop: bool = True

    def __call__(self, image: Image.Image, rng: random.Random, flip: bool) -> tuple[torch.Tensor, list[int], list[int]]:
        """Returns the tensor, the original (height, width) and the crop's (top, left), as SDXL needs."""
        original = [image.height, image.width]
        if max(original) > MAX_ASPECT_RATIO * min(original):
            raise ValueError(
                f"a {image.width}x{image.height} image is more than {MAX_ASPECT_RATIO:g} times longer than wide"
            )
        scale = self.resolution / min(image.width, image.height)
        size = (
            max(self.resolution, round(image.width * scale)),
            max(self.resolution, round(image.height * scale)),
        )
        image = image.resize(size, Image.BILINEAR)
        if self.center_crop:
            top, left = (image.height - self.resolution) // 2, (image.width - self.resolution) // 2
        else:
            top, left = (
                rng.randint(0, image.height - self.resolution),
                rng.randint(0, image.width - self.resolution),
            )
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            # The kept square, mirrored, starts this far from the left edge of the flipped resized image.
            left = size[0] - left - self.resolution
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original, [top, left]


def row_images(row: Mapping[str, Any], schema: str) -> tuple[str, list[Any], dict[str, Any]]:
    """The prompt, the images (winner first for paired schemas) and extra fields of one row."""
    if schema == "pickapic":
        images = [row["jpg_0"], row["jpg_1"]]
        if paired_label(row["label_0"]) == 0:
            images.reverse()
        return row["caption"], images, {}
    if schema == "preference":
        return row["prompt"], [row["chosen"], row["rejected"]], {}
    if schema == "captioned":
        return row["prompt"], [row["image"]], {}
    return row["prompt"], [row["image"]], {"label": unpaired_label(row["label"])}


def winners_only(dataset: Any, schema: str) -> Any:
    """The preferred image of every pair as a captioned row `(prompt, image)`, e.g. for supervised fine-tuning.

    Nothing is copied and the losers are never decoded: TRL preference data just drops its `rejected` column;
    Pick-a-Pic (raw bytes, the winner named by `label_0`) is viewed lazily, or mapped on the fly when streamed,
    and its ties are dropped (they have no winner).
    """
    if schema == "preference":
        return dataset.select_columns(["prompt", "chosen"]).rename_column("chosen", "image")
    if schema != "pickapic":
        raise ValueError(f"Winners come from paired schemas ({', '.join(PAIRED_SCHEMAS)}), got {schema!r}.")
    dataset, dropped = drop_ties(dataset)
    if dropped:
        logger.info("Dropped %d tied Pick-a-Pic rows: a tie has no winner.", dropped)
    if not isinstance(dataset, datasets.IterableDataset):
        return PickapicWinners(dataset)
    features = datasets.Features({"prompt": datasets.Value("string"), "image": dataset.features["jpg_0"]})
    return dataset.map(_pickapic_winner, remove_columns=list(dataset.column_names), features=features)


def _pickapic_winner(row: Mapping[str, Any]) -> dict[str, Any]:
    """A Pick-a-Pic row's prompt and preferred image."""
    prompt, images, _ = row_images(row, "pickapic")
    return {"prompt": prompt, "image": images[0]}


class PickapicWinners:
    """A map-style Pick-a-Pic dataset seen as captioned rows holding each pair's preferred image."""

    column_names = list(SCHEMAS["captioned"])

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _pickapic_winner(self.dataset[index])


def row_seed(seed: int, epoch: int, index: int) -> int:
    """A stable per-row seed (independent of Python's hash randomisation and of worker processes)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little")


@dataclass
class RowProcessor:
    """Turns one schema row into model inputs; shared by the map-style and streaming datasets."""

    schema: str
    transform: ImageTransform
    random_flip: bool = False
    proportion_empty_prompts: float = 0.0
    swap: bool = False

    def draw_flip(self, rng: random.Random) -> bool:
        """Whether the row is mirrored: the first draw of its generator, which the precompute cache replays."""
        return self.random_flip and rng.random() < 0.5

    def __call__(self, row: Mapping[str, Any], seed: int, flip: bool | None = None) -> dict[str, Any]:
        """One row's inputs; `flip` forces the orientation (the precompute cache encodes both), None draws it."""
        rng = random.Random(seed)
        prompt, images, extra = row_images(row, self.schema)
        if self.swap:
            images.reverse()
        drawn = self.draw_flip(rng)
        flip = drawn if flip is None else flip
        if not isinstance(prompt, str):
            prompt = "" if prompt is None else str(prompt)
        if self.proportion_empty_prompts and rng.random() < self.proportion_empty_prompts:
            prompt = ""
        tensors, sizes, crops = zip(*(self.transform(load_image(image), rng, flip) for image in images), strict=True)
        return {
            "prompt": prompt,
            "pixel_values": torch.stack(tensors),
            "original_sizes": torch.tensor(sizes),
            "crop_top_lefts": torch.tensor(crops),
            **extra,
        }


def probe_images(dataset: Any, processor: RowProcessor, skip_bad_images: bool) -> None:
    """Decode up to `PROBE_ROWS` rows before any compute: raise when none is readable (with `skip_bad_images=False`,
    when any is), naming the rows and the first error."""
    rows = _probe_rows(dataset)
    if not rows:
        raise ValueError("The dataset is empty (after dropping ties, if any): nothing to train on.")
    failures = []
    for index, row in rows:
        try:
            processor(row, seed=0)
        except DECODE_ERRORS as error:
            if not skip_bad_images:
                raise BadImageError(f"Row {index}: cannot read its image ({error}).") from error
            failures.append((index, error))
            continue
        if skip_bad_images:
            return  # one readable row is enough: the others are replaced and counted while training
    if failures:
        columns = [name for name in SCHEMAS[processor.schema] if name in IMAGE_COLUMNS]
        raise BadImageError(
            f"None of the {len(rows)} rows probed {[index for index, _ in rows]} has a readable image "
            f"(row {failures[0][0]}: {failures[0][1]}). Check that the image columns {columns} hold encoded images "
            "or paths that exist on this machine, and that `column_mapping` names the image columns."
        )


def _probe_rows(dataset: Any) -> list[tuple[int, Mapping[str, Any]]]:
    """Up to `PROBE_ROWS` (index, row) pairs: evenly spaced over a map-style dataset, the first rows of a stream."""
    if isinstance(dataset, datasets.IterableDataset):
        return list(enumerate(dataset.take(PROBE_ROWS)))
    count = len(dataset)
    picks = sorted({int(i) for i in np.linspace(0, count - 1, min(count, PROBE_ROWS)).round()}) if count else []
    return [(index, dataset[index]) for index in picks]


class RowKey(NamedTuple):
    """A map-style row with the epoch it is read in, which seeds the row's crop, flip and blanked prompt."""

    epoch: int
    row: int


class RowsDataset(torch.utils.data.Dataset, abc.ABC):
    """Map-style rows read by `RowKey` (a plain index reads epoch 0); an unreadable row is replaced by the next one.

    The epoch travels in the key, not in an attribute, so data-loader workers kept across epochs see it.
    """

    skip_bad_images: bool

    @abc.abstractmethod
    def __len__(self) -> int:
        """Rows, readable or not."""

    @abc.abstractmethod
    def read(self, row: int, epoch: int) -> dict[str, Any]:
        """One row's item in one epoch; raises one of `DECODE_ERRORS` when its images cannot be read."""

    def __getitem__(self, key: int | RowKey) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for offset in range(len(self)):
            row = (index + offset) % len(self)
            try:
                item = self.read(row, epoch)
            except DECODE_ERRORS as error:
                if not self.skip_bad_images:
                    raise BadImageError(f"Row {row}: cannot read its image ({error}).") from error
                logger.debug("Skipping row %d: cannot read its image (%s).", row, error)  # the trainer warns once
                continue
            item["bad_rows"] = offset
            return item
        raise BadImageError("No row of the dataset has readable images.")


class PreferenceDataset(RowsDataset):
    """Map-style view of a `datasets.Dataset`, each row decoded and transformed when read."""

    def __init__(self, dataset: datasets.Dataset, processor: RowProcessor, seed: int, skip_bad_images: bool = True):
        if len(dataset) == 0:
            raise ValueError("The dataset is empty (after dropping ties, if any): nothing to train on.")
        self.dataset, self.processor, self.seed, self.skip_bad_images = (
            dataset,
            processor,
            seed,
            skip_bad_images,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, row: int, epoch: int) -> dict[str, Any]:
        """The row decoded and transformed with its (seed, epoch, row) draws."""
        return self.processor(self.dataset[row], row_seed(self.seed, epoch, row))


class StreamingPreferenceDataset(torch.utils.data.IterableDataset):
    """Iterable view of a streaming `datasets.IterableDataset`; unreadable rows are skipped and counted.

    `epoch` is read when an iteration starts, so it must be set before a data loader copies the dataset into its
    workers: the trainer gives a stream a fresh loader every epoch (see `diffusion_pref_trainers.loader`).
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        processor: RowProcessor,
        seed: int,
        skip_bad_images: bool = True,
    ):
        self.dataset, self.processor, self.seed, self.skip_bad_images = (
            dataset,
            processor,
            seed,
            skip_bad_images,
        )
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch)
        skipped = 0
        for row_index, row in enumerate(self.dataset):
            try:
                item = self.processor(row, row_seed(self.seed, self.epoch, row_index))
            except DECODE_ERRORS as error:
                if not self.skip_bad_images:
                    raise BadImageError(f"Streamed row {row_index}: cannot read its image ({error}).") from error
                logger.debug("Skipping streamed row %d: cannot read its image (%s).", row_index, error)
                skipped += 1
                continue
            item["bad_rows"], skipped = skipped, 0
            yield item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack rows: `pixel_values` becomes [M, K, 3, H, W] with K images per row (2 for pairs).

    Rows read from the precompute cache carry `latents` [K, C, h, w], a `cond` dict and extra embeddings
    instead of pixels: every tensor is stacked the same way, `cond` key by key.
    """
    batch: dict[str, Any] = {"prompt": [item["prompt"] for item in items]}
    for key, value in items[0].items():
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack([item[key] for item in items])
    if "cond" in items[0]:
        batch["cond"] = {key: torch.stack([item["cond"][key] for item in items]) for key in items[0]["cond"]}
    if "label" in items[0]:
        batch["label"] = torch.tensor([item["label"] for item in items])
    batch["bad_rows"] = torch.tensor(sum(item["bad_rows"] for item in items))
    return batch
