"""Every `transformers.TrainingArguments` field, and what it is here: the same field, another name, or refused.

One table serves the configs and the docs: a `TrainingArguments` name the configs lack is refused by name with the
reason and what to use instead (`refusal`), and `docs/trl_users.md` is rendered from the same table
(`python -m diffusion_pref_trainers.trl_names > docs/trl_users.md`; a test keeps both complete and in sync).
Light to import: no torch, no transformers.
"""

from __future__ import annotations

import dataclasses
import difflib

_ACCELERATE = (
    "launch with an accelerate config instead (`accelerate launch --config_file examples/accelerate_configs/"
    "multi_gpu.yaml ...`; see the README)"
)
_NO_PREDICT = "this trainer's `evaluate()` returns loss and reward metrics only, with no predictions to collect"

# TrainingArguments fields under another name here: theirs -> ours.
RENAMED: dict[str, str] = {
    "activation_checkpointing": "gradient_checkpointing",
}

# TrainingArguments fields this trainer does not honour: why, and what to use instead.
REFUSED: dict[str, str] = {
    "optim_target_modules": "it chooses modules for GaLore/APOLLO, which are not offered; set `lora_target_modules` "
    "to choose what trains",
    "label_smoothing_factor": "it smooths classification labels; the preference losses' label noise is "
    "`label_smoothing` of DiffusionDPOConfig and DiffusionRPOConfig",
    "average_tokens_across_devices": "a text-token setting; the diffusion losses average over images",
    "bf16_full_eval": "evaluation runs under the same autocast as training; use `bf16`",
    "fp16_full_eval": "evaluation runs under the same autocast as training; use `fp16`",
    "tf32": "set `torch.backends.cuda.matmul.allow_tf32 = True` in your script before building the trainer",
    "activation_checkpointing_kwargs": "diffusers' denoisers checkpoint with their own (non-reentrant) function and "
    "take no options; set `gradient_checkpointing=True`",
    "gradient_checkpointing_kwargs": "diffusers' denoisers checkpoint with their own (non-reentrant) function and "
    "take no options; set `gradient_checkpointing=True`",
    "use_liger_kernel": "Liger kernels are for language models; see `attention_backend` and `torch_compile`",
    "liger_kernel_config": "Liger kernels are for language models; see `attention_backend` and `torch_compile`",
    "use_cache": "a key/value cache of language models; diffusion denoisers have none",
    "neftune_noise_alpha": "NEFTune adds noise to token embeddings of language models; not offered",
    "torch_empty_cache_steps": "not offered; lower `per_device_train_batch_size` or set `gradient_checkpointing`",
    "auto_find_batch_size": "not offered; set `per_device_train_batch_size` and `gradient_accumulation_steps`",
    "logging_strategy": "metrics are logged every `logging_steps` optimizer steps (and at the last step)",
    "log_on_each_node": "only the main process logs; not configurable",
    "logging_nan_inf_filter": "non-finite steps are skipped and counted instead (`max_nonfinite_steps`)",
    "include_num_input_tokens_seen": "a text-token count; the `data/` metrics count rows",
    "log_level": "use Python's `logging` (`logging.getLogger('diffusion_pref_trainers').setLevel(...)`)",
    "log_level_replica": "use Python's `logging` in your script",
    "disable_tqdm": "progress bars follow tqdm's own switch: set the environment variable `TQDM_DISABLE=1`",
    "project": "the tracker project is the method's name; pass tracker options through accelerate",
    "trackio_space_id": "pass trackio's options through your trackio setup; `report_to=['trackio']` logs to it",
    "trackio_bucket_id": "pass trackio's options through your trackio setup; `report_to=['trackio']` logs to it",
    "trackio_static_space_id": "pass trackio's options through your trackio setup; `report_to=['trackio']` logs to it",
    "eval_delay": "not offered; choose `eval_steps` (evaluations fall on its multiples)",
    "prediction_loss_only": _NO_PREDICT,
    "eval_do_concat_batches": _NO_PREDICT,
    "eval_use_gather_object": _NO_PREDICT,
    "eval_accumulation_steps": _NO_PREDICT,
    "include_for_metrics": _NO_PREDICT,
    "batch_eval_metrics": "evaluation metrics are always reduced batch by batch",
    "save_only_model": "checkpoints always hold what an exact resume needs; `save_model()` writes the weights alone",
    "save_on_each_node": "the main process writes checkpoints to a shared `output_dir`",
    "enable_jit_checkpoint": "not offered; set `save_steps` and resume with `resume_from_checkpoint='latest'`",
    "hub_always_push": "a checkpoint push is skipped while the previous upload runs; not configurable",
    "hub_revision": "pushes go to the repo's main branch; not configurable",
    "ignore_data_skip": "a resume always continues the data order exactly where it stopped",
    "restore_callback_states_from_checkpoint": "a resume always gives `ExportableState` callbacks (e.g. "
    "`EarlyStoppingCallback`) their checkpointed state",
    "full_determinism": "runs are seeded from `seed` (and `data_seed`); set "
    "`torch.use_deterministic_algorithms(True)` in your script for deterministic kernels",
    "use_cpu": f"{_ACCELERATE}, or run with `ACCELERATE_USE_CPU=true`",
    "accelerator_config": _ACCELERATE,
    "parallelism_config": _ACCELERATE,
    "dataloader_drop_last": "training batches always drop a last partial batch (pairs stay whole); evaluation keeps it",
    "dataloader_persistent_workers": "workers are always kept for the whole run (`dataloader_num_workers`)",
    "dataloader_prefetch_factor": "not offered; PyTorch's default is used",
    "dataloader_multiprocessing_context": "not offered; PyTorch's default start method is used",
    "dataloader_in_order": "batches always arrive in order, so a run is reproducible",
    "remove_unused_columns": "the schema's columns are detected and read by name (see docs/data.md, `column_mapping`)",
    "label_names": "labels are read from the schema (see docs/data.md)",
    "train_sampling_strategy": "training rows are always shuffled, in an order fixed by `data_seed`",
    "length_column_name": "a text-length setting; images are resized to `resolution`",
    "ddp_find_unused_parameters": _ACCELERATE,
    "ddp_bucket_cap_mb": _ACCELERATE,
    "ddp_broadcast_buffers": _ACCELERATE,
    "ddp_static_graph": _ACCELERATE,
    "ddp_backend": _ACCELERATE,
    "ddp_timeout": _ACCELERATE,
    "fsdp": f"{_ACCELERATE}; only data parallelism is tested",
    "fsdp_config": f"{_ACCELERATE}; only data parallelism is tested",
    "deepspeed": f"{_ACCELERATE}; only data parallelism is tested",
    "debug": "not offered; non-finite steps are caught by `max_nonfinite_steps`",
    "skip_memory_metrics": "not offered; see docs/performance.md for measuring memory",
    "do_train": "call `trainer.train()`",
    "do_eval": "call `trainer.evaluate()`, or set `eval_strategy`",
    "do_predict": _NO_PREDICT,
    "local_rank": f"{_ACCELERATE}; accelerate sets each process's rank",
}

# Names earlier transformers releases had (a TRL user's older scripts still pass them): what to write now.
FORMER: dict[str, str] = {
    "warmup_ratio": "transformers 5 dropped it: pass the ratio as `warmup_steps` (a value below 1, e.g. 0.1)",
    "evaluation_strategy": "transformers renamed it: pass `eval_strategy`",
}

# Fields of the same name whose meaning here differs in a detail a TRL user should know.
NOTES: dict[str, str] = {
    "optim": "a subset of TrainingArguments' names; default 'adamw_torch' (theirs: 'adamw_torch_fused')",
    "lr_scheduler_type": "a subset of TrainingArguments' names; default 'constant' (theirs: 'linear')",
    "logging_steps": "a whole number of steps (no ratio); default 10 (theirs: 500)",
    "eval_steps": "a whole number of steps; 0 (default) evaluates only at the end of `train()`",
    "eval_strategy": "default 'steps' (theirs: 'no'); any strategy but 'no' also evaluates at the end of `train()`",
    "save_strategy": "'no', 'steps' or 'epoch' ('best' is not offered)",
    "load_best_model_at_end": "False only: True is refused; load `state.best_model_checkpoint` (a checkpoint folder) "
    "yourself",
    "save_total_limit": "the best checkpoint (by `metric_for_best_model`) is kept too",
    "save_steps": "a whole number of steps; 0 disables checkpoints",
    "hub_strategy": "'end' (default; theirs: 'every_save') or 'every_save'",
    "warmup_steps": "below 1 a ratio of the total steps, as theirs",
    "torch_compile_backend": "needs `torch_compile=True` (theirs turns it on)",
    "torch_compile_mode": "needs `torch_compile=True` (theirs turns it on)",
    "bf16": "sets `mixed_precision='bf16'`",
    "fp16": "sets `mixed_precision='fp16'`",
    "optim_args": "values go to the optimizer's constructor, read as numbers or booleans",
    "hub_private_repo": "default False (theirs: None, the Hub's default)",
    "per_device_train_batch_size": "counts preference rows (pairs), not images",
    "learning_rate": "default 1e-5 (theirs: 5e-5)",
    "weight_decay": "default 0.01 (theirs: 0.0)",
    "report_to": "default [] (no tracker); 'none' is accepted",
    "gradient_checkpointing": "default False",
    "num_train_epochs": "default 1.0 (theirs: 3.0)",
    "per_device_eval_batch_size": "default 4 (theirs: 8)",
    "output_dir": "default 'outputs' (theirs: 'trainer_output')",
}


def refusal(name: str, known: list[str], owner: str) -> TypeError:
    """The error for keyword `name` that `owner`'s fields (`known`) lack: refused by the table, or unknown."""
    if name in RENAMED and RENAMED[name] in known:
        return TypeError(f"`{name}` is TrainingArguments' name of `{RENAMED[name]}` here: pass `{RENAMED[name]}`.")
    if name in FORMER:
        return TypeError(f"`{name}` is a former TrainingArguments name: {FORMER[name]}.")
    if name in RENAMED or name in REFUSED:
        reason = REFUSED.get(name, f"it is `{RENAMED.get(name)}` here, which {owner} does not have")
        return TypeError(f"`{name}` is a TrainingArguments setting {owner} does not use: {reason}.")
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(f'`{match}`' for match in close)}?" if close else ""
    return TypeError(f"{owner} got an unexpected keyword argument `{name}`.{hint} See docs/configuration.md.")


def _row(name: str, ours: set[str]) -> str:
    """One row of the page: the TrainingArguments field, its name here, and the note or the reason."""
    if name in ours:
        return f"| `{name}` | same | {NOTES.get(name, '')} |"
    if name in RENAMED:
        return f"| `{name}` | renamed: `{RENAMED[name]}` | {REFUSED.get(name, '')} |"
    return f"| `{name}` | refused | {REFUSED[name]} |"


def trl_users_page(training_arguments: type, config_class: type) -> str:
    """docs/trl_users.md: every field of `training_arguments` in order, and what it is in `config_class`."""
    ours = {item.name for item in dataclasses.fields(config_class)}
    rows = [_row(item.name, ours) for item in dataclasses.fields(training_arguments)]
    former = ["", "Former names, refused with what to write now:", ""]
    former += [f"- `{name}`: {reason}." for name, reason in FORMER.items()]
    table = ["| TrainingArguments field | here | note |", "|---|---|---|", *rows]
    return "\n".join([*_PAGE_HEAD, *table, *former]) + "\n"


_PAGE_HEAD = [
    "# For TRL users",
    "",
    "Generated from `diffusion_pref_trainers/trl_names.py` by `python -m diffusion_pref_trainers.trl_names`;",
    "a test checks that every field of the installed `transformers.TrainingArguments` is listed and that this page",
    "is current.",
    "",
    "The configs use TrainingArguments' names and meanings wherever the concept is the same. A TrainingArguments",
    "field the trainers do not honour is refused by name, with what to use instead, never accepted and ignored:",
    "",
    "```python",
    'DiffusionDPOConfig(fsdp="full_shard")',
    "# TypeError: `fsdp` is a TrainingArguments setting DiffusionDPOConfig does not use: launch with an accelerate ...",
    "```",
    "",
    "Worth knowing:",
    "",
    "- `bf16=True` / `fp16=True` set `mixed_precision` (and `mixed_precision='bf16'` sets `bf16`); a contradiction",
    "  is an error.",
    "- `warmup_steps` below 1 is a ratio of the total optimizer steps, as in transformers 5 (which dropped",
    "  `warmup_ratio`): `warmup_steps=0.1` warms up over the first 10% of the steps.",
    "- `optim_args` takes transformers' string form, `'k=v,k=v'`; the values are read as numbers or booleans and",
    "  passed to the optimizer's constructor. `lr_scheduler_kwargs` goes to `transformers.get_scheduler`.",
    "- `data_seed` (default: `seed`) fixes the order of the training rows only; noise, timesteps, crops and flips",
    "  follow `seed`.",
    "- `eval_strategy='steps'` with `eval_steps=0` evaluates once, at the end of `train()` (this library's earlier",
    "  behaviour, kept as the default); `eval_strategy='no'` never evaluates in `train()`.",
    "- TRL's method-specific settings (`beta`, `loss_type`, `label_smoothing`, ...) are on each method's config; see",
    "  [the configuration reference](configuration.md).",
    "",
]


if __name__ == "__main__":
    from transformers import TrainingArguments

    from diffusion_pref_trainers.configs import DiffusionRPOConfig

    print(trl_users_page(TrainingArguments, DiffusionRPOConfig), end="")
