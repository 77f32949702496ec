"""Render the configuration reference (`docs/configuration.md`) from the dataclasses' help texts.

One source of truth: the help text lives on the fields, and a test checks that the committed page
equals this rendering. Regenerate with `python -m diffusion_pref_trainers.config_docs > docs/configuration.md`.
"""

from __future__ import annotations

import dataclasses
import inspect

from diffusion_pref_trainers.configs import DiffusionTrainingConfig
from diffusion_pref_trainers.trainers import TRAINERS


def _default(field: dataclasses.Field) -> str:
    """The field's default as it would be written in Python."""
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    return repr(field.default_factory()) if field.default_factory is not dataclasses.MISSING else "required"


def _table(config_class: type, inherited: set[str]) -> list[str]:
    """A Markdown table of the fields `config_class` adds (or re-defaults) beyond `inherited`."""
    lines = ["| field | default | description |", "|---|---|---|"]
    for field in dataclasses.fields(config_class):
        if field.name in inherited:
            continue
        text = field.metadata.get("help", "").replace("|", "\\|")
        lines.append(f"| `{field.name}` | `{_default(field)}` | {text} |")
    return lines


def _parent(config_class: type) -> type | None:
    """The nearest dataclass the config extends (None for the base settings)."""
    return next((base for base in config_class.__mro__[1:] if dataclasses.is_dataclass(base)), None)


def config_reference() -> str:
    """The whole page: the shared settings, then what each method's config adds to its parent."""
    classes = [DiffusionTrainingConfig] + sorted(
        {trainer.config_class for trainer in TRAINERS.values()}, key=lambda c: (len(c.__mro__), c.__name__)
    )
    out = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses' help texts by `python -m diffusion_pref_trainers.config_docs`;",
        "a test keeps this page in sync. Every field can be set in a recipe YAML or on the command line",
        "(`--field value`, read by the field's type). A value of the wrong type raises a `TypeError`, an invalid one a",
        "`ValueError`, naming the field and the fix before any model is loaded (see docs/troubleshooting.md).",
    ]
    for config_class in classes:
        parent = _parent(config_class)
        inherited = {f.name for f in dataclasses.fields(parent)} if parent else set()
        summary = inspect.getdoc(config_class).split("\n\n")[0].replace("\n", " ")
        extends = f" (extends `{parent.__name__}`)" if parent else ""
        out += ["", f"## `{config_class.__name__}`{extends}", "", summary, "", *_table(config_class, inherited)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
