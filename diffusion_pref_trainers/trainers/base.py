"""The accelerate training loop every objective shares.

A subclass states which config it takes and implements `compute_loss` on per-image denoising errors;
the loop does the rest: data order, shared noise and timesteps per row, one batched policy forward and
one reference forward (adapters off), mixed precision, accumulation, clipping, logging, checkpoints,
exact resume, evaluation, saving and pushing. It never asks which model family it trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import datasets
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from datasets.distributed import split_dataset_by_node
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from PIL import Image
from tqdm.auto import tqdm
from transformers.trainer_utils import TrainOutput

from diffusion_pref_trainers import adapters, cache, distributed, hub, offload, speed, tracking
from diffusion_pref_trainers.configs import BNB_OPTIMIZERS, DiffusionTrainingConfig
from diffusion_pref_trainers.data import (
    DECODE_ERRORS,
    PAIRED_SCHEMAS,
    ImageTransform,
    PreferenceDataset,
    RowProcessor,
    StreamingPreferenceDataset,
    apply_column_mapping,
    check_image_columns,
    decode_images_lazily,
    detect_schema,
    drop_ties,
    load_image,
    probe_images,
    row_images,
    row_seed,
    validate_labels,
)
from diffusion_pref_trainers.dtypes import cast_model
from diffusion_pref_trainers.families import get_family
from diffusion_pref_trainers.loader import Loaders
from diffusion_pref_trainers.optim import build_optimizer, build_scheduler, check_scheduler_kwargs
from diffusion_pref_trainers.sources import load_pipeline, load_preference_dataset
from diffusion_pref_trainers.state import TrainerCallback, TrainerState
from diffusion_pref_trainers.trainers.callbacks import CallbacksMixin
from diffusion_pref_trainers.trainers.checkpointing import CheckpointingMixin
from diffusion_pref_trainers.trainers.publishing import PublishingMixin, loggable_config

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Rows handled specially, counted per micro-batch and logged as `data/<name>` (running totals): unreadable rows
# replaced by the next readable one, prompts trained as empty, prompts longer than the CLIP tokenizer's limit.
DATA_COUNTS = ("skipped_rows", "empty_prompts", "truncated_prompts")


class DiffusionPreferenceTrainer(CheckpointingMixin, PublishingMixin, CallbacksMixin):
    """Base trainer: `train()`, `evaluate()`, `save_model()`, `push_to_hub()`, `state.log_history` and callbacks."""

    config_class: ClassVar[type[DiffusionTrainingConfig]] = DiffusionTrainingConfig
    method: ClassVar[str] = "diffusion-preference"
    needs_reference: ClassVar[bool] = True
    images_per_row: ClassVar[int] = 2

    def __init__(
        self,
        model: Any,
        args: DiffusionTrainingConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LRScheduler | None] = (None, None),
    ) -> None:
        self.args = args if args is not None else self.config_class()
        if not isinstance(self.args, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(self.args).__name__}."
            )
        if self.args.push_to_hub:
            hub.ensure_hub_reachable(self.args.hub_token)
        _check_trackers(self.args.report_to)
        optimizer, self.lr_scheduler = optimizers
        if optimizer is None and self.lr_scheduler is not None:
            raise ValueError(
                "`optimizers=(None, lr_scheduler)`: a scheduler steps the optimizer it was built on; pass that "
                "optimizer too, `optimizers=(optimizer, lr_scheduler)`, or neither."
            )
        self._custom_optimizer = optimizer is not None
        self.state = TrainerState()
        # accelerate keeps one state per process and refuses a second Accelerator with another precision; like
        # transformers' Trainer, start each trainer from a fresh one (the process group, if any, is kept).
        AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision=self.args.mixed_precision,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            log_with=self.args.report_to or None,
            project_dir=self.args.output_dir,
        )
        self._check_device()
        distributed.set_deepspeed_micro_batch(self.accelerator, self.args.per_device_train_batch_size)
        set_seed(self.args.seed)
        self._loaders = Loaders(self.args, self.accelerator)
        self.weight_dtype = WEIGHT_DTYPES[self.args.mixed_precision]

        self.pipe = load_pipeline(model)
        self.family = get_family(self.pipe, self.args)
        self._apply_family_defaults()
        self._check_resolution()
        self._dataset_name = train_dataset if isinstance(train_dataset, str) else None
        self._example_prompt: str | None = None  # the first training prompt, once the data is read
        eval_dataset = self._eval_source(train_dataset, eval_dataset)
        self.train_dataset = self._wrap_dataset(train_dataset, train=True) if train_dataset is not None else None
        self.eval_dataset = self._wrap_dataset(eval_dataset, train=False) if eval_dataset is not None else None
        self._validate()
        self._check_eval_schedule()
        check_scheduler_kwargs(self.args)

        full_reference = self.needs_reference and not (self.args.use_lora or peft_config is not None)
        streaming_eval = isinstance(self.eval_dataset, StreamingPreferenceDataset)
        distributed.check_engine(
            self.accelerator, self.args, full_reference=full_reference, streaming_eval=streaming_eval
        )
        self._setup_model(peft_config)
        self._identify_run()
        idle = offload.modules_to_offload(self.family, self.args, trained_text_encoders=bool(self.text_encoders))
        self.encoder_offload = offload.EncoderOffload(idle, self.accelerator.device)
        self.train_dataset, self.eval_dataset = self._cached(self.train_dataset), self._cached(self.eval_dataset)
        optimizer = optimizer if optimizer is not None else build_optimizer(self.args, self.trainable_parameters)
        self.denoiser, self.optimizer = self.accelerator.prepare(self.family.denoiser, optimizer)
        if distributed.is_fsdp2(self.accelerator):  # fully_shard replaced the parameters with sharded ones
            denoiser_params = [p for p in self.denoiser.parameters() if p.requires_grad]
            self.trainable_parameters = denoiser_params + self.text_encoder_parameters
        self._counts_pending = dict.fromkeys(DATA_COUNTS, 0)
        self._step_metrics: dict[str, list[torch.Tensor]] = {}  # the micro-batches of the optimizer step under way
        self._hub_repo_id: str | None = None
        self._push_executor: ThreadPoolExecutor | None = None
        self._push_future: Future | None = None
        self._evaluated_at: int | None = None  # the step of the last evaluation during `train()`
        self._init_callbacks(callbacks)

    # ----------------------------------------------------------------------------------------- setup
    def _check_device(self) -> None:
        """Settings the accelerator's device cannot honour: fail or warn before anything heavy loads."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and self.accelerator.num_processes == 1:
            raise RuntimeError(
                f"{os.environ['WORLD_SIZE']} processes were launched, but accelerate set this one up as a single "
                "process (a multi-GPU launch on a machine without GPUs trains each process alone). On a CPU, "
                "launch with ACCELERATE_USE_CPU=true in the environment, e.g. `ACCELERATE_USE_CPU=true accelerate "
                "launch --config_file examples/accelerate_configs/cpu_two_processes.yaml your_script.py`."
            )
        if self.accelerator.device.type != "cpu":
            return
        if self.args.mixed_precision == "fp16":
            raise ValueError(
                "`mixed_precision='fp16'` cannot train on a CPU (fp16 autocast and gradient scaling need a GPU). "
                "Use `mixed_precision='no'` on a CPU, or train on a GPU."
            )
        if self.args.mixed_precision == "bf16":
            logger.warning(
                "`mixed_precision='bf16'` on a CPU: bf16 autocast is many times slower than fp32 on most CPUs. "
                "Use `mixed_precision='no'` on a CPU; keep bf16 for a GPU."
            )
        if self.args.optim in BNB_OPTIMIZERS:
            logger.warning(
                "`optim=%r` on a CPU: bitsandbytes runs its slow CPU path and saves no accelerator memory. "
                "Use `optim='adamw_torch'` on a CPU; keep %s for a GPU.",
                self.args.optim, self.args.optim,
            )  # fmt: skip

    def family_defaults(self) -> dict[str, Callable[[], Any]]:
        """How the model family gives each config field that None leaves to it (subclasses add their own); read only
        for the fields left as None."""
        return {"resolution": lambda: self.family.default_resolution}  # the pipeline's own size

    def _apply_family_defaults(self) -> None:
        """Fill the fields left as None with the family's values on a copy, so the caller's config stays as given."""
        unset = {name: value() for name, value in self.family_defaults().items() if getattr(self.args, name) is None}
        if unset:
            self.args = dataclasses.replace(self.args, **unset)
            self.family.config = self.args  # the family reads the settings in force
            for name, value in unset.items():
                logger.info("`%s` not set: using %s, the %s family's default.", name, value, self.family.name)

    def _check_resolution(self) -> None:
        """Resolutions the VAE (and patching) cannot divide are rejected before anything runs."""
        multiple = self.family.resolution_multiple
        if self.args.resolution % multiple:
            raise ValueError(
                f"`resolution={self.args.resolution}` must be a multiple of {multiple} for this pipeline "
                f"(e.g. {self.args.resolution // multiple * multiple or multiple})."
            )

    def _validate(self) -> None:
        """Objective-specific checks on the config and data; subclasses extend this."""

    def _check_eval_schedule(self) -> None:
        """Evaluation asked of `train()` needs an eval set: otherwise it would silently never run."""
        args = self.args
        asked = [name for name, on in (("eval_on_start", args.eval_on_start), ("eval_steps", args.eval_steps)) if on]
        if args.eval_strategy == "epoch":
            asked.append("eval_strategy='epoch'")
        if asked and self.eval_dataset is None:
            raise ValueError(
                f"{', '.join(f'`{name}`' for name in asked)} asks for evaluation, but there is no eval set: pass "
                "eval_dataset= (or set `dataset_test_split`), or leave evaluation off."
            )

    def _eval_source(self, train_dataset: Any, eval_dataset: Any) -> Any:
        """The evaluation source: the one given, else (as TRL) the training source read at `dataset_test_split`."""
        split = self.args.dataset_test_split
        if eval_dataset is not None or not split or train_dataset is None:
            return eval_dataset
        if not _names_splits(train_dataset):
            raise ValueError(
                f"`dataset_test_split={split!r}` names a split of the training source, but a datasets."
                f"{type(train_dataset).__name__} has no splits: pass eval_dataset=, give the training data as a "
                "DatasetDict (or a Hub id or path), or set `dataset_test_split=None`."
            )
        return train_dataset

    def _wrap_dataset(self, source: Any, *, train: bool) -> torch.utils.data.Dataset:
        """Load, check the schema, labels and images, drop ties and wrap a dataset into model-ready rows."""
        args = self.args
        split = args.dataset_train_split if train else args.dataset_test_split or "test"
        dataset = load_preference_dataset(
            source, split=split, config_name=args.dataset_config, streaming=args.dataset_streaming
        )
        dataset = decode_images_lazily(apply_column_mapping(dataset, args.column_mapping))
        schema = detect_schema(list(dataset.column_names or []))
        check_image_columns(dataset, schema)
        dataset = self._adapt_schema(validate_labels(dataset, schema), schema)
        schema = detect_schema(list(dataset.column_names or []))
        if schema == "pickapic" and args.drop_ties:
            dataset, dropped = drop_ties(dataset)
            if train and dropped:
                self.state.dropped_ties = dropped
                logger.info("Dropped %d tied Pick-a-Pic rows (label_0 == 0.5).", dropped)
        processor = RowProcessor(
            schema=schema,
            transform=ImageTransform(args.resolution, center_crop=args.center_crop or not train),
            random_flip=args.random_flip and train,
            proportion_empty_prompts=args.proportion_empty_prompts if train else 0.0,
            swap=self.swaps_preferences(),
        )
        probe_images(dataset, processor, args.skip_bad_images)
        first = _first_row(dataset, schema) if train else None
        if first is not None:
            self._example_prompt = first[0]  # the model card's usage example
            _warn_on_size_mismatch(first[1], args.resolution)
        if isinstance(dataset, datasets.IterableDataset):
            if train and args.shuffle_buffer_size:
                seed = args.seed if args.data_seed is None else args.data_seed
                dataset = dataset.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
            dataset = split_dataset_by_node(
                dataset, rank=self.accelerator.process_index, world_size=self.accelerator.num_processes
            )
            return StreamingPreferenceDataset(dataset, processor, args.seed, args.skip_bad_images)
        return PreferenceDataset(dataset, processor, args.seed, args.skip_bad_images)

    def swaps_preferences(self) -> bool:
        """Whether rows enter with winner and loser exchanged (DPO's `swap_preferences`, for NPO)."""
        return False

    def _adapt_schema(self, dataset: Any, schema: str) -> Any:
        """Check the schema suits the objective (pairs by default); subclasses may convert instead."""
        if schema not in PAIRED_SCHEMAS:
            raise ValueError(
                f"{type(self).__name__} trains on preference pairs, but the dataset has the {schema!r} schema "
                "(one image per row). Use DiffusionKTOTrainer for labelled images (prompt, image, label), "
                "DiffusionSFTTrainer for captioned ones, or provide prompt/chosen/rejected or Pick-a-Pic columns."
            )
        return dataset

    def _setup_model(self, peft_config: LoraConfig | None) -> None:
        """Freeze the encoders, add adapters (or unfreeze for full fine-tuning) and move to the device."""
        device = self.accelerator.device
        for module in self.family.frozen_modules():
            cast_model(module.requires_grad_(False), self.weight_dtype, device).eval()
        if self.args.use_lora and peft_config is None:
            targets = self.args.lora_target_modules or list(self.family.default_lora_targets)
            peft_config = adapters.lora_config_from_args(
                self.args.lora_rank, self.args.lora_alpha, self.args.lora_dropout, targets
            )
        self.peft_config = peft_config if self.args.use_lora or peft_config is not None else None
        denoiser = self.family.denoiser
        self.reference = adapters.prepare_denoiser(
            denoiser, self.peft_config, self.weight_dtype, self.args.gradient_checkpointing,
            keep_reference=self.needs_reference,
        )  # fmt: skip
        denoiser.to(device)
        if self.reference is not None:
            self.reference.to(device)
        speed.apply_fast_path(self.args, denoiser, self.reference)  # attention kernel, channels_last, torch_compile
        self.text_encoders = self._add_text_encoder_adapters() if self.args.train_text_encoder else {}
        if self.args.lora_name_or_path and self.peft_config is not None:
            path = hub.adapter_file(self.args.lora_name_or_path, token=self.args.hub_token)
            modules = {self.family.denoiser_attr: denoiser, **self.text_encoders}
            adapters.load_saved_lora(path, modules, self.family.lora_state_dict)
            logger.info("LoRA weights initialised from %s", path)
        self.trainable_parameters = [p for p in denoiser.parameters() if p.requires_grad]
        self.text_encoder_parameters = [
            p for encoder in self.text_encoders.values() for p in encoder.parameters() if p.requires_grad
        ]
        self.trainable_parameters += self.text_encoder_parameters
        if not self.trainable_parameters:
            raise ValueError(
                "No trainable parameters: check `lora_target_modules` against the denoiser's module names."
            )

    def _add_text_encoder_adapters(self) -> dict[str, torch.nn.Module]:
        """LoRA on the family's CLIP text encoders (the denoiser's rank, alpha, dropout), by pipeline attribute."""
        config = adapters.text_encoder_lora_config(self.peft_config, list(self.family.text_encoder_lora_targets))
        encoders = self.family.lora_text_encoders()
        for encoder in encoders.values():
            encoder.add_adapter(config)
            cast_training_params(encoder, dtype=torch.float32)
        return encoders

    @property
    def _unwrapped(self) -> torch.nn.Module:
        """The denoiser without its data-parallel wrapper."""
        return self.accelerator.unwrap_model(self.denoiser)

    # ----------------------------------------------------------------------------------- objective
    def compute_loss(
        self, model_err: torch.Tensor, ref_err: torch.Tensor | None, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective on per-image errors, ordered image-major (all winners, then all losers)."""
        raise NotImplementedError

    def cache_extras(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-row tensors `[M, ...]` of a batch of pixels that `cache_latents` should store besides latents and
        conditioning; training batches then carry them under the same keys (none here; RPO: CLIP embeddings)."""
        return {}

    def cache_extras_identity(self) -> dict[str, Any]:
        """What `cache_extras` depends on beyond the pixels and prompts (its models, settings): part of the
        cache's fingerprint, so that a change rebuilds the cache."""
        return {}

    def sample_timesteps(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """One timestep per row, shared by the row's images; subclasses may share it more widely."""
        return self.family.sample_timesteps(rows, generator)

    # ------------------------------------------------------------------------------------- forward
    def denoising_errors(
        self, batch: dict[str, Any], generator: torch.Generator, *, with_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-image MSE of the policy and the reference on the same noisy latents.

        Images are arranged image-major (`[K*M]`: the first image of every row, then the second...), each
        row's images share one noise and one timestep, and all K*M go through ONE batched forward.
        """
        device = self.accelerator.device
        rows, per_row = len(batch["prompt"]), self.images_per_row
        if "latents" in batch:
            latents = batch["latents"].to(device).transpose(0, 1).flatten(0, 1).float()
        else:
            latents = self.family.encode_images(batch["pixel_values"].to(device).transpose(0, 1).flatten(0, 1))
        cond, ref_cond = self._conditioning(batch, with_grad)
        image_info = {
            key: batch[key].to(device).transpose(0, 1).flatten(0, 1) for key in ("original_sizes", "crop_top_lefts")
        }
        noise = torch.randn((rows, *latents.shape[1:]), generator=generator).to(device).repeat(per_row, 1, 1, 1)
        timesteps = self.sample_timesteps(rows, generator).to(device).repeat(per_row)
        noisy, target = self.family.noisy_and_target(latents, noise, timesteps)

        weights = self.family.loss_weights(timesteps)  # per-image timestep weighting (ones for most families)

        with torch.set_grad_enabled(with_grad), self.accelerator.autocast():
            pred = self.family.predict(self.denoiser, noisy, timesteps, cond, image_info)
        model_err = _per_sample_mse(pred, target) * weights
        if with_grad:
            model_err = self.adjust_policy_errors(model_err, pred)
        ref_err = None
        if self.needs_reference:
            with torch.no_grad(), self.accelerator.autocast(), self._reference() as reference:
                ref_pred = self.family.predict(reference, noisy, timesteps, ref_cond, image_info)
                ref_err = _per_sample_mse(ref_pred, target) * weights
        return model_err, ref_err

    def adjust_policy_errors(self, model_err: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Hook on the policy's errors and the outputs they came from: may reshape gradients, never values."""
        return model_err

    def _conditioning(self, batch: dict[str, Any], with_grad: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Per-image prompt conditioning of the policy and of the reference (its text encoders without LoRA).

        They differ only when text encoders are trained; then the policy's carries their gradient.
        """
        if "cond" in batch:
            cond = ref_cond = batch["cond"]
        else:
            with torch.set_grad_enabled(with_grad and bool(self.text_encoders)):
                cond = ref_cond = self.family.encode_prompts(batch["prompt"])
            if self.text_encoders and self.needs_reference:
                with torch.no_grad(), adapters.adapters_disabled(*self.text_encoders.values()):
                    ref_cond = self.family.encode_prompts(batch["prompt"])
        device, per_row = self.accelerator.device, self.images_per_row

        def per_image(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {key: value.to(device).repeat(per_row, *([1] * (value.dim() - 1))) for key, value in rows.items()}

        policy = per_image(cond)
        return policy, policy if ref_cond is cond else per_image(ref_cond)

    def _cached(self, dataset: Any) -> Any:
        """With `cache_latents`, the dataset read from its precompute cache (the main process builds it first).

        Trained text encoders change their outputs as they learn: then only the latents are cached.
        """
        if dataset is None or not self.args.cache_latents:
            return dataset
        frozen_text = not self.text_encoders
        encoders = cache.CacheEncoders(
            images=self.family.encode_images,
            prompts=self.family.encode_prompts if frozen_text else None,
            extras=self.cache_extras if frozen_text else lambda batch: {},
        )
        settings = {"family": self.family.name, "extras": self.cache_extras_identity() if frozen_text else {}}
        with self.accelerator.main_process_first(), torch.no_grad(), self.encoder_offload.on_device():
            return cache.cache_dataset(
                dataset, encoders, modules=self.family.frozen_modules(), settings=settings,
                cache_dir=self.args.cache_dir, batch_size=self.args.per_device_train_batch_size,
                cond_dtype=self.weight_dtype,
            )  # fmt: skip

    def _reference(self) -> Any:
        """Context giving the reference denoiser: adapters off, or the frozen copy."""
        if self.reference is not None:
            return contextlib.nullcontext(self.reference)
        return adapters.adapters_disabled(self._unwrapped)

    # --------------------------------------------------------------------------------------- data
    def _batches_per_epoch(self) -> int | None:
        """Micro-batches per epoch on each process (None for streaming data of unknown length)."""
        if isinstance(self.train_dataset, StreamingPreferenceDataset):
            return None
        per_process = len(self.train_dataset) // self.accelerator.num_processes
        return per_process // self.args.per_device_train_batch_size

    def _total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = self._batches_per_epoch()
        if per_epoch is None:
            raise ValueError("A streaming dataset has no length: set `max_steps` to bound training.")
        return max(1, math.ceil(self.args.num_train_epochs * per_epoch / self.args.gradient_accumulation_steps))

    # -------------------------------------------------------------------------------------- train
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Run the training loop; resumes exactly from a checkpoint folder or 'latest' when asked.

        Returns transformers' `TrainOutput(global_step, training_loss, metrics)`; the state is `trainer.state`.
        """
        if self.train_dataset is None:
            raise ValueError("No `train_dataset` was given to the trainer.")
        args = self.args
        # accelerate shares the accumulation setting across a process: reassert ours (another trainer may have run).
        self.accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
        per_epoch = self._batches_per_epoch()
        if per_epoch == 0:
            raise ValueError(
                f"The training set ({len(self.train_dataset)} rows) is smaller than one batch across "
                f"{self.accelerator.num_processes} process(es) of {args.per_device_train_batch_size} rows."
            )
        total = self._total_steps()
        self.state.max_steps = total
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(args, self.optimizer, total)  # checkpointed as JSON
        self._lock_output_dir()
        try:  # the lock goes with the run, whether it ends in success or an error
            resume = self._prepare_output_dir(resume_from_checkpoint or args.resume_from_checkpoint, total)
            if resume is not None:
                self._load_checkpoint(resume)
            self._set_state_references(total, per_epoch)
            return self._train_locked(total, per_epoch)
        finally:
            self._lock.release()

    def _set_state_references(self, total: int, per_epoch: int | None) -> None:
        """The run's settings in `state`, as transformers' Trainer puts them there for its callbacks."""
        state, args = self.state, self.args
        state.max_steps, state.train_batch_size = total, args.per_device_train_batch_size
        steps_per_epoch = per_epoch / args.gradient_accumulation_steps if per_epoch else None
        state.num_train_epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else int(args.num_train_epochs)
        state.logging_steps, state.eval_steps, state.save_steps = args.logging_steps, args.eval_steps, args.save_steps
        state.is_world_process_zero = self.accelerator.is_main_process
        state.is_local_process_zero = self.accelerator.is_local_main_process

    def _train_locked(self, total: int, per_epoch: int | None) -> TrainOutput:
        """The loop, the final evaluation, save and push of `train()`, once the output folder is this run's."""
        args, start, first_step = self.args, time.time(), self.state.global_step
        # The loss summed over this run's kept optimizer steps, and their count, for `TrainOutput`.
        self._loss_sum, self._kept_steps = torch.zeros((), device=self.accelerator.device), 0
        if self.accelerator.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            self._init_trackers()
        main = self.accelerator.is_local_main_process
        progress = tqdm(total=total, initial=self.state.global_step, desc="training", unit="step", disable=not main)
        self.encoder_offload.offload()  # idle while training reads the cache (`offload_cached_encoders`)
        try:
            self._event("on_train_begin")  # after the offload: a callback measuring memory sees the training's
            if self.control.should_evaluate:  # `eval_on_start` (`StepSchedule.on_train_begin`)
                self._evaluate_in_training()
            self._run_epochs(total, per_epoch, progress)
            if self.accelerator.is_main_process:  # the count is summed over processes
                self._warn_skipped_rows("training", self.state.skipped_rows)
            final_eval = args.eval_strategy != "no" and self._evaluated_at != self.state.global_step
            if self.eval_dataset is not None and final_eval:  # reads the cache too, like the steps
                self._evaluate_in_training()
        finally:  # also when a step raises: the pipeline gets its encoders back, and no loader worker outlives the run
            progress.close()
            self.encoder_offload.restore()
            self._loaders.close()
        output = self._train_output(start, first_step, self._loss_sum, self._kept_steps)  # reduced while DDP runs
        self._wait_for_push()
        self.save_model()
        if args.validation_prompts and self.accelerator.is_main_process:
            self._save_samples()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self._event("on_train_end")
        if args.push_to_hub:
            self.push_to_hub()
        return output

    def _run_epochs(self, total: int, per_epoch: int | None, progress: tqdm) -> None:
        """Optimizer steps up to `total`, epoch after epoch, from where `state` stands (mid-epoch on resume)."""
        args = self.args
        micro = self.state.global_step * args.gradient_accumulation_steps
        epoch, skip = (micro // per_epoch, micro % per_epoch) if per_epoch else (int(self.state.epoch), 0)
        pending: dict[str, list[torch.Tensor]] = {}
        self.denoiser.train()
        while self.state.global_step < total and not self.control.should_training_stop:
            batches, exhausted = 0, True
            self._event("on_epoch_begin")
            for batch in self._loaders.batches(
                self.train_dataset, args.per_device_train_batch_size, epoch, shuffle=True, skip=skip
            ):
                batches += 1
                if micro % args.gradient_accumulation_steps == 0:
                    self._event("on_step_begin")
                self._train_micro_step(batch, micro, pending)
                micro += 1
                if not self.accelerator.sync_gradients:
                    self._event("on_substep_end")
                    continue
                self.state.global_step += 1
                self.state.epoch = micro / per_epoch if per_epoch else float(epoch)
                progress.update(1)
                self._after_optimizer_step(pending, progress)
                if self.state.global_step >= total or self.control.should_training_stop:
                    exhausted = per_epoch is not None and micro % per_epoch == 0
                    break
            if batches == 0:  # a stream with fewer rows than one batch would otherwise loop forever
                raise ValueError(
                    f"An epoch of the training data gave no full batch of {args.per_device_train_batch_size} rows "
                    "(too few rows, or none readable): check the dataset and its split."
                )
            self._end_epoch(complete=exhausted)
            self._after_epoch(pending, progress)
            epoch, skip = epoch + 1, 0

    def _train_micro_step(self, batch: dict[str, Any], micro: int, pending: dict[str, list[torch.Tensor]]) -> None:
        """Forward, loss and backward of one micro-batch; the optimizer steps when accumulation is done."""
        generator = torch.Generator().manual_seed(row_seed(self.args.seed, micro, self.accelerator.process_index))
        with self.accelerator.accumulate(self.denoiser):
            model_err, ref_err = self.denoising_errors(batch, generator)
            loss, metrics = self.compute_loss(model_err, ref_err, batch)
            self.accelerator.backward(loss)
            for key, value in {"loss": loss, **metrics}.items():
                self._step_metrics.setdefault(key, []).append(value.detach().float())
            if self.accelerator.sync_gradients:
                self._optimizer_step(pending)
            self.optimizer.zero_grad(set_to_none=True)  # also drops a skipped step's gradients
        self._count_rows(batch)

    def _optimizer_step(self, pending: dict[str, list[torch.Tensor]]) -> None:
        """Clip and step, or skip a non-finite step; its metrics join the logging window only when it is kept.

        The LR schedule advances on a skipped step too: the step counts (`global_step`), so the learning rate stays
        a function of the step, the schedule ends on time and a resume is exact.
        """
        self._sync_text_encoder_gradients()
        norm = self._clip_gradients()
        metrics, self._step_metrics = self._step_metrics, {}
        if self._step_is_finite(metrics["loss"], norm):
            self._event("on_pre_optimizer_step")
            self.optimizer.step()
            self._event("on_optimizer_step")
            self.state.nonfinite_streak = []
            self._loss_sum += torch.stack(metrics["loss"]).mean().to(self._loss_sum.device)
            self._kept_steps += 1
            for key, values in {**metrics, "grad_norm": [norm]}.items():
                pending.setdefault(key, []).extend(values)
        else:
            self._skip_step()
        self.lr_scheduler.step()

    def _step_is_finite(self, losses: list[torch.Tensor], norm: torch.Tensor) -> bool:
        """Whether every process's losses of this step, and its gradient norm, are finite.

        The flag is reduced across processes so that all of them step or skip together (DDP stays in lockstep):
        one host read per optimizer step, never per micro-batch. Under fp16 the loss scaler skips gradient
        overflows itself (and backs off its scale), so only the loss counts there.
        """
        finite = torch.stack(losses).isfinite().all()
        if self.accelerator.scaler is None:
            finite = finite & norm.isfinite().to(finite.device)
        flags = (~finite).float().to(self.accelerator.device)
        return self.accelerator.reduce(flags, reduction="sum").item() == 0

    def _skip_step(self) -> None:
        """Leave the weights and the optimizer state as they are; count the step, and stop after too many in a row."""
        step, state = self.state.global_step + 1, self.state
        state.nonfinite_steps += 1
        state.nonfinite_streak.append(step)
        scaler = self.accelerator.scaler
        if scaler is not None:  # close the loss scaler's step as an overflow would: its scale backs off
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        logger.warning(
            "Step %d: the loss or gradient norm is not finite (NaN or inf) on at least one process; the step is "
            "skipped, nothing is updated (%d in a row, %d in this run).",
            step, len(state.nonfinite_streak), state.nonfinite_steps,
        )  # fmt: skip
        if len(state.nonfinite_streak) >= self.args.max_nonfinite_steps:
            raise RuntimeError(
                f"Training stopped: {len(state.nonfinite_streak)} optimizer steps in a row (steps "
                f"{state.nonfinite_streak}) had a non-finite loss or gradient norm (`max_nonfinite_steps="
                f"{self.args.max_nonfinite_steps}`). They were skipped and no model was saved; any checkpoint in "
                f"{self.args.output_dir} holds finite weights. Lower `learning_rate` or `beta`, check the data for "
                "broken rows, or train with mixed_precision='bf16' or 'no' instead of 'fp16'."
            )

    def _count_rows(self, batch: dict[str, Any]) -> None:
        """Add a micro-batch's specially handled rows (see `DATA_COUNTS`) to the counts of the logging window."""
        prompts = batch["prompt"]
        self._counts_pending["skipped_rows"] += int(batch["bad_rows"])
        self._counts_pending["empty_prompts"] += sum(not prompt.strip() for prompt in prompts)
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is not None:
            ids = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
            self._counts_pending["truncated_prompts"] += sum(len(row) > tokenizer.model_max_length for row in ids)

    def _warn_skipped_rows(self, stage: str, skipped: int) -> None:
        """One warning for all the rows of a stage whose images could not be read (each is logged at DEBUG level)."""
        if skipped:
            logger.warning(
                "%d row(s) with unreadable images were skipped in %s and the next readable rows read instead (DEBUG "
                "logging of diffusion_pref_trainers.data names them). Set `skip_bad_images=False` to stop at the "
                "first one with its row index.",
                skipped, stage,
            )  # fmt: skip

    def _sync_text_encoder_gradients(self) -> None:
        """Average the text encoders' LoRA gradients over processes (only the denoiser is wrapped for DDP)."""
        if self.accelerator.num_processes == 1:
            return
        for param in self.text_encoder_parameters:
            if param.grad is not None:
                param.grad.copy_(self.accelerator.reduce(param.grad, reduction="mean"))

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to `max_grad_norm` (if set) and return the pre-clipping global norm, as a tensor."""
        if self.args.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.trainable_parameters, self.args.max_grad_norm)
            return torch.as_tensor(distributed.plain(norm))
        grads = [p.grad.detach().float().norm() for p in self.trainable_parameters if p.grad is not None]
        return distributed.plain(torch.stack(grads).norm()) if grads else torch.zeros(())

    def _after_optimizer_step(self, pending: dict[str, list[torch.Tensor]], progress: tqdm) -> None:
        """`on_step_end`, then the logging, evaluation and checkpoint its control asks for (`StepSchedule`'s and the
        callbacks'), and the validation images every `validation_steps`."""
        self._event("on_step_end")
        step = self.state.global_step
        if self.control.should_log:
            self._log_window(pending, progress)
        if self.control.should_evaluate:
            self._evaluate_in_training()
        if self.args.validation_steps and step % self.args.validation_steps == 0 and step < self.state.max_steps:
            self._log_validation()  # the last step's images are the end's (`_save_samples`)
        if self.control.should_save:
            self._save_and_push()

    def _after_epoch(self, pending: dict[str, list[torch.Tensor]], progress: tqdm) -> None:
        """After `on_epoch_end`: the logging, evaluation and checkpoint its control asks for (the 'epoch' strategies'
        and the callbacks'). An evaluation already made at this step is not repeated."""
        if self.control.should_log:
            self._log_window(pending, progress)
        if self.control.should_evaluate and self._evaluated_at != self.state.global_step:
            self._evaluate_in_training()
        self.control.should_evaluate = False
        if self.control.should_save:
            self._save_and_push()

    def _log_window(self, pending: dict[str, list[torch.Tensor]], progress: tqdm) -> None:
        """Log the metrics averaged over the steps since the last log, and the running data counts."""
        logs = self._reduce(pending) if pending else {}  # empty when every step of the window was skipped
        counts = torch.tensor([float(self._counts_pending[key]) for key in DATA_COUNTS], device=self.accelerator.device)
        for key, count in zip(DATA_COUNTS, self.accelerator.reduce(counts, reduction="sum").tolist(), strict=True):
            setattr(self.state, key, getattr(self.state, key) + int(count))
            logs[f"data/{key}"] = float(getattr(self.state, key))
        self._counts_pending = dict.fromkeys(DATA_COUNTS, 0)
        logs["train/nonfinite_steps"] = float(self.state.nonfinite_steps)
        logs["learning_rate"] = self.lr_scheduler.get_last_lr()[0]
        pending.clear()
        self._log(logs)
        progress.set_postfix(
            loss=f"{logs.get('loss', float('nan')):.4g}", acc=f"{logs.get('rewards/accuracies', float('nan')):.2f}"
        )

    def _evaluate_in_training(self) -> None:
        """Evaluate (callbacks get `on_evaluate`), log the metrics and track the best one, remembering the step
        (`train()` then skips a repeat at its end)."""
        metrics = self.evaluate()
        self._log(metrics)
        self._track_best(metrics)
        self._evaluated_at = self.state.global_step

    def _save_and_push(self) -> None:
        """A checkpoint, and its upload in the background with hub_strategy='every_save'."""
        self._save_checkpoint()
        if self.args.push_to_hub and self.args.hub_strategy == "every_save" and self.accelerator.is_main_process:
            self._push_in_background(f"Training in progress, step {self.state.global_step}")

    def _reduce(self, pending: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Average each metric over the window and across processes: the one host sync per log.

        A NaN marks a metric a micro-batch could not measure (KTO's `rewards/rejected` in a batch of
        desirable images only): it is left out of the average.
        """
        keys = sorted(pending)
        sums, counts = zip(*(_measured_sum(key, torch.stack(pending[key])) for key in keys), strict=True)
        totals = self.accelerator.reduce(torch.stack([*sums, *counts]).to(self.accelerator.device), reduction="sum")
        return dict(zip(keys, (totals[: len(keys)] / totals[len(keys) :]).tolist(), strict=True))

    def _init_trackers(self) -> None:
        """Start the `report_to` trackers under the run name (files under `output_dir/runs/<run name>`)."""
        name = tracking.resolved_run_name(self.args.run_name, self.args.output_dir)
        self.accelerator.project_configuration.logging_dir = tracking.logging_dir(self.args.output_dir, name)
        self.accelerator.init_trackers(
            self.method.replace("-", "_"),
            config=loggable_config(self.args.to_dict()),
            init_kwargs=tracking.tracker_init_kwargs(name),
        )

    def _log(self, logs: dict[str, float]) -> None:
        """Append to `state.log_history` (plain keys), send to trackers (`train/`, `eval/`) and callbacks."""
        entry = {**logs, "step": self.state.global_step, "epoch": round(self.state.epoch, 4)}
        self.state.log_history.append(entry)
        self.accelerator.log(tracking.namespaced({**logs, "epoch": entry["epoch"]}), step=self.state.global_step)
        self._event("on_log", logs=entry)

    # --------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, eval_dataset: Any = None) -> dict[str, float]:
        """Loss and reward metrics on held-out rows with fixed noise, averaged over `eval_noise_draws`."""
        dataset = (
            self.eval_dataset if eval_dataset is None else self._cached(self._wrap_dataset(eval_dataset, train=False))
        )
        if dataset is None:
            raise ValueError("No eval dataset: pass one to the trainer or to evaluate().")
        metrics = self._measure(dataset)
        self._event("on_evaluate", metrics=metrics)
        return metrics

    def _measure(self, dataset: torch.utils.data.Dataset) -> dict[str, float]:
        """The `eval_*` metrics of `dataset`, averaged over its rows, noise draws and processes."""
        self.denoiser.eval()
        totals: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}  # rows per metric, NaNs (unmeasurable in a batch) left out
        batches = self._loaders.batches(dataset, self.args.per_device_eval_batch_size, 0, shuffle=False)
        skipped = 0
        for index, batch in enumerate(self._eval_progress(batches)):
            skipped += int(batch["bad_rows"])
            draws = []
            for draw in range(self.args.eval_noise_draws):
                seed = row_seed(self.args.seed, 10_000_019 * (draw + 1) + index, self.accelerator.process_index)
                draws.append(self.denoising_errors(batch, torch.Generator().manual_seed(seed), with_grad=False))
            model_err = torch.stack([m for m, _ in draws]).mean(0)
            ref_err = torch.stack([r for _, r in draws]).mean(0) if self.needs_reference else None
            loss, metrics = self.compute_loss(model_err, ref_err, batch)
            size = len(batch["prompt"])
            for key, value in {"loss": loss, **metrics}.items():
                total, count = _measured_sum(key, value.detach().float() * size, weight=size)
                totals[key], counts[key] = totals.get(key, 0.0) + total, counts.get(key, 0.0) + count
        self.denoiser.train()
        self._warn_skipped_rows("evaluation", skipped)  # this process's rows
        keys = sorted(totals)
        summed = self.accelerator.reduce(torch.stack([totals[k] for k in keys] + [counts[k] for k in keys]), "sum")
        means = (summed[: len(keys)] / summed[len(keys) :]).tolist()
        return {f"eval_{key}": value for key, value in zip(keys, means, strict=True)}

    def _eval_progress(self, batches: Iterator[dict[str, Any]]) -> tqdm:
        """A progress bar over the eval batches, named for when it measures; gone when done, so that during
        training only the training bar stays."""
        step = self.state.global_step
        desc = "evaluating before training" if step == 0 else f"evaluating at step {step}"
        main = self.accelerator.is_local_main_process
        return tqdm(batches, desc=desc, unit="batch", leave=False, disable=not main)


# `report_to` names accelerate accepts, and the package each one imports.
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "comet_ml": "comet_ml",
    "mlflow": "mlflow", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
}  # fmt: skip


def _check_trackers(report_to: list[str]) -> None:
    """Every tracker of `report_to` can be imported: otherwise the run would train without the logs it asked for."""
    for name in report_to:
        package = TRACKER_PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ImportError(
                f"`report_to` asks for {name!r}, but {package} is not installed: `pip install {package}`, "
                f"or remove {name!r} from `report_to`."
            )


def _first_row(dataset: Any, schema: str) -> tuple[str, Image.Image] | None:
    """The prompt and first image of a dataset's first row; None when it is empty or unreadable (reported where
    the rows are read)."""
    try:
        row = next(iter(dataset)) if isinstance(dataset, datasets.IterableDataset) else dataset[0]
        prompt, images, _ = row_images(row, schema)
        return str(prompt or ""), load_image(images[0])
    except (*DECODE_ERRORS, StopIteration, IndexError, KeyError):
        return None


def _warn_on_size_mismatch(image: Image.Image, resolution: int) -> None:
    """One warning when the training images are not `resolution` px on their short side: every image is then
    resized, which costs time (upsampling small images) or detail (downsampling), often unintended."""
    if min(image.size) != resolution:
        logger.warning(
            "The training images are %dx%d px but `resolution` is %d: every image is resized to %d px. Set "
            "`resolution=%d` to train at the data's size, or resize the data to the resolution you want.",
            image.width, image.height, resolution, resolution, min(image.size),
        )  # fmt: skip


def _names_splits(source: Any) -> bool:
    """Whether a training source is a dataset name or a split dictionary, from which a test split can be read."""
    return isinstance(source, (str, os.PathLike, datasets.DatasetDict, datasets.IterableDatasetDict))


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every latent element of each sample, in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def _measured_sum(key: str, values: torch.Tensor, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of a metric's measured values and their count (times `weight`).

    NaN marks a value a batch could not measure; `loss` and `grad_norm` always count, so divergence shows.
    """
    values = values.float()
    measured = torch.ones_like(values, dtype=torch.bool) if key in ("loss", "grad_norm") else ~values.isnan()
    return torch.where(measured, values, 0.0).sum(), measured.sum().float() * weight
