"""Optimizer and random-generator states as safetensors plus JSON: a checkpoint is resumed without unpickling.

A state is a tree of dicts, lists and tuples over tensors and plain values (an optimizer's `state_dict()`,
`random.getstate()`). `flatten` splits it into named tensors (one safetensors file) and a JSON skeleton that
names them; `unflatten` rebuilds the same tree, container types, key types and tensor dtypes included.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

Tree = Any  # nested dict / list / tuple over tensors, numbers, strings, booleans and None
SCALARS = (bool, int, float, str, type(None))


def flatten(tree: Tree) -> tuple[Tree, dict[str, torch.Tensor]]:
    """The JSON skeleton of `tree` and its tensors by name (CPU copies: no two share memory, as safetensors asks)."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(node: Tree, path: str) -> Tree:
        """The skeleton of `node`, whose tensors are named after their path from the root."""
        if isinstance(node, torch.Tensor):
            if path in tensors:
                raise ValueError(f"Two tensors of the state would be stored as {path!r}.")
            tensors[path] = node.detach().to("cpu", copy=True).contiguous()
            return {"tensor": path}
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, (str, int)):
                    raise TypeError(f"Cannot store the key {key!r} at {path!r}: only str and int keys are kept.")
            return {"dict": [[key, encode(value, _join(path, key))] for key, value in node.items()]}
        if isinstance(node, (list, tuple)):
            return {type(node).__name__: [encode(value, _join(path, i)) for i, value in enumerate(node)]}
        if isinstance(node, SCALARS):
            return node
        raise TypeError(f"Cannot store a {type(node).__name__} at {path!r} without pickling it.")

    return encode(tree, ""), tensors


def _join(path: str, key: str | int) -> str:
    """The name of a child node's tensor: its keys from the root, joined by '/'."""
    return f"{path}/{key}" if path else str(key)


def unflatten(skeleton: Tree, tensors: dict[str, torch.Tensor]) -> Tree:
    """The tree `flatten` split into `skeleton` and `tensors`."""
    if not isinstance(skeleton, dict):
        return skeleton
    [(kind, value)] = skeleton.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {key: unflatten(item, tensors) for key, item in value}
    items = [unflatten(item, tensors) for item in value]
    return tuple(items) if kind == "tuple" else items


def save(tree: Tree, folder: str | Path, name: str) -> None:
    """Write `tree` as `<name>.safetensors` (its tensors) and `<name>.json` (everything else)."""
    skeleton, tensors = flatten(tree)
    save_file(tensors, str(Path(folder, f"{name}.safetensors")))
    Path(folder, f"{name}.json").write_text(json.dumps(skeleton))


def load(folder: str | Path, name: str) -> Tree:
    """Read a tree written by `save`, its tensors on the CPU."""
    tensors = load_file(str(Path(folder, f"{name}.safetensors")))
    return unflatten(json.loads(Path(folder, f"{name}.json").read_text()), tensors)


def rng_state() -> dict[str, Tree]:
    """The states of the generators a process draws from: Python's, NumPy's, torch's CPU one and CUDA's if any."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Tree]) -> None:
    """Restore the generators from `rng_state()`, so the next random numbers are the ones that would have come."""
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
