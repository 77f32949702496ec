"""Resolve what a user passes as a model or dataset: objects, Hub ids or local paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from diffusion_pref_trainers.hub import hub_is_offline, is_hub_id


def load_pipeline(model: Any) -> Any:
    """A diffusers pipeline object as is, or one loaded from a Hub id / local folder (never remote code)."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(str(model), use_safetensors=True)
    except (OSError, ValueError) as error:
        raise _load_failure("pipeline", str(model), error) from (error if _debugging() else None)


def _debugging() -> bool:
    """`DPT_DEBUG=1`: loading errors keep the libraries' full chained tracebacks behind our short message."""
    return os.environ.get("DPT_DEBUG", "0").lower() not in ("", "0", "false", "no")


def _load_failure(kind: str, source: str, error: BaseException) -> OSError:
    """One short error in our words: what was looked for, where, and what to do (a local folder's error says why)."""
    path = Path(source).expanduser()
    if path.exists():
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        problem = f"the local folder {path.resolve()} holds no loadable {kind} ({reason})"
        fix = f"pass a folder written by the {kind}'s `save_pretrained`, or a Hub id"
    elif is_hub_id(source):
        offline = " (HF_HUB_OFFLINE is set: only the cache was searched)" if hub_is_offline() else ""
        repo_type = " --repo-type dataset" if kind == "dataset" else ""
        problem = (
            f"it is neither on the Hugging Face Hub nor in the local cache{offline}, and no local folder has that name"
        )
        fix = (
            f"check the id; go online, or download it first (`hf download {source}{repo_type}`); or pass a local folder"
        )
    else:
        problem = "no local path of that name exists, and it is not a Hub id (owner/name)"
        fix = "check the path, or pass a Hub id"
    return OSError(f"Cannot load the {kind} {source!r}: {problem}. Fix: {fix}. (DPT_DEBUG=1 shows the full traceback.)")


def _pick_split(loaded: Any, split: str) -> Any:
    """A split of a `DatasetDict`, with an error naming the splits that exist."""
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in loaded:
            raise ValueError(f"The dataset has no split {split!r}; its splits are {list(loaded)}.")
        return loaded[split]
    return loaded


def load_preference_dataset(
    source: Any, *, split: str = "train", config_name: str | None = None, streaming: bool = False
) -> Any:
    """A `datasets.Dataset`/`IterableDataset` as is, or loaded from a Hub id or local path.

    Local forms: a `save_to_disk` folder, a parquet file or a folder of parquet files, and an
    `imagefolder` folder (images plus a `metadata.jsonl`/`metadata.csv`). A stream whose columns are not
    declared (e.g. JSON shards) has them read from its first row, so the schema can be detected.
    """
    dataset = _load(source, split, config_name, streaming)
    if isinstance(dataset, datasets.IterableDataset) and dataset.column_names is None:
        dataset = dataset._resolve_features()
    return dataset


def _load(source: Any, split: str, config_name: str | None, streaming: bool) -> Any:
    """The dataset `source` names, one split of it."""
    if source is None or isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return _pick_split(source, split)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"A dataset must be a datasets.Dataset, a Hub id or a path, not {type(source).__name__}.")
    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = _pick_split(datasets.load_from_disk(str(path)), split)
        return loaded.to_iterable_dataset() if streaming else loaded
    if path.is_file() and path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files={split: str(path)}, split=split, streaming=streaming)
    if path.is_dir():
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:
            return datasets.load_dataset("parquet", data_files={split: parquet}, split=split, streaming=streaming)
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path), streaming=streaming)
        if split not in loaded and list(loaded) == ["train"] and not (path / "train").is_dir():
            return loaded["train"]  # a flat folder is one split, whatever it is asked for as
        return _pick_split(loaded, split)
    if path.exists():
        raise ValueError(f"{source} is neither a parquet file nor a dataset folder.")
    try:
        return datasets.load_dataset(str(source), config_name, split=split, streaming=streaming)
    except OSError as error:  # not found, unreachable or not cached (a missing split is a ValueError, kept)
        raise _load_failure("dataset", str(source), error) from (error if _debugging() else None)
