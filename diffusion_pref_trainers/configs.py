"""Configuration dataclasses: the settings every objective shares, and one small class per objective.

Names follow TRL's `TrainingArguments`/`DPOConfig` where the concept is the same, so a TRL user
can read a config without the docs. Every field carries its help text in `metadata["help"]`;
`__post_init__` rejects bad values with a message that names the fix, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from diffusion_pref_trainers.config_fields import (
    check,
    check_choice,
    check_finite_numbers,
    checked_value,
    field_types,
    parse_optim_args,
    with_help,
)
from diffusion_pref_trainers.trl_names import refusal

OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
)
BNB_OPTIMIZERS = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
EVAL_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch")
MIXED_PRECISION = ("no", "fp16", "bf16")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "none")
HUB_STRATEGIES = ("end", "every_save")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)


def _outside_this_module() -> int:
    """The `stacklevel` that points a warning at the user's line, past this module and the dataclass `__init__`."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename in (__file__, "<string>"):
        frame, level = frame.f_back, level + 1
    return level


def _torch_compile_backends() -> tuple[str, ...]:
    """The torch.compile backends the installed torch accepts (they change between releases)."""
    from torch._dynamo import list_backends

    return tuple(list_backends(exclude_tags=()))


def _attention_backends() -> tuple[str, ...]:
    """'sdpa', 'eager' and the attention backends of the installed diffusers' dispatcher (they change between
    releases)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return ("sdpa", "eager", *(backend.value for backend in AttentionBackendName))


def _torch_compile_modes() -> tuple[str, ...]:
    """The torch.compile (inductor) modes the installed torch accepts."""
    from torch._inductor import list_mode_options

    return tuple(list_mode_options())


class _RefusesUnknownNames(type):
    """Configs refuse a keyword they lack by name: a TrainingArguments field with the reason and what to use instead
    (`trl_names`), any other with the close field names."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        known = [item.name for item in dataclasses.fields(cls)]
        for name in kwargs:
            if name not in known:
                raise refusal(name, known, cls.__name__)
        return super().__call__(*args, **kwargs)


@dataclass
class DiffusionTrainingConfig(metaclass=_RefusesUnknownNames):
    """Settings every objective shares.

    Groups: output and logging (`output_dir`, `logging_steps`, `report_to`), schedule (`learning_rate`,
    `max_steps`, `num_train_epochs`, `lr_scheduler_type`, `warmup_steps`), batching
    (`per_device_train_batch_size` counts preference rows, i.e. pairs), precision and memory
    (`mixed_precision`, `gradient_checkpointing`, `optim`), images (`resolution`, `random_flip`,
    `center_crop`), adapters (`use_lora`, `lora_*`), checkpoints and the Hub.
    """

    output_dir: str = with_help("Where checkpoints, the final adapter and the model card are written.", "outputs")
    overwrite_output_dir: bool = with_help(
        "A fresh run (no resume) into an `output_dir` holding another run's checkpoints or final output: False "
        "refuses to start; True first deletes that run's checkpoint folders, run.json and training_config.json "
        "(its weights and card are overwritten by this run's final save). Resuming never needs it.",
        False,
    )
    learning_rate: float = with_help("Peak learning rate of the optimizer.", 1e-5)
    per_device_train_batch_size: int = with_help(
        "Preference rows (pairs, or single images for unpaired objectives) per device per micro-step.", 4
    )
    per_device_eval_batch_size: int = with_help("Rows per device per evaluation batch.", 4)
    gradient_accumulation_steps: int = with_help("Micro-steps accumulated into one optimizer step.", 1)
    max_steps: int = with_help("Total optimizer steps; -1 trains for `num_train_epochs` instead.", -1)
    num_train_epochs: float = with_help("Epochs over the training set when `max_steps` is -1.", 1.0)
    lr_scheduler_type: str = with_help(
        f"Learning-rate schedule (transformers' `get_scheduler`), one of {', '.join(LR_SCHEDULERS)}.", "constant"
    )
    lr_scheduler_kwargs: dict[str, Any] | None = with_help(
        "Extra arguments of the schedule, passed to `transformers.get_scheduler(scheduler_specific_kwargs=...)`, "
        "e.g. {'num_cycles': 2} for 'cosine_with_restarts' or {'power': 2.0} for 'polynomial'.",
        None,
    )
    warmup_steps: float = with_help(
        "Linear warm-up: a number of optimizer steps (>= 1), or below 1 a ratio of the total steps (0.1: the first "
        "10%, rounded up), as in transformers 5.",
        0,
    )
    max_grad_norm: float = with_help("Gradient clipping norm; 0 disables clipping.", 1.0)
    max_nonfinite_steps: int = with_help(
        "Optimizer steps in a row whose loss or gradient norm may be non-finite (NaN or inf) before training stops "
        "with an error. Each such step is skipped (no update) and counted as `train/nonfinite_steps`; with fp16 the "
        "loss scaler skips gradient overflows itself, so there only a non-finite loss counts.",
        3,
    )
    adam_beta1: float = with_help("AdamW beta1.", 0.9)
    adam_beta2: float = with_help("AdamW beta2.", 0.999)
    adam_epsilon: float = with_help("AdamW epsilon.", 1e-8)
    weight_decay: float = with_help("Weight decay of the optimizer.", 1e-2)
    optim: str = with_help(
        "Optimizer, by TrainingArguments' name: 'adamw_torch', 'adamw_torch_fused' (torch's fused kernel), "
        "'adamw_8bit' or 'adamw_bnb_8bit' (bitsandbytes' 8-bit state, for memory), 'paged_adamw_8bit' or "
        "'paged_adamw_32bit' (bitsandbytes, state paged to CPU memory under pressure), 'adafactor' or 'sgd'.",
        "adamw_torch",
    )
    optim_args: str | None = with_help(
        "Extra optimizer arguments in transformers' form 'k=v,k=v' (e.g. 'momentum=0.9' for 'sgd'); values are read "
        "as numbers or booleans where they are, and passed to the optimizer's constructor.",
        None,
    )
    mixed_precision: str = with_help(
        "Autocast precision: 'no', 'fp16' or 'bf16'. Frozen weights are cast to it; trainable ones stay fp32. "
        "`bf16=True` or `fp16=True` set it.",
        "no",
    )
    bf16: bool = with_help(
        "bf16 mixed precision, as TrainingArguments names it: the same as `mixed_precision='bf16'`.", False
    )
    fp16: bool = with_help(
        "fp16 mixed precision, as TrainingArguments names it: the same as `mixed_precision='fp16'`.", False
    )
    gradient_checkpointing: bool = with_help("Recompute activations in backward to save memory.", False)
    channels_last: bool = with_help(
        "Store the denoiser's (and a full-fine-tuning reference's) 4-D weights in torch.channels_last memory format. "
        "Only meaningful for convolutional UNets (SD, SDXL); transformer denoisers (SD3, FLUX) have few or no 2-D "
        "convolutions, so it changes next to nothing there. See docs/performance.md for when it pays off.",
        False,
    )
    attention_backend: str = with_help(
        "The denoiser's attention kernel. 'sdpa': diffusers' default processors, PyTorch's fused "
        "scaled_dot_product_attention. 'eager': attention as explicit matmul + softmax (diffusers' `AttnProcessor`), "
        "which keeps the whole attention matrix: the unfused reference SDPA is measured against (SD, SDXL UNets). "
        "Any other name goes to diffusers' `set_attention_backend` ('flash', '_native_cudnn', 'sage', ...; some "
        "need their package), which only denoisers with dispatching attention honour (FLUX).",
        "sdpa",
    )
    torch_compile: bool = with_help(
        "Compile the denoiser's forward with torch.compile (`Module.compile`, after LoRA is attached; the module, its "
        "weights and checkpoints are unchanged). The first steps are slower while graphs compile; the reference pass "
        "(adapters off) and evaluation compile graphs of their own. See docs/performance.md.",
        False,
    )
    torch_compile_mode: str | None = with_help(
        "torch.compile mode, one of torch's own (`torch._inductor.list_mode_options()`: 'default', "
        "'reduce-overhead', 'max-autotune', ...); None: torch's default. Needs `torch_compile=True` and the "
        "inductor backend.",
        None,
    )
    torch_compile_backend: str | None = with_help(
        "torch.compile backend, one of `torch._dynamo.list_backends(exclude_tags=())`; None: 'inductor' (generates "
        "kernels: minutes of compiling on a CPU). 'aot_eager' traces the graphs without generating code: fast to "
        "compile, for checking that a model compiles. Needs `torch_compile=True`.",
        None,
    )
    logging_steps: int = with_help("Log averaged metrics every this many optimizer steps.", 10)
    logging_first_step: bool = with_help("Also log after the first optimizer step.", False)
    save_strategy: str = with_help(
        "When checkpoints are written: 'steps' (every `save_steps`), 'epoch' (at the end of every epoch) or 'no'.",
        "steps",
    )
    save_steps: int = with_help(
        "With save_strategy='steps': write a checkpoint every this many optimizer steps; 0 disables.", 500
    )
    save_total_limit: int | None = with_help(
        "Keep at most this many checkpoints (oldest deleted first; the best one, by `metric_for_best_model`, is kept "
        "too).",
        None,
    )
    eval_strategy: str = with_help(
        "When `train()` evaluates (with an eval set): 'steps' (every `eval_steps`), 'epoch' (at the end of every "
        "epoch) or 'no' (never; `evaluate()` still can). Except with 'no', `train()` also evaluates at its end "
        "unless its last step just did.",
        "steps",
    )
    eval_steps: int = with_help(
        "With eval_strategy='steps': evaluate every this many optimizer steps; 0: only at the end of `train()`.", 0
    )
    eval_on_start: bool = with_help("Evaluate once before the first training step (needs an eval set).", False)
    metric_for_best_model: str | None = with_help(
        "Evaluation metric (e.g. 'loss' or 'eval_rewards/accuracies') tracked in `state.best_metric`, "
        "`best_global_step` and `best_model_checkpoint`, as transformers; what `EarlyStoppingCallback` watches.",
        None,
    )
    greater_is_better: bool | None = with_help(
        "Whether a larger `metric_for_best_model` is better; None: False for a metric ending in 'loss', else True.",
        None,
    )
    load_best_model_at_end: bool = with_help(
        "Not supported (False only): load `state.best_model_checkpoint` after training with `load_lora_weights`.",
        False,
    )
    eval_noise_draws: int = with_help(
        "Fixed noise/timestep draws averaged per pair in `evaluate()`: more draws, less noisy accuracy.", 4
    )
    validation_prompts: list[str] = with_help(
        "Prompts rendered at the end of `train()` with the base and the aligned weights (same seeds), saved as a "
        "grid in `output_dir/samples/`, shown in the model card and logged to the trackers (also every "
        "`validation_steps`); empty: no samples.",
        [],
    )
    num_validation_images: int = with_help("Images (seeds) per validation prompt.", 2)
    validation_seed: int | None = with_help(
        "First seed of the validation images (image j uses seed + j); None: `seed`.", None
    )
    validation_inference_steps: int | None = with_help(
        "Sampling steps of the validation images; None: the pipeline's default.", None
    )
    validation_steps: int | None = with_help(
        "Also render `validation_prompts` every this many optimizer steps (fixed seeds, base next to current weights) "
        "and log the grid to the `report_to` trackers, as diffusers' training scripts do; 0 or None: only at the "
        "end of `train()`. Needs `validation_prompts` and a tracker.",
        None,
    )
    seed: int = with_help("Seed for initialisation, data order (unless `data_seed`), noise and timesteps; >= 0.", 42)
    data_seed: int | None = with_help(
        "Seed of the training rows' order (and a streamed dataset's shuffle) alone; None: `seed`. Noise, "
        "timesteps, crops and flips follow `seed`.",
        None,
    )
    report_to: list[str] = with_help("Trackers passed to accelerate ('tensorboard', 'wandb', ...); empty: none.", [])
    run_name: str | None = with_help(
        "The run's name in the trackers (wandb/trackio `name`, mlflow `run_name`; tensorboard writes to "
        "`output_dir/runs/<run_name>/`), as TrainingArguments names it; None: the name of `output_dir`.",
        None,
    )
    resolution: int | None = with_help(
        "Training images are resized and cropped to this square size in pixels; None: the pipeline's own sample "
        "size (its denoiser's `sample_size` times the VAE factor: 512 for SD 1.5, 1024 for SDXL, SD3 and FLUX).",
        None,
    )
    random_flip: bool = with_help(
        "Flip each pair horizontally with probability 0.5 (same flip for both images).", False
    )
    center_crop: bool = with_help("Crop the centre after resizing; False crops at a random position.", True)
    drop_ties: bool = with_help("Drop Pick-a-Pic rows whose `label_0` is 0.5 (a tie, in any accepted spelling).", True)
    skip_bad_images: bool = with_help(
        "Replace rows whose images cannot be decoded by the next readable row, count them and warn once; "
        "False raises with the row index (at construction for the rows probed). Either way, data whose probed "
        "rows are all unreadable is an error before any compute.",
        True,
    )
    dataset_config: str | None = with_help(
        "Configuration name of a dataset given as a Hub id (`load_dataset(id, dataset_config)`), as TRL names it.",
        None,
    )
    dataset_train_split: str = with_help(
        "Split trained on when the training set is a Hub id, a path or a `DatasetDict`.", "train"
    )
    dataset_test_split: str | None = with_help(
        "Split evaluated on: read from the training source when no `eval_dataset` is given (None: no "
        "evaluation; a plain `Dataset` has no splits, an error), and from an `eval_dataset` given as an id, "
        "path or `DatasetDict` (None there: 'test').",
        None,
    )
    dataset_streaming: bool = with_help(
        "Stream datasets given as Hub ids or paths (`load_dataset(..., streaming=True)`): rows are read as "
        "training goes, nothing is downloaded up front. Needs `max_steps`; objects are used as they are.",
        False,
    )
    shuffle_buffer_size: int = with_help(
        "Streamed training data is shuffled through a buffer of this many rows (reshuffled every epoch); "
        "0: stream order.",
        1000,
    )
    column_mapping: dict[str, str] | str | None = with_help(
        "Rename the dataset's columns to a schema's names before detection, e.g. {'text': 'prompt', "
        "'good': 'chosen', 'bad': 'rejected'} (see docs/data.md); on the command line a JSON object, e.g. "
        '\'{"text": "prompt"}\'.',
        None,
    )
    proportion_empty_prompts: float = with_help(
        "Share of training prompts replaced by the empty prompt, in [0, 1] (the official Diffusion-DPO recipe "
        "blanks some so the model keeps its unconditional branch for classifier-free guidance).",
        0.0,
    )
    cache_latents: bool = with_help(
        "Encode every row once before training (VAE latents, prompt conditioning and the objective's extras such as "
        "RPO's CLIP embeddings) into a cache named by a fingerprint of the data, the encoders' weights and the image "
        "settings; steps then skip the encoders, with the same results (up to float rounding). With `random_flip` "
        "both orientations are stored. Needs `center_crop`, `proportion_empty_prompts=0` and a map-style (not "
        "streamed) dataset; with `train_text_encoder` only latents are cached. See docs/data.md.",
        False,
    )
    offload_cached_encoders: bool = with_help(
        "With `cache_latents`, move the encoders the training step no longer needs (the VAE; the text encoders when "
        "they are not trained) to the CPU when training starts, and back to the device when it ends, before the "
        "validation samples are rendered. Frees their weights from accelerator memory; no effect on a CPU. A "
        "callback that generates during training wraps it in `with trainer.encoder_offload.on_device():`.",
        True,
    )
    cache_dir: str | None = with_help(
        "Folder of the precompute cache files; None: `diffusion_pref_trainers/` in datasets' cache folder. Files are "
        "named by fingerprint, so runs (and their eval sets) share them safely.",
        None,
    )
    use_lora: bool = with_help("Train LoRA adapters on the denoiser (True) or fine-tune all its weights (False).", True)
    lora_rank: int = with_help("LoRA rank r.", 8)
    lora_alpha: int = with_help("LoRA alpha (scale alpha/r), > 0.", 8)
    lora_dropout: float = with_help("Dropout inside the LoRA layers.", 0.0)
    lora_target_modules: list[str] | None = with_help(
        "Module names that receive LoRA; None uses the model family's attention projections.", None
    )
    lora_name_or_path: str | None = with_help(
        "Start from a saved adapter instead of zero: a Hub repo id or a local folder/file holding a "
        "`pytorch_lora_weights.safetensors` written by `save_model` (safetensors only). Its rank, alpha and targets "
        "must match this config's LoRA settings.",
        None,
    )
    init_lora_weights: str | None = with_help(
        "Deprecated: the old name of `lora_name_or_path` (it clashed with peft's `LoraConfig.init_lora_weights`, "
        "the initialisation, which goes in `peft_config`). Still read, with a DeprecationWarning.",
        None,
    )
    train_text_encoder: bool = with_help(
        "Also train LoRA (same rank, alpha and dropout as the denoiser's, `peft_config`'s when given) on the "
        "attention projections of the pipeline's CLIP text encoders: SD: its one encoder; SDXL and SD3: both; "
        "FLUX: its CLIP encoder. T5 encoders are never trained. "
        "Needs `use_lora`; prompt conditioning then cannot be cached.",
        False,
    )
    dataloader_num_workers: int = with_help(
        "Worker processes decoding images, started once per run (every epoch for a streamed dataset).", 0
    )
    dataloader_pin_memory: bool = with_help(
        "Pin batches in page-locked memory for faster copies to a CUDA device (no effect elsewhere).", True
    )
    push_to_hub: bool = with_help(
        "Push the final adapter, model card and sample grid to the Hub at the end of `train()`.", False
    )
    hub_model_id: str | None = with_help(
        "Hub repo id `user/name` (or `name`, under your account); default: the name of `output_dir`.", None
    )
    hub_private_repo: bool = with_help("Create the Hub repo as private.", False)
    hub_strategy: str = with_help(
        "When `push_to_hub` uploads: 'end' (once, after training) or 'every_save' (also at every checkpoint "
        "save, in the background; a save is skipped while the previous upload runs).",
        "end",
    )
    hub_token: str | None = with_help(
        "Hub token; default: the usual huggingface_hub sources. Never written out.", None, repr=False
    )
    resume_from_checkpoint: str | None = with_help(
        "A checkpoint folder to resume from, or 'latest' for the newest one in `output_dir`.", None
    )
    weighting_scheme: str = with_help(
        "Flow-matching models (SD3, FLUX) only: how training timesteps are drawn, as in diffusers' SD3/FLUX "
        "scripts. 'logit_normal' (SD3 paper default), 'mode' (mode sampling with `mode_scale`), 'cosmap' "
        "(uniform draws, errors weighted by the CosMap weighting), 'none' (uniform, unweighted).",
        "logit_normal",
    )
    logit_mean: float = with_help("Mean of the normal behind 'logit_normal' timestep sampling.", 0.0)
    logit_std: float = with_help("Standard deviation of the normal behind 'logit_normal' timestep sampling.", 1.0)
    mode_scale: float = with_help("Scale s of 'mode' timestep sampling, in [-1, 2/(pi-2)] (SD3 paper: 1.29).", 1.29)
    guidance_scale: float = with_help(
        "Guidance-distilled FLUX (transformer with `guidance_embeds`, e.g. FLUX.1-dev) only: the value given to "
        "the guidance embedding in training forwards (diffusers' FLUX script: 3.5). Other models ignore it.",
        3.5,
    )
    max_sequence_length: int | None = with_help(
        "SD3 and FLUX only: T5 tokens per prompt (longer prompts are truncated, shorter ones padded). None keeps "
        "the pipeline's default (SD3: 256, FLUX: 512); fewer tokens make each step cheaper.",
        None,
    )

    def __post_init__(self) -> None:
        self._read_deprecated_names()
        self._check_types()
        check_finite_numbers(self)
        self._read_precision_flags()
        check(self.learning_rate > 0, f"`learning_rate` must be > 0, got {self.learning_rate}.")
        check(
            self.per_device_train_batch_size >= 1,
            f"`per_device_train_batch_size` must be >= 1, got {self.per_device_train_batch_size}.",
        )
        check(self.per_device_eval_batch_size >= 1, "`per_device_eval_batch_size` must be >= 1.")
        check(self.gradient_accumulation_steps >= 1, "`gradient_accumulation_steps` must be >= 1.")
        check(
            self.max_steps > 0 or (self.max_steps == -1 and self.num_train_epochs > 0),
            "Set `max_steps` to a positive number of optimizer steps, or leave it at -1 and set "
            "`num_train_epochs` > 0.",
        )
        check(self.warmup_steps >= 0, "`warmup_steps` must be >= 0.")
        check(
            self.warmup_steps < 1 or self.warmup_steps.is_integer(),
            f"`warmup_steps={self.warmup_steps}` must be a whole number of steps, or below 1 a ratio of the total "
            "steps (e.g. 0.1).",
        )
        check(self.max_grad_norm >= 0, "`max_grad_norm` must be >= 0 (0 disables clipping).")
        check(self.max_nonfinite_steps >= 1, f"`max_nonfinite_steps` must be >= 1, got {self.max_nonfinite_steps}.")
        check(self.logging_steps >= 1, "`logging_steps` must be >= 1.")
        check(self.save_steps >= 0, "`save_steps` must be >= 0 (0 disables checkpoints).")
        check(self.eval_steps >= 0, "`eval_steps` must be >= 0.")
        self._check_schedules()
        check(self.eval_noise_draws >= 1, "`eval_noise_draws` must be >= 1.")
        check(
            not self.load_best_model_at_end,
            "`load_best_model_at_end=True` is not supported: training ends with the last weights. Set "
            "`metric_for_best_model` and load `trainer.state.best_model_checkpoint` (a checkpoint folder) yourself.",
        )
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        check(self.num_validation_images >= 1, "`num_validation_images` must be >= 1.")
        check(
            self.validation_inference_steps is None or self.validation_inference_steps >= 1,
            "`validation_inference_steps` must be None (the pipeline's default) or >= 1.",
        )
        self._check_validation_steps()
        check(bool(self.dataset_train_split), "`dataset_train_split` must name a split, e.g. 'train'.")
        check(
            self.dataset_test_split is None or bool(self.dataset_test_split),
            "`dataset_test_split` must name a split (e.g. 'test') or be None.",
        )
        check(
            not self.dataset_streaming or self.max_steps > 0,
            "A streamed dataset has no length: with `dataset_streaming=True` set `max_steps` to bound training.",
        )
        check(self.shuffle_buffer_size >= 0, "`shuffle_buffer_size` must be >= 0 (0 keeps the stream's order).")
        check(
            self.column_mapping is None
            or (
                isinstance(self.column_mapping, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in self.column_mapping.items())
            ),
            "`column_mapping` must map the dataset's column names to schema names, e.g. {'text': 'prompt'}.",
        )
        check(
            not self.column_mapping or len(set(self.column_mapping.values())) == len(self.column_mapping),
            f"`column_mapping` maps two columns to the same name: {self.column_mapping}.",
        )
        check(
            0.0 <= self.proportion_empty_prompts <= 1.0,
            f"`proportion_empty_prompts` must be in [0, 1], got {self.proportion_empty_prompts}.",
        )
        check(
            self.save_total_limit is None or self.save_total_limit >= 1,
            "`save_total_limit` must be None (keep all) or >= 1.",
        )
        check(
            self.resolution is None or self.resolution >= 8,
            f"`resolution` must be at least 8 pixels (or None: the pipeline's own), got {self.resolution}.",
        )
        check(
            self.center_crop or not self.cache_latents,
            "`cache_latents` stores one crop per image, and random crops (`center_crop=False`) change every epoch: "
            "set `center_crop=True`, or `cache_latents=False`.",
        )
        check(
            not (self.cache_latents and self.proportion_empty_prompts),
            "`cache_latents` stores each row's prompt conditioning once, so prompts cannot be blanked at random: "
            "set `proportion_empty_prompts=0`, or `cache_latents=False`.",
        )
        check(
            not (self.cache_latents and self.dataset_streaming),
            "`cache_latents` needs a map-style dataset: a streamed one is read once, so a cache would never be "
            "reused. Set `dataset_streaming=False`, or `cache_latents=False`.",
        )
        check(
            self.cache_dir is None or not os.path.isfile(self.cache_dir),
            f"`cache_dir={self.cache_dir!r}` is a file: it must name a folder (created if missing).",
        )
        check(self.lora_rank >= 1, "`lora_rank` must be >= 1.")
        check(
            self.lora_alpha > 0,
            f"`lora_alpha` must be > 0, got {self.lora_alpha}: the adapters are scaled by lora_alpha/lora_rank, so 0 "
            "trains nothing. The usual choice is lora_alpha = lora_rank.",
        )
        check(self.seed >= 0, f"`seed` must be >= 0, got {self.seed}.")
        check(
            self.lora_name_or_path is None or self.use_lora,
            "`lora_name_or_path` loads a LoRA adapter: it needs `use_lora=True`.",
        )
        check_choice("hub_strategy", self.hub_strategy, HUB_STRATEGIES)
        check(
            not (self.push_to_hub and self.hub_strategy == "every_save" and not self._saves_checkpoints()),
            f"`hub_strategy='every_save'` pushes at every checkpoint, but `save_strategy={self.save_strategy!r}` with "
            f"`save_steps={self.save_steps}` writes none: set `save_steps` with save_strategy='steps' (or "
            "save_strategy='epoch'), or use hub_strategy='end'.",
        )
        check(
            self.use_lora or not self.train_text_encoder,
            "`train_text_encoder=True` trains LoRA adapters on the text encoders: it needs `use_lora=True`.",
        )
        check(0.0 <= self.lora_dropout < 1.0, "`lora_dropout` must be in [0, 1).")
        check(self.dataloader_num_workers >= 0, "`dataloader_num_workers` must be >= 0.")
        check_choice("optim", self.optim, OPTIMIZERS)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        check_choice("weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        check(self.logit_std > 0, f"`logit_std` must be > 0, got {self.logit_std}.")
        check(
            -1.0 <= self.mode_scale <= 2 / (math.pi - 2),
            f"`mode_scale` must be in [-1, {2 / (math.pi - 2):.3f}] so that 'mode' sampling stays in [0, 1], "
            f"got {self.mode_scale}.",
        )
        check(self.guidance_scale >= 0, f"`guidance_scale` must be >= 0, got {self.guidance_scale}.")
        check(
            self.max_sequence_length is None or self.max_sequence_length >= 1,
            f"`max_sequence_length` must be None (the pipeline's default) or >= 1, got {self.max_sequence_length}.",
        )
        check_choice("attention_backend", self.attention_backend, _attention_backends())
        for name in ("torch_compile_mode", "torch_compile_backend"):
            check(
                getattr(self, name) is None or self.torch_compile,
                f"`{name}` chooses how `torch_compile` compiles: set `torch_compile=True` as well.",
            )
        if self.torch_compile_backend is not None:
            check_choice("torch_compile_backend", self.torch_compile_backend, _torch_compile_backends())
        if self.torch_compile_mode is not None:
            check_choice("torch_compile_mode", self.torch_compile_mode, _torch_compile_modes())
            check(
                self.torch_compile_backend in (None, "inductor"),
                f"`torch_compile_mode` is an inductor setting; backend {self.torch_compile_backend!r} takes none: "
                "leave `torch_compile_mode=None`, or use torch_compile_backend='inductor'.",
            )
        if self.optim in BNB_OPTIMIZERS:
            check(
                importlib.util.find_spec("bitsandbytes") is not None,
                f"`optim={self.optim!r}` needs bitsandbytes: `pip install bitsandbytes`, or use optim='adamw_torch'.",
            )
        parse_optim_args(self.optim_args)

    def _read_precision_flags(self) -> None:
        """`bf16`/`fp16` (TrainingArguments' switches) and `mixed_precision` made to agree; a contradiction fails."""
        check(not (self.bf16 and self.fp16), "`bf16` and `fp16` are both True: choose one.")
        flag = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        if flag is not None:
            check(
                self.mixed_precision in ("no", flag),
                f"`{flag}=True` contradicts `mixed_precision={self.mixed_precision!r}`: set only one of them.",
            )
            self.mixed_precision = flag
        self.bf16, self.fp16 = self.mixed_precision == "bf16", self.mixed_precision == "fp16"

    def _check_schedules(self) -> None:
        """`eval_strategy`, `save_strategy` and their step counts agree, and `data_seed` is valid."""
        check_choice("eval_strategy", self.eval_strategy, EVAL_STRATEGIES)
        check_choice("save_strategy", self.save_strategy, SAVE_STRATEGIES)
        check(
            self.eval_strategy == "steps" or self.eval_steps == 0,
            f"`eval_steps={self.eval_steps}` evaluates by steps, but `eval_strategy={self.eval_strategy!r}`: set "
            "eval_strategy='steps', or leave `eval_steps=0`.",
        )
        check(
            self.eval_strategy != "no" or not self.eval_on_start,
            "`eval_on_start=True` evaluates during `train()`, but `eval_strategy='no'` never does: set one of them.",
        )
        check(
            self.warmup_steps == 0 or self.lr_scheduler_type != "constant",
            "lr_scheduler_type='constant' has no warm-up, so `warmup_steps` would be ignored: use "
            "lr_scheduler_type='constant_with_warmup', or `warmup_steps=0`.",
        )
        check(self.data_seed is None or self.data_seed >= 0, f"`data_seed` must be >= 0 or None, got {self.data_seed}.")

    def _saves_checkpoints(self) -> bool:
        """Whether `train()` writes any checkpoint."""
        return self.save_strategy == "epoch" or (self.save_strategy == "steps" and self.save_steps > 0)

    def _check_validation_steps(self) -> None:
        """`validation_steps` renders images for the trackers: it needs prompts to render and a tracker to log to."""
        if not self.validation_steps:
            return
        check(self.validation_steps >= 0, f"`validation_steps` must be >= 0 or None, got {self.validation_steps}.")
        check(
            bool(self.validation_prompts),
            "`validation_steps` renders `validation_prompts`, but none are set: give validation_prompts=[...], or "
            "set validation_steps=None.",
        )
        check(
            bool(self.report_to),
            "`validation_steps` logs images to the trackers, but `report_to` names none: set e.g. "
            "report_to=['tensorboard'], or set validation_steps=None (the end-of-training samples are saved anyway).",
        )

    def _check_types(self) -> None:
        """Every field against its annotation (see `checked_value`), then `output_dir`, which must name a folder.

        `report_to='none'` (TRL's spelling; `['none']` from the command line) means no tracker.
        """
        if self.report_to in ("none", "", ["none"]):
            self.report_to = []
        for name, hint in field_types(type(self)).items():
            setattr(self, name, checked_value(name, getattr(self, name), hint))
        check(bool(self.output_dir.strip()), "`output_dir` is empty: name the folder the run writes to.")
        check(
            not os.path.isfile(self.output_dir),
            f"`output_dir={self.output_dir!r}` is a file: it must name a folder (created if missing).",
        )

    def _read_deprecated_names(self) -> None:
        """Move a value given under a deprecated field name to its new field, with a DeprecationWarning."""
        if self.init_lora_weights is None:
            return
        check(
            isinstance(self.init_lora_weights, str),
            f"`init_lora_weights={self.init_lora_weights!r}`: this config's `init_lora_weights` is the deprecated name "
            "of `lora_name_or_path` (a saved adapter), not peft's initialisation: pass "
            "`peft_config=LoraConfig(init_lora_weights=...)` to the trainer for that.",
        )
        check(
            self.lora_name_or_path is None,
            "`init_lora_weights` is the deprecated name of `lora_name_or_path`: set only `lora_name_or_path`.",
        )
        warnings.warn(
            "`init_lora_weights` is deprecated (peft's `LoraConfig` has a field of that name with another meaning): "
            "use `lora_name_or_path`.",
            DeprecationWarning,
            stacklevel=_outside_this_module(),
        )
        self.lora_name_or_path, self.init_lora_weights = self.init_lora_weights, None

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict, without the Hub token (safe to write into cards and logs)."""
        values = dataclasses.asdict(self)
        values.pop("hub_token", None)
        return values


@dataclass
class DiffusionDPOConfig(DiffusionTrainingConfig):
    """Diffusion-DPO (Wallace et al., 2023).

    `beta` uses the `beta/2` convention of `docs/dpo.md`: the loss is
    `-log sigmoid(beta/2 * (s_w - s_l))`. Left unset it is the model family's default: 5000, the paper's
    value, for SD 1.x/2.x and SDXL (scripts without the 1/2 write 2500 for the same loss); 1000 for the
    flow-matching SD3 and FLUX (see `docs/model_families.md`). Two switches give related methods (see
    `docs/objectives.md`): `swap_preferences` trains Diffusion-NPO's negative adapter, `safeguard` applies
    Diffusion-SDPO's winner-preserving scale to the losers' gradient.
    """

    beta: float | None = with_help(
        "Inverse temperature of the preference loss, in the beta/2 convention. None: the model family's default "
        "(5000 for SD 1.x/2.x and SDXL, 1000 for SD3 and FLUX). With loss_type='ipo' it is IPO's tau as TRL's beta "
        "is (no 1/2): the margin is pulled to 1/(2 beta).",
        None,
    )
    loss_type: str = with_help(
        f"Preference loss: one of {', '.join(DPO_LOSS_TYPES)}. 'robust' is TRL's robust DPO (divided by 1 - 2 eps); "
        "before this version it was conservative DPO, which is now 'sigmoid' with `label_smoothing`.",
        "sigmoid",
    )
    label_smoothing: float = with_help(
        "Label-flip rate eps in [0, 0.5): with 'sigmoid', conservative DPO (label smoothing); with 'robust', "
        "TRL's robust DPO.",
        0.0,
    )
    sft_weight: float = with_help("Weight of an added denoising loss on the preferred images (0: off).", 0.0)
    swap_preferences: bool = with_help(
        "Train on the rejected image as the winner: gives the 'negative' adapter of Diffusion-NPO.", False
    )
    safeguard: bool = with_help(
        "Diffusion-SDPO: scale the losers' gradient so that, to first order, a step never raises the winners' "
        "denoising error.",
        False,
    )
    safeguard_mu: float = with_help(
        "SDPO's margin mu in [0, 1]: the larger, the more of the winners' own descent each step must keep "
        "(paper: 0.9 for SD 1.x, 0.6 for SDXL).",
        0.9,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.beta is None or self.beta > 0,
            f"`beta` must be > 0 (or None: the model family's default), got {self.beta}; the SD default is 5000.",
        )
        check_choice("loss_type", self.loss_type, DPO_LOSS_TYPES)
        check(
            0.0 <= self.label_smoothing < 0.5,
            f"`label_smoothing` must be in [0, 0.5), got {self.label_smoothing}.",
        )
        check(
            self.label_smoothing == 0.0 or self.loss_type in ("sigmoid", "robust"),
            "`label_smoothing` only applies to loss_type='robust' (robust DPO) or 'sigmoid' (conservative DPO).",
        )
        check(self.sft_weight >= 0, "`sft_weight` must be >= 0.")
        check(0.0 <= self.safeguard_mu <= 1.0, f"`safeguard_mu` must be in [0, 1], got {self.safeguard_mu}.")


SIMILARITY_MODES = ("text", "image", "multimodal")
TIMESTEP_SHARING = ("batch", "pair")


@dataclass
class DiffusionRPOConfig(DiffusionDPOConfig):
    """Diffusion-RPO (Gu et al., 2024): every winner against every loser, weighted by CLIP similarity.

    Adds the weighting temperature `distance_temperature` (tau), the `similarity` space and the CLIP
    model that measures it, `timestep_sharing` and `gather_across_processes`. The loss averages M*M
    cells, so at equal `beta` each pair gets about 1/M of DPO's gradient: see `docs/rpo.md` for a fair
    comparison. `beta` keeps DPO's beta/2 convention.
    """

    distance_temperature: float = with_help(
        "Softmax temperature tau of the similarity weights; tau -> 0 with distinct prompts gives (rescaled) DPO.",
        0.5,
    )
    similarity: str = with_help(
        "Where relatedness is measured: 'text' (prompts), 'image' (winner vs loser images) or 'multimodal' "
        "(the mean of both cosines).",
        "multimodal",
    )
    similarity_model_name_or_path: str | None = with_help(
        "CLIP model (Hub id or local path) for the similarity. None with similarity='text' uses the "
        "pipeline's own CLIP text encoder instead.",
        "openai/clip-vit-large-patch14",
    )
    timestep_sharing: str = with_help(
        "'batch': one timestep for the whole (global) batch, so every cell compares errors at the same noise "
        "level; 'pair': one per pair, as DPO.",
        "batch",
    )
    gather_across_processes: bool = with_help(
        "Under data parallelism, build the matrix over the global batch (rewards gathered with gradient to "
        "the local entries) instead of each process's own rows.",
        True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.distance_temperature > 0,
            f"`distance_temperature` must be > 0, got {self.distance_temperature}; the default is 0.5.",
        )
        check_choice("similarity", self.similarity, SIMILARITY_MODES)
        check_choice("timestep_sharing", self.timestep_sharing, TIMESTEP_SHARING)
        check(
            self.similarity == "text" or self.similarity_model_name_or_path is not None,
            f"similarity={self.similarity!r} needs image embeddings: set `similarity_model_name_or_path` to a "
            "CLIP model, or use similarity='text' to fall back to the pipeline's text encoder.",
        )
        check(
            self.per_device_train_batch_size >= 2 or self.gather_across_processes,
            "RPO contrasts every winner with every loser of a batch: with `per_device_train_batch_size=1` and "
            "`gather_across_processes=False` the matrix is 1x1, which is plain DPO. Use a batch of at least 2 "
            "pairs, or enable gathering across processes.",
        )


@dataclass
class DiffusionKTOConfig(DiffusionTrainingConfig):
    """Diffusion-KTO (Li et al., 2024): per-image binary feedback, no pairs needed.

    Rows are labelled images (`prompt`, `image`, `label`) or preference pairs, whose winner counts as desirable
    and loser as undesirable; `per_device_train_batch_size` counts rows. `beta` has no 1/2: the loss is
    `w * (1 - sigmoid(+-beta * (r - m - kl)))`; 1000 is the paper's value for SD 1.x.
    """

    beta: float = with_help("Inverse temperature of the KTO value function (SD 1.x: 1000).", 1000.0)
    desirable_weight: float = with_help(
        "Weight of the desirable images' loss; raise it when desirable images are rarer than undesirable ones.", 1.0
    )
    undesirable_weight: float = with_help("Weight of the undesirable images' loss.", 1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, f"`beta` must be > 0, got {self.beta}; the SD default is 1000.")
        check(
            self.desirable_weight > 0 and self.undesirable_weight > 0,
            "`desirable_weight` and `undesirable_weight` must be > 0.",
        )


@dataclass
class DiffusionMaPOConfig(DiffusionTrainingConfig):
    """MaPO (Hong et al., 2024): margin-aware preference optimization without a reference model.

    One policy forward per step: `loss = mean(m_w) - beta * mean(log sigmoid(T * (f(m_w) - f(m_l))))`
    with `f(m) = c*m / (exp(c*m) - 1)`, `T = margin_temperature`, `c = log_odds_scale` (paper: 0.1, 1000, 0.5).
    """

    beta: float = with_help("Weight of the margin term against the winners' denoising loss (MaPO: 0.1).", 0.1)
    margin_temperature: float = with_help(
        "T, the scale of the log-odds margin inside the sigmoid (MaPO: 1000, the number of training timesteps).",
        1000.0,
    )
    log_odds_scale: float = with_help("c in f(m) = c*m / (exp(c*m) - 1), MaPO's log-odds proxy of an error m.", 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta >= 0, f"`beta` must be >= 0, got {self.beta}; MaPO's default is 0.1.")
        check(self.margin_temperature > 0, f"`margin_temperature` must be > 0, got {self.margin_temperature}.")
        check(self.log_odds_scale > 0, f"`log_odds_scale` must be > 0, got {self.log_odds_scale}.")


@dataclass
class DiffusionSFTConfig(DiffusionTrainingConfig):
    """Supervised fine-tuning baseline: the plain denoising loss on the preferred images.

    Reads preference pairs (only the winners), unpaired rows (only the desirable ones) or a plain image-caption
    dataset (`prompt`, `image`); `per_device_train_batch_size` counts images. No reference model and no
    settings of its own: it is the control every preference objective should beat.
    """


# Each method's config class by the short name recipes use; light to import, so the command line's `--help`
# needs no torch. `trainers.TRAINERS` maps the same names to the trainers (a test keeps the two in step).
METHOD_CONFIGS: dict[str, type[DiffusionTrainingConfig]] = {
    "dpo": DiffusionDPOConfig,
    "rpo": DiffusionRPOConfig,
    "kto": DiffusionKTOConfig,
    "mapo": DiffusionMaPOConfig,
    "sft": DiffusionSFTConfig,
}
