"""Declaring and checking config fields: a field with help text, value checks that name the field, and each
value checked against its field's annotation (the command line and recipes give text; Python users give values)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import types
import typing
from dataclasses import field
from typing import Any


def with_help(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with help text (TRL style); mutable defaults go through `default_factory`."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)


def check(condition: bool, message: str) -> None:
    """Raise a `ValueError` carrying `message` when `condition` is false."""
    if not condition:
        raise ValueError(message)


def check_finite_numbers(config: Any) -> None:
    """Reject NaN and infinity in every float-valued field, naming the field (they would train a NaN model)."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, float):
            check(
                math.isfinite(value),
                f"`{item.name}` must be a finite number, got {value}: NaN or infinity would make every training "
                "step non-finite.",
            )


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Reject a value outside `choices`, listing the accepted ones."""
    check(value in choices, f"`{name}={value!r}` is not supported; choose one of {', '.join(choices)}.")


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """transformers' `optim_args` string 'k=v,k=v' as keyword arguments; numbers and booleans are read as such."""
    values: dict[str, Any] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        check(
            bool(key and sep and value), f"`optim_args={text!r}` must read 'key=value,key=value', e.g. 'momentum=0.9'."
        )
        values[key] = _literal(value)
    return values


def _literal(value: str) -> Any:
    """A string as the number or boolean it spells, else itself."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of dataclass `cls` (the module's annotations are strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def split_optional(hint: Any) -> tuple[Any, bool]:
    """`X | None` as (X, True); any other annotation as (itself, False)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else hint), type(None) in args
    return hint, False


def _type_name(hint: Any) -> str:
    """How an error names an expected type."""
    names = {bool: "True or False", int: "a whole number", float: "a number, e.g. 1e-4", str: "a string"}
    origin = typing.get_origin(hint)
    if origin is list:
        return "a list of strings (or one string)"
    if origin is dict:
        return "a mapping of strings to strings" if typing.get_args(hint)[1] is str else "a mapping (dict)"
    return names.get(hint, str(hint))


def _dict_or_json(hint: Any) -> Any:
    """The `dict[...]` of TRL's `dict[...] | str` annotation (a mapping, or a JSON object as text from the command
    line); None for any other annotation."""
    args = typing.get_args(hint)
    mapping = [arg for arg in args if typing.get_origin(arg) is dict]
    return mapping[0] if mapping and str in args else None


def _json_object(name: str, text: str) -> Any:
    """The JSON text given for a `dict | str` field, decoded; a `ValueError` naming the field when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f'`{name}` takes a mapping, or a JSON object as text (e.g. \'{{"text": "prompt"}}\'); got {text!r}, '
            f"which is not JSON ({error.msg})."
        ) from None


def checked_value(name: str, value: Any, hint: Any) -> Any:
    """`value` of field `name` if it has the annotated type (any integer, numpy's too, is an int; any real number a
    float for float fields; a string a one-item list; a path a string; for TRL's `dict | str`, JSON text the mapping
    it encodes); otherwise a `TypeError` naming the field, the value and the type."""
    kind, optional = split_optional(hint)
    if value is None and optional:
        return value
    if _dict_or_json(kind) is not None:
        kind, value = _dict_or_json(kind), _json_object(name, value) if isinstance(value, str) else value
    origin = typing.get_origin(kind)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if origin is list and isinstance(value, (str, list, tuple)):
        items = [value] if isinstance(value, str) else list(value)
        if all(isinstance(item, str) for item in items):
            return items
    elif origin is dict and isinstance(value, dict):
        return value
    elif kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    elif kind in (bool, str) and isinstance(value, kind):
        return value
    expected = _type_name(kind) + (" or None" if optional else "")
    raise TypeError(f"`{name}` must be {expected}, got {value!r} ({type(value).__name__}).")
