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
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from diffusion_pref_trainers.configs import METHOD_CONFIGS, _help


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
    """The flat mapping of a YAML recipe (empty when no path)."""
    if path is None:
        return {}
    recipe = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must hold a mapping of settings, not a {type(recipe).__name__}.")
    return {key: _number(value) for key, value in recipe.items()}


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs; values are read as YAML, so `1e-4`, `true` and `[a, b]` work."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--"):
            raise ValueError(f"Expected an option like --learning_rate 1e-4, got {token!r}.")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                raise ValueError(f"Option --{key} needs a value, e.g. --{key} 1.")
            index += 1
            value = tokens[index]
        overrides[key.replace("-", "_")] = _parse_value(value)
        index += 1
    return overrides


_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _number(value: Any) -> Any:
    """`1e-4` as a float: YAML 1.1 reads it as a string (it wants `1.0e-4`), which would surprise anyone."""
    return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value) else value


def _parse_value(text: str) -> Any:
    """A command-line value read as YAML (so `true`, `3`, `[a, b]` work), with `1e-4` as a number."""
    return _number(yaml.safe_load(text))


def split_settings(settings: dict[str, Any]) -> tuple[ScriptArguments, Any]:
    """Script arguments and the method's config from one mapping; unknown keys are an error listing valid ones."""
    script_keys = {f.name for f in dataclasses.fields(ScriptArguments)}
    script = ScriptArguments(**{k: v for k, v in settings.items() if k in script_keys})
    if script.method not in METHOD_CONFIGS:
        raise ValueError(f"Unknown method {script.method!r}; choose one of {', '.join(sorted(METHOD_CONFIGS))}.")
    config_class = METHOD_CONFIGS[script.method]
    config_keys = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(settings) - script_keys - config_keys)
    if unknown:
        raise ValueError(
            f"Unknown settings {unknown} for method {script.method!r}. Valid: {sorted(script_keys | config_keys)}."
        )
    return script, config_class(**{k: v for k, v in settings.items() if k in config_keys})


def _load_data(script: ScriptArguments, resolution: int) -> tuple[Any, Any]:
    """Training and eval datasets: the named one (the trainer reads its splits, as TRL's scripts do), or
    generated pairs (8 held out) of the built-in kit."""
    if script.dataset_name is None:
        from diffusion_pref_trainers.testing import make_preference_dataset

        train = make_preference_dataset(script.builtin_pairs, size=resolution, seed=0)
        return train, make_preference_dataset(8, size=resolution, seed=1)
    return script.dataset_name, None


def run_toy(script: ScriptArguments, settings: dict[str, Any]) -> dict[str, Any]:
    """Align the shipped toy pipeline to `script.toy_task`; the summary has the reward before and after."""
    from diffusion_pref_trainers.toy.alignment import ToyExperiment, run_experiment

    config_keys = {f.name for f in dataclasses.fields(METHOD_CONFIGS[script.method])}
    overrides = {key: value for key, value in settings.items() if key in config_keys}
    output_dir = overrides.pop("output_dir", f"outputs/toy-{script.toy_task}-{script.method}")
    experiment = ToyExperiment(task=script.toy_task, train_prompts=script.toy_prompts)
    summary = run_experiment(script.method, experiment, output_dir, overrides)
    return {"adapter": str(Path(output_dir).resolve()), **summary}


def run(settings: dict[str, Any]) -> dict[str, Any]:
    """Train once with `settings` (recipe plus overrides); returns the adapter path, metrics and timing."""
    from diffusion_pref_trainers.trainers import TRAINERS

    script, args = split_settings(settings)
    if script.toy_task is not None and script.model_name_or_path is None and script.dataset_name is None:
        return run_toy(script, settings)
    if script.model_name_or_path is None:
        from diffusion_pref_trainers.testing import tiny_sd_pipeline

        model = tiny_sd_pipeline()
    else:
        model = script.model_name_or_path
    train, eval_ = _load_data(script, args.resolution)
    trainer = TRAINERS[script.method](model, args, train, eval_dataset=eval_)
    before = trainer.evaluate() if trainer.eval_dataset is not None else {}
    start = time.perf_counter()
    state = trainer.train()
    seconds = time.perf_counter() - start
    final = {k: v for entry in state.log_history for k, v in entry.items() if k.startswith("eval_")}
    return {
        "method": script.method,
        "adapter": str(Path(args.output_dir).resolve()),
        "steps": state.global_step,
        "train_seconds": round(seconds, 2),
        "ms_per_step": round(1000 * seconds / max(state.global_step, 1), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "eval_before": before,
        "eval_after": final,
    }


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
    settings = {**read_recipe(known.config), **parse_overrides(rest)}
    if known.help:
        print_help(parser, settings)
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
