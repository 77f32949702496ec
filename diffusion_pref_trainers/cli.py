"""The command line behind `examples/train.py`: a YAML recipe plus `--key value` overrides, one trainer run.

A recipe is a flat YAML mapping. `method` picks the trainer (dpo, rpo, ...); the keys of
`ScriptArguments` say where the model and data come from (TRL's names); every other key is a field of
that method's config dataclass, including how the dataset is read (`dataset_config`, `dataset_train_split`,
`dataset_test_split`, `dataset_streaming`, `column_mapping`). With no model and no dataset, the run stays offline:
with `toy_task` it aligns the shipped toy-world pipeline to that task (pairs sampled from the pipeline itself,
labelled by the task's exact reward) and reports the reward before and after; without it, it uses the tiny
random pipeline and generated pairs of the offline kit.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import resource
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from diffusion_pref_trainers.configs import METHOD_CONFIGS, _help, field_types, split_optional


@dataclass
class ScriptArguments:
    """Where the model and the data come from (TRL's `ScriptArguments` names), and which method trains."""

    method: str = _help(f"The objective to train with: one of {', '.join(sorted(METHOD_CONFIGS))}.", "dpo")
    model_name_or_path: str | None = _help(
        "A diffusers pipeline: Hub id or local folder. None: the built-in tiny pipeline (offline).", None
    )
    dataset_name: str | None = _help(
        "A preference dataset: Hub id, `save_to_disk` folder, parquet file/folder or imagefolder, read with the "
        "config's `dataset_config`, `dataset_train_split`, `dataset_test_split` and `dataset_streaming`. None: "
        "generated pairs of the built-in kit.",
        None,
    )
    builtin_pairs: int = _help("Built-in kit only: how many generated training pairs (eval uses 8 others).", 16)
    toy_task: str | None = _help(
        "Toy world (no model and no dataset given): align the shipped toy pipeline to this task (warm, large, "
        "striped, centred). None: the built-in kit.",
        None,
    )
    toy_prompts: int = _help("Toy world only: how many training prompts to sample the base pipeline for.", 48)


def read_recipe(path: str | None) -> dict[str, Any]:
    """The flat mapping of a YAML recipe (empty when no path); values are typed later, by `split_settings`."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"Recipe {path} does not exist: pass --config a YAML file (see examples/configs/).")
    recipe = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must hold a mapping of settings, not a {type(recipe).__name__}.")
    return recipe


class Flag(str):
    """A bare `--name` given without a value: True for a bool field, an error for any other."""


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs as text, and a bare `--key` as a `Flag`; `split_settings` types the
    text by the field's annotation, as TRL's parser does."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--"):
            raise ValueError(f"Expected an option like --learning_rate 1e-4, got {token!r}.")
        key, sep, value = token[2:].partition("=")
        if not sep:
            bare = index + 1 >= len(tokens) or tokens[index + 1].startswith("--")
            value = Flag(key) if bare else tokens[index + 1]
            index += 0 if bare else 1
        overrides[key.replace("-", "_")] = value
        index += 1
    return overrides


_INTEGER = re.compile(r"[+-]?\d+")
# transformers' `string_to_bool`, which TRL's parser applies to bool fields.
_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")
_NONE = ("none", "null", "~")


def _from_text(name: str, text: str, kind: Any) -> Any:
    """Text (from the command line or a quoted YAML value) as a value of type `kind`; an error naming the option
    when it cannot be a switch or a number. Other text stays text, for the config to check."""
    origin = typing.get_origin(kind)
    if kind is bool and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    if kind is bool:
        raise ValueError(f"--{name} {text}: `{name}` takes a boolean (true/false, yes/no, 1/0).")
    if kind is int and not _INTEGER.fullmatch(text):
        raise ValueError(f"--{name} {text}: `{name}` takes a whole number.")
    if kind is int:
        return int(text)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--{name} {text}: `{name}` takes a number, e.g. 1e-4.") from None
    if origin is dict or (origin is list and text.startswith("[")):
        return yaml.safe_load(text)
    return text


def typed_value(name: str, value: Any, hint: Any) -> Any:
    """A setting (command-line text, a bare flag, or a YAML value) as field `name` of annotation `hint` reads it.

    Text is read by the annotation (`no` is False for a bool field and stays 'no' for a string field; `none` is
    None where None is allowed; `[a, b]` is a list); from YAML, `1e-4` is a number for a float field and a
    YAML 1.1 boolean (`no`, `off`, ...) is 'no'/'yes' for a string field. The config checks the result.
    """
    kind, optional = split_optional(hint)
    if isinstance(value, Flag):
        if kind is not bool:
            raise ValueError(f"Option --{name} needs a value: only switches (True/False fields) can be given bare.")
        return True
    if isinstance(value, str) and optional and value.lower() in _NONE:
        return None
    if isinstance(value, str) and kind is not str:
        return _from_text(name, value, kind)
    if isinstance(value, bool) and kind is str:
        return "yes" if value else "no"
    return value


def _unknown_keys_error(unknown: list[str], valid: set[str], method: str) -> ValueError:
    """An error naming each unknown key with the closest valid names."""
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(valid), n=3)
        lines.append(f"`{key}`" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return ValueError(f"Unknown settings for method {method!r}: {'; '.join(lines)}. Valid: {sorted(valid)}.")


def split_settings(settings: dict[str, Any]) -> tuple[ScriptArguments, Any]:
    """Script arguments and the method's config from one mapping, each value typed by its field's annotation;
    an unknown key is an error naming the closest valid ones."""
    method = typed_value("method", settings.get("method", "dpo"), str)
    if method not in METHOD_CONFIGS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(sorted(METHOD_CONFIGS))}.")
    config_class = METHOD_CONFIGS[method]
    script_types, config_types = field_types(ScriptArguments), field_types(config_class)
    unknown = sorted(set(settings) - set(script_types) - set(config_types))
    if unknown:
        raise _unknown_keys_error(unknown, set(script_types) | set(config_types), method)
    typed = {key: typed_value(key, value, {**script_types, **config_types}[key]) for key, value in settings.items()}
    script = ScriptArguments(**{k: v for k, v in typed.items() if k in script_types})
    return script, config_class(**{k: v for k, v in typed.items() if k in config_types})


def _load_data(script: ScriptArguments, resolution: int) -> tuple[Any, Any]:
    """Training and eval datasets: the named one (the trainer reads its splits, as TRL's scripts do), or
    generated pairs (8 held out) of the built-in kit at `resolution` px."""
    if script.dataset_name is None:
        from diffusion_pref_trainers.testing import make_preference_dataset

        train = make_preference_dataset(script.builtin_pairs, size=resolution, seed=0)
        return train, make_preference_dataset(8, size=resolution, seed=1)
    return script.dataset_name, None


def run_toy(script: ScriptArguments, args: Any, given: set[str]) -> dict[str, Any]:
    """Align the shipped toy pipeline to `script.toy_task` with the config settings in `given` (typed, from
    `args`); the summary has the reward before and after."""
    from diffusion_pref_trainers.toy.alignment import ToyExperiment, run_experiment

    config_keys = {f.name for f in dataclasses.fields(args)}
    overrides = {key: getattr(args, key) for key in given if key in config_keys}
    output_dir = overrides.pop("output_dir", f"outputs/toy-{script.toy_task}-{script.method}")
    experiment = ToyExperiment(task=script.toy_task, train_prompts=script.toy_prompts)
    summary = run_experiment(script.method, experiment, output_dir, overrides)
    return {"adapter": str(Path(output_dir).resolve()), **summary}


def run(settings: dict[str, Any]) -> dict[str, Any]:
    """Train once with `settings` (recipe plus overrides); returns the adapter path, metrics and timing."""
    from diffusion_pref_trainers.families import get_family
    from diffusion_pref_trainers.sources import load_pipeline
    from diffusion_pref_trainers.trainers import TRAINERS

    script, args = split_settings(settings)
    if script.toy_task is not None and script.model_name_or_path is None and script.dataset_name is None:
        return run_toy(script, args, set(settings))
    if script.model_name_or_path is None:
        from diffusion_pref_trainers.testing import tiny_sd_pipeline

        model = tiny_sd_pipeline()
    else:
        model = load_pipeline(script.model_name_or_path)
    train, eval_ = _load_data(script, args.resolution or get_family(model).default_resolution)
    trainer = TRAINERS[script.method](model, args, train, eval_dataset=eval_)
    before = trainer.evaluate() if trainer.eval_dataset is not None else {}
    start = time.perf_counter()
    trainer.train()
    state = trainer.state
    seconds = time.perf_counter() - start
    final = {k: v for entry in state.log_history for k, v in entry.items() if k.startswith("eval_")}
    return {
        "method": script.method,
        "adapter": str(Path(args.output_dir).resolve()),
        "steps": state.global_step,
        "processes": trainer.accelerator.num_processes,
        "train_seconds": round(seconds, 2),
        "ms_per_step": round(1000 * seconds / max(state.global_step, 1), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "eval_before": before,
        "eval_after": final,
    }


def use_cpu_for_several_processes() -> None:
    """Several processes launched on a machine without an accelerator train together over gloo.

    accelerate treats them as GPU processes unless ACCELERATE_USE_CPU is set (no config-file key sets it for a
    multi-process launch), and each would then train alone; set it here, before any accelerate state exists.
    """
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def print_help(parser: argparse.ArgumentParser, settings: dict[str, Any]) -> NoReturn:
    """Print the options: `--config`, the script arguments and every field of the method's config, then exit."""
    method = settings.get("method", ScriptArguments.method)
    if method not in METHOD_CONFIGS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(sorted(METHOD_CONFIGS))}.")
    full = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        parents=[parser],
        add_help=False,
        usage="%(prog)s [--config RECIPE.yaml] [--setting value ...]",
        epilog="Values are read as YAML: `--learning_rate 1e-4`, `--gradient_checkpointing true`.",
    )
    for title, fields in (
        ("script arguments", dataclasses.fields(ScriptArguments)),
        (f"{method} settings ({METHOD_CONFIGS[method].__name__})", dataclasses.fields(METHOD_CONFIGS[method])),
    ):
        group = full.add_argument_group(title)
        for field in fields:
            value = f"set: {settings[field.name]!r}" if field.name in settings else f"default: {_default(field)!r}"
            text = field.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
            group.add_argument(f"--{field.name}", metavar="VALUE", help=f"{text} ({value})")
    full.print_help()
    sys.exit(0)


def _default(field: dataclasses.Field) -> Any:
    """A dataclass field's default value (None when it has none)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def main(argv: list[str] | None = None, default_recipe: str | None = None) -> dict[str, Any]:
    """Parse `--config recipe.yaml [--key value ...]`, train, print and return the summary; `--help` lists every
    setting of the chosen method (from `--method` or the recipe) without importing torch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False, add_help=False)
    parser.add_argument("--config", default=default_recipe, help="A YAML recipe (see examples/configs/).")
    parser.add_argument("-h", "--help", action="store_true", help="Show every setting of the method and exit.")
    known, rest = parser.parse_known_args(argv)
    try:
        settings = {**read_recipe(known.config), **parse_overrides(rest)}
        if not known.help:
            split_settings(settings)  # a bad setting is a usage error (exit 2), before anything loads
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    if known.help:
        print_help(parser, settings)
    use_cpu_for_several_processes()
    from diffusion_pref_trainers.threads import set_run_threads

    threads = set_run_threads()  # every process; one line on the machine's first
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(threads, file=sys.stderr)
    summary = run(settings)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(summary, indent=2))
        if "reward/base" in summary:
            print(
                f"Task {summary['task']!r}: held-out reward {summary['reward/base']:.3f} (base) -> "
                f"{summary['reward/aligned']:.3f} (aligned), win rate {summary['win_rate']:.2f}, prompt fidelity "
                f"{summary['fidelity/base']:.2f} -> {summary['fidelity/aligned']:.2f}. Grid: {summary['grid']}"
            )
        print(f"Saved adapter: {summary['adapter']}  (load with pipe.load_lora_weights(path))")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
