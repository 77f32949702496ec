"""The precompute cache (`cache_latents`): every row encoded once, stored with datasets, reused by fingerprint.

`Dataset.map` writes each row's VAE latents (the posterior mean, exactly what an uncached step computes), its
prompt conditioning and the per-row extras an objective asks for (RPO: CLIP embeddings) into an Arrow file
named by a fingerprint of all they depend on: the rows (datasets' own fingerprint), the encoders' weights and
dtype, the image settings and the objective's extras. A run with the same fingerprint reads the file (a hit)
and calls no encoder; any change makes a new file (a miss).

With `random_flip`, whatever depends on the pixels is stored for both orientations and each row's flip is
replayed from the same (seed, epoch, row) draw as uncached training: training sees the same rows, flips and
values with and without the cache, up to float rounding (encoders group rows into batches differently). Random
crops and blanked prompts are drawn anew every epoch and cannot be stored that way (the config refuses them), and
a streamed dataset is read once, leaving nothing to reuse (refused here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import nn

from diffusion_pref_trainers.data import (
    DECODE_ERRORS,
    BadImageError,
    PreferenceDataset,
    RowProcessor,
    RowsDataset,
    StreamingPreferenceDataset,
    collate,
    row_seed,
)

logger = logging.getLogger(__name__)

# Part of every fingerprint: bump it when the stored layout changes, so that older files are never misread.
CACHE_VERSION = 1
COND, EXTRA = "cond/", "extra/"


@dataclass(frozen=True)
class CacheEncoders:
    """What runs once per row: pixels -> latents, prompts -> conditioning (None: not cached), a batch -> extras."""

    images: Callable[[torch.Tensor], torch.Tensor]
    prompts: Callable[[list[str]], dict[str, torch.Tensor]] | None
    extras: Callable[[dict[str, Any]], dict[str, torch.Tensor]]


def _hash(*parts: Any) -> str:
    """A stable hex digest of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def weights_identity(modules: Sequence[nn.Module]) -> str:
    """A hash of the modules' weights: each tensor's name, shape, dtype and sums of values and magnitudes.

    Sums are written to 12 significant digits, so that a device's reduction order hardly ever changes them (which
    would only cost a rebuild) while any real change of the weights (another checkpoint, a fine-tune, a dtype)
    does. Cheap next to one encoding pass over the data.
    """
    entries = []
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            values = tensor.detach().double()
            sums = f"{values.sum().item():.12g},{values.abs().sum().item():.12g}"
            entries.append(f"{index}/{name}:{tuple(tensor.shape)}:{tensor.dtype}:{sums}")
    return _hash(entries)


def dataset_fingerprint(dataset: Any) -> str:
    """datasets' fingerprint of the rows; a lazy view over a dataset (e.g. Pick-a-Pic winners) adds its name."""
    if isinstance(dataset, datasets.Dataset):
        return dataset._fingerprint
    inner = getattr(dataset, "dataset", None)
    if inner is None:
        raise TypeError(f"`cache_latents` cannot fingerprint a {type(dataset).__name__}: pass a datasets.Dataset.")
    return _hash(type(dataset).__name__, dataset_fingerprint(inner))


def cache_fingerprint(wrapped: PreferenceDataset, modules: Sequence[nn.Module], settings: dict[str, Any]) -> str:
    """The name of a dataset's cache: rows, encoder weights, image settings and the caller's `settings`."""
    processor = wrapped.processor
    images = {
        "resolution": processor.transform.resolution,
        "center_crop": processor.transform.center_crop,
        "random_flip": processor.random_flip,
        "swap": processor.swap,
        "schema": processor.schema,
    }
    return _hash(CACHE_VERSION, dataset_fingerprint(wrapped.dataset), weights_identity(modules), images, settings)[:32]


def cache_dataset(
    wrapped: Any,
    encoders: CacheEncoders,
    *,
    modules: Sequence[nn.Module],
    settings: dict[str, Any],
    cache_dir: str | None,
    batch_size: int,
    cond_dtype: torch.dtype,
) -> CachedPreferenceDataset:
    """`wrapped`'s rows read from its cache, which is built first if no file carries its fingerprint.

    `modules` are the encoders whose weights the entries depend on; `settings` whatever else does (family,
    extras); `cond_dtype` the dtype the prompt encoders return, restored on reading (files hold float32).
    """
    if isinstance(wrapped, StreamingPreferenceDataset):
        raise ValueError(
            "`cache_latents` needs a map-style dataset: a streamed dataset is read once, so a cache would never be "
            "reused. Pass a `datasets.Dataset` (not streamed), or set `cache_latents=False`."
        )
    fingerprint = cache_fingerprint(wrapped, modules, settings)
    folder = Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE, "diffusion_pref_trainers")
    path = folder / f"{fingerprint}.arrow"
    if path.exists():
        logger.info("Precompute cache hit: %s", path)
        rows = datasets.Dataset.from_file(str(path))
    else:
        logger.info("Precompute cache miss: encoding %d rows into %s", len(wrapped), path)
        folder.mkdir(parents=True, exist_ok=True)
        rows = _build(wrapped, encoders, path, fingerprint, batch_size)
        unreadable = rows.data.column("readable").to_pylist().count(False)
        if unreadable:  # one warning for the build; each row is logged at DEBUG level
            logger.warning(
                "%d of %d rows have unreadable images: training reads the next one instead.", unreadable, len(rows)
            )
    return CachedPreferenceDataset(rows, wrapped.processor, wrapped.seed, wrapped.skip_bad_images, cond_dtype, path)


def _build(
    wrapped: PreferenceDataset, encoders: CacheEncoders, path: Path, fingerprint: str, batch_size: int
) -> datasets.Dataset:
    """`Dataset.map` over the row indices, written to `path` (datasets writes a temporary file, then renames it)."""
    flips = (False, True) if wrapped.processor.random_flip else (False,)

    def oriented(index: int) -> list[dict[str, Any]] | None:
        """The row processed in each orientation, or None when its images cannot be decoded."""
        seed = row_seed(wrapped.seed, 0, index)  # centre crops and forced flips draw nothing from it
        try:
            return [{**wrapped.processor(wrapped.dataset[index], seed, flip=flip), "bad_rows": 0} for flip in flips]
        except DECODE_ERRORS as error:
            if not wrapped.skip_bad_images:
                raise BadImageError(f"Row {index}: cannot read its image ({error}).") from error
            logger.debug("Row %d: cannot read its image (%s); the cache marks it unreadable.", index, error)
            return None

    # The first readable row gives the stored shapes; unreadable rows are kept (as zeros) so indices stay those
    # of the uncached dataset, which replaces them by the next readable row in the same way.
    first = next((row for row in map(oriented, range(len(wrapped))) if row is not None), None)
    if first is None:
        raise BadImageError("No row of the dataset has readable images.")
    template = {key: value[0] for key, value in _encode([first], encoders).items()}
    labelled = "label" in first[0]

    def encode_rows(batch: dict[str, list[int]]) -> dict[str, Any]:
        rows = [oriented(index) for index in batch["index"]]
        readable = [i for i, row in enumerate(rows) if row is not None]
        out: dict[str, Any] = {key: np.zeros((len(rows), *value.shape), value.dtype) for key, value in template.items()}
        if readable:
            for key, value in _encode([rows[i] for i in readable], encoders).items():
                out[key][readable] = value
        out["readable"] = [row is not None for row in rows]
        out["prompt"] = [row[0]["prompt"] if row else "" for row in rows]
        if labelled:
            out["label"] = [bool(row and row[0]["label"]) for row in rows]
        return out

    return datasets.Dataset.from_dict({"index": list(range(len(wrapped)))}).map(
        encode_rows, batched=True, batch_size=batch_size, writer_batch_size=batch_size, remove_columns=["index"],
        features=_features(template, labelled), cache_file_name=str(path), new_fingerprint=fingerprint,
        desc="caching latents",
    )  # fmt: skip


@torch.no_grad()
def _encode(rows: list[list[dict[str, Any]]], encoders: CacheEncoders) -> dict[str, np.ndarray]:
    """One batch of processed rows as arrays: pixel-dependent entries stacked over orientations (dim 1)."""
    oriented = []
    for side in range(len(rows[0])):
        batch = collate([row[side] for row in rows])
        pixels = batch["pixel_values"]
        latents = encoders.images(pixels.flatten(0, 1)).unflatten(0, pixels.shape[:2])
        extras = {EXTRA + key: value for key, value in encoders.extras(batch).items()}
        oriented.append({"latents": latents, "crop_top_lefts": batch["crop_top_lefts"], **extras})
    out = {key: torch.stack([side[key] for side in oriented], 1) for key in oriented[0]}
    first = collate([row[0] for row in rows])
    out["original_sizes"] = first["original_sizes"]
    if encoders.prompts is not None:
        out.update({COND + key: value for key, value in encoders.prompts(first["prompt"]).items()})
    return {key: _array(value) for key, value in out.items()}


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU array: floats as float32 (exact for fp16/bf16 values), integers as int64."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor.long()).numpy()


def _features(template: dict[str, np.ndarray], labelled: bool) -> datasets.Features:
    """Fixed-shape Arrow features of one row's arrays, read back as tensors."""
    features = {"prompt": datasets.Value("string"), "readable": datasets.Value("bool")}
    if labelled:
        features["label"] = datasets.Value("bool")
    for key, value in template.items():
        dtype = str(value.dtype)
        if value.ndim == 1:
            features[key] = datasets.List(datasets.Value(dtype), length=value.shape[0])
        else:
            array = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D, 5: datasets.Array5D}[value.ndim]
            features[key] = array(value.shape, dtype)
    return datasets.Features(features)


class ArrowRows:
    """Rows of a cache file as tensors, read straight from its memory-mapped Arrow table.

    `datasets`' torch formatting converts a row of fixed-shape arrays element by element in Python; here each array
    column is one zero-copy view of its values, reshaped to the column's feature shape and copied once into a
    tensor: 0.30 ms against 0.89 ms for a full-size SD1.5 row (`benchmarks/cache_read.py`). Arrays come out with
    the formatter's values and dtypes, scalar columns (prompt, label) as Python values. It pickles as the file's
    path (datasets' memory-mapped table), not its bytes, so loader workers map the file themselves.
    """

    def __init__(self, rows: datasets.Dataset) -> None:
        if rows._indices is not None:  # a cache file is read whole; a selection would remap its rows
            raise ValueError("ArrowRows reads a cache file's rows in storage order: pass the unselected dataset.")
        self.data = rows.data
        self.chunk_starts = np.cumsum([0, *(len(chunk) for chunk in self.data.table.column(0).chunks)])
        self.shapes = {name: _feature_shape(feature) for name, feature in rows.features.items()}

    def __len__(self) -> int:
        return self.data.num_rows

    def __getitem__(self, row: int) -> dict[str, Any]:
        chunk = int(np.searchsorted(self.chunk_starts, row, side="right")) - 1
        offset = row - int(self.chunk_starts[chunk])
        table = self.data.table
        out: dict[str, Any] = {}
        for name, shape in self.shapes.items():
            array = table.column(name).chunk(chunk).slice(offset, 1)
            if shape is None:
                out[name] = array.to_pylist()[0]
                continue
            if isinstance(array, pa.ExtensionArray):
                array = array.storage
            while pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
                array = array.flatten()  # one nesting level, honouring the slice
            out[name] = torch.from_numpy(array.to_numpy(zero_copy_only=False).reshape(shape).copy())
        return out


def _feature_shape(feature: Any) -> tuple[int, ...] | None:
    """The array shape a cache column stores per row (None: a scalar, read as a Python value)."""
    if isinstance(feature, datasets.List):
        return (feature.length,)
    return getattr(feature, "shape", None)


class CachedPreferenceDataset(RowsDataset):
    """Rows read from the cache: latents, conditioning and extras in place of pixels, same indices and flips.

    A row whose images could not be decoded is replaced by the next readable one and counted in `bad_rows`, as
    `PreferenceDataset` does (or raises with `skip_bad_images=False`).
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        processor: RowProcessor,
        seed: int,
        skip_bad_images: bool,
        cond_dtype: torch.dtype,
        cache_file: Path,
    ) -> None:
        self.rows, self.readable = ArrowRows(rows), rows.data.column("readable").to_pylist()
        self.processor, self.seed, self.skip_bad_images = processor, seed, skip_bad_images
        self.cond_dtype, self.cache_file = cond_dtype, cache_file

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, row: int, epoch: int) -> dict[str, Any]:
        """The row's stored entries in the orientation its (seed, epoch, row) flip draw picks."""
        if not self.readable[row]:
            raise OSError("found when the cache was built")
        stored = self.rows[row]
        side = int(self.processor.draw_flip(random.Random(row_seed(self.seed, epoch, row))))
        item = {
            "prompt": stored["prompt"],
            "latents": stored["latents"][side],
            "original_sizes": stored["original_sizes"],
            "crop_top_lefts": stored["crop_top_lefts"][side],
        }
        cond = {key[len(COND) :]: value.to(self.cond_dtype) for key, value in stored.items() if key.startswith(COND)}
        if cond:
            item["cond"] = cond
        item.update({key[len(EXTRA) :]: value[side] for key, value in stored.items() if key.startswith(EXTRA)})
        if "label" in stored:
            item["label"] = stored["label"]
        return item
