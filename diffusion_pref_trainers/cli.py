"""The `dpt-train` command (also `examples/train.py`): TRL's `TrlParser` over a YAML recipe and `--key value`.

`dpt-train --config recipe.yaml --learning_rate 1e-4` trains once. `method` (from `--method` or the recipe) picks
the trainer (dpo, rpo, ...) and so the config dataclass parsed beside `ScriptArguments`; the recipe's keys and the
command line's `--key value` set fields of either (the command line wins), and an `env:` mapping in the recipe sets
environment variables, as in TRL's scripts. With no model and no dataset, the run stays offline: with `toy_task` it
aligns the shipped toy-world pipeline to that task (pairs sampled from the pipeline itself, labelled by the task's
exact reward) and reports the reward before and after; without it, it uses the tiny random pipeline and generated
pairs of the offline kit.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import yaml
from trl import TrlParser

from diffusion_pref_trainers.config_fields import field_types, split_optional, with_help
from diffusion_pref_trainers.configs import METHOD_CONFIGS

USAGE = "%(prog)s [--config RECIPE.yaml] [--method METHOD] [--FIELD VALUE ...]"


@dataclass
class ScriptArguments:
    """Which method trains and where the model and the data come from (TRL's names).

    TRL's own `ScriptArguments` is not parsed: its `dataset_config`, `dataset_train_split`, `dataset_test_split`
    and `dataset_streaming` are fields of the method's config here (the trainer reads them, so they live in one
    place), and its `ignore_bias_buffers` (a language-model DDP workaround) would be accepted and ignored.
    """

    method: str = with_help(f"The objective to train with: one of {', '.join(sorted(METHOD_CONFIGS))}.", "dpo")
    model_name_or_path: str | None = with_help(
        "A diffusers pipeline: Hub id or local folder. None: the built-in tiny pipeline (offline).", None
    )
    dataset_name: str | None = with_help(
        "A preference dataset: Hub id, `save_to_disk` folder, parquet file/folder or imagefolder, read with the "
        "config's `dataset_config`, `dataset_train_split`, `dataset_test_split` and `dataset_streaming`. None: "
        "generated pairs of the built-in kit.",
        None,
    )
    builtin_pairs: int = with_help("Built-in kit only: how many generated training pairs (eval uses 8 others).", 16)
    toy_task: str | None = with_help(
        "Toy world (no model and no dataset given): align the shipped toy pipeline to this task (warm, large, "
        "striped, centred). None: the built-in kit.",
        None,
    )
    toy_prompts: int = with_help("Toy world only: how many training prompts to sample the base pipeline for.", 48)


class CommandLine(NamedTuple):
    """A parsed command line: the script arguments, the method's config, and the config fields it set."""

    script: ScriptArguments
    config: Any
    given: frozenset[str]


def read_recipe(path: str | None) -> dict[str, Any]:
    """The mapping of a YAML recipe (empty when no path), read before parsing to learn its `method`."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"Recipe {path} does not exist: pass --config a YAML file (see examples/configs/).")
    recipe = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must hold a mapping of settings, not a {type(recipe).__name__}.")
    return recipe


class RecipeParser(TrlParser):
    """`TrlParser` for `ScriptArguments` and one method's config. A YAML 1.1 boolean (`no`, `off`, ...) given to a
    text field is the word 'no'/'yes' (`mixed_precision: no`), not False."""

    def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
        """Recipe values become the parser's defaults (TRL), YAML booleans of text fields as 'yes'/'no'."""
        hints = {name: hint for dtype in self.dataclass_types for name, hint in field_types(dtype).items()}
        return super().set_defaults_with_config(**{k: _as_text_field(v, hints.get(k)) for k, v in kwargs.items()})


def _as_text_field(value: Any, hint: Any) -> Any:
    """A recipe value for a field of annotation `hint`: a YAML boolean is 'yes'/'no' where the field takes text."""
    if isinstance(value, bool) and split_optional(hint)[0] is str:
        return "yes" if value else "no"
    return value


def make_parser(method: str) -> RecipeParser:
    """The parser of `ScriptArguments` and `method`'s config; a bad value raises `argparse.ArgumentError`."""
    if method not in METHOD_CONFIGS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(sorted(METHOD_CONFIGS))}.")
    config_class = METHOD_CONFIGS[method]
    parser = RecipeParser(
        (ScriptArguments, config_class),
        usage=USAGE,
        description=f"{__doc__.splitlines()[0]} Settings of method {method!r}: ScriptArguments, then "
        f"{config_class.__name__}.",
        epilog="Booleans: `--use_lora`, `--use_lora false`. Lists: `--lora_target_modules to_q to_v`. None (for "
        "number fields that allow it): `--save_total_limit none`. Mappings: a JSON object. Choose the method with "
        "`--method` (or the recipe's `method`); `--method rpo --help` lists its settings.",
        allow_abbrev=False,
        exit_on_error=False,
    )
    for action in parser._actions:  # argparse formats help text with %: a literal '10%' must be escaped
        if action.help:
            action.help = re.sub(r"%(?!\()", "%%", action.help)
    return parser


def _pre_parse(argv: list[str], default_recipe: str | None) -> tuple[list[str], str, dict[str, Any]]:
    """The arguments for `TrlParser` (`--config` spelled its way), the method, and the recipe's mapping."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--config", default=default_recipe)
    pre.add_argument("--method")
    known, rest = pre.parse_known_args(argv)
    recipe = read_recipe(known.config)
    method = known.method or recipe.get("method", ScriptArguments.method)
    config = ["--config", known.config] if known.config else []
    return [*config, *(["--method", known.method] if known.method else []), *rest], str(method), recipe


def _unknown_error(method: str, from_recipe: list[str], from_command_line: list[str], valid: list[str]) -> ValueError:
    """An error naming each unknown key (with the closest valid names) and any value without its option."""
    names = [token[2:] for token in from_recipe[::2]] + [
        token.lstrip("-").split("=")[0] for token in from_command_line if token.startswith("-")
    ]
    lines = []
    for name in names:
        close = difflib.get_close_matches(name, valid, n=3)
        lines.append(f"`{name}`" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if not names:
        lines.append(f"values without an option {from_command_line} (expected `--key value`)")
    return ValueError(f"Unknown settings for method {method!r}: {'; '.join(lines)}. See --help for every setting.")


def _set_on_command_line(parser: RecipeParser, args: list[str]) -> set[str]:
    """The fields `args` sets (after `parser` has parsed them: its defaults are cleared to find out)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(args)[0]))


def parse_command_line(argv: list[str], default_recipe: str | None = None) -> CommandLine:
    """Pre-parse the method (`--method`, the recipe's, or dpo), then parse with `TrlParser`: `--config`, the recipe
    (`env:` included), `--key value`. Unknown keys and bad values raise, naming the setting."""
    args, method, recipe = _pre_parse(argv, default_recipe)
    parser = make_parser(method)
    script, config, from_recipe, from_command_line = parser.parse_args_and_config(
        args, return_remaining_strings=True, separate_remaining_strings=True
    )
    if from_recipe or from_command_line:
        valid = sorted({*field_types(ScriptArguments), *field_types(type(config))})
        raise _unknown_error(method, from_recipe, from_command_line, valid)
    return CommandLine(script, config, frozenset(set(recipe) | _set_on_command_line(parser, args)))


def _load_data(script: ScriptArguments, resolution: int) -> tuple[Any, Any]:
    """Training and eval datasets: the named one (the trainer reads its splits, as TRL's scripts do), or
    generated pairs (8 held out) of the built-in kit at `resolution` px."""
    if script.dataset_name is None:
        from diffusion_pref_trainers.testing import make_preference_dataset

        train = make_preference_dataset(script.builtin_pairs, size=resolution, seed=0)
        return train, make_preference_dataset(8, size=resolution, seed=1)
    return script.dataset_name, None


def run_toy(script: ScriptArguments, args: Any, given: frozenset[str]) -> dict[str, Any]:
    """Align the shipped toy pipeline to `script.toy_task` with the config settings in `given` (their values from
    `args`; the toy world's defaults for the rest); the summary has the reward before and after."""
    from diffusion_pref_trainers.toy.alignment import ToyExperiment, run_experiment

    overrides = {key: getattr(args, key) for key in given if key in field_types(type(args))}
    output_dir = overrides.pop("output_dir", f"outputs/toy-{script.toy_task}-{script.method}")
    experiment = ToyExperiment(task=script.toy_task, train_prompts=script.toy_prompts)
    summary = run_experiment(script.method, experiment, output_dir, overrides)
    return {"adapter": str(Path(output_dir).resolve()), **summary}


def run(command_line: CommandLine) -> dict[str, Any]:
    """Train once as `command_line` says; returns the adapter path, metrics and timing."""
    from diffusion_pref_trainers.families import get_family
    from diffusion_pref_trainers.sources import load_pipeline
    from diffusion_pref_trainers.trainers import TRAINERS

    script, args = command_line.script, command_line.config
    if script.toy_task is not None and script.model_name_or_path is None and script.dataset_name is None:
        return run_toy(script, args, command_line.given)
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


def _usage_error(error: Exception) -> NoReturn:
    """Print `error` under the usage line and exit 2, as argparse does for a bad command line."""
    argparse.ArgumentParser(usage=USAGE).error(str(error))


def main(argv: list[str] | None = None, default_recipe: str | None = None) -> None:
    """Parse `[--config recipe.yaml] [--key value ...]` (default: `sys.argv`), train, print the summary. A bad
    setting exits 2 before anything loads; `--help` lists every setting of the chosen method without importing
    torch."""
    try:
        command_line = parse_command_line(sys.argv[1:] if argv is None else argv, default_recipe)
    except (argparse.ArgumentError, ValueError, TypeError, FileNotFoundError) as error:
        _usage_error(error)
    use_cpu_for_several_processes()
    from diffusion_pref_trainers.threads import set_run_threads

    threads = set_run_threads()  # every process; one line on the machine's first
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(threads, file=sys.stderr)
    summary = run(command_line)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(summary, indent=2))
        if "reward/base" in summary:
            print(
                f"Task {summary['task']!r}: held-out reward {summary['reward/base']:.3f} (base) -> "
                f"{summary['reward/aligned']:.3f} (aligned), win rate {summary['win_rate']:.2f}, prompt fidelity "
                f"{summary['fidelity/base']:.2f} -> {summary['fidelity/aligned']:.2f}, validity "
                f"{summary['validity/base']:.2f} -> {summary['validity/aligned']:.2f}, distance to the world "
                f"{summary['distance/base']:.3f} -> {summary['distance/aligned']:.3f}. Grid: {summary['grid']}"
            )
        print(f"Saved adapter: {summary['adapter']}  (load with pipe.load_lora_weights(path))")


if __name__ == "__main__":
    main()
