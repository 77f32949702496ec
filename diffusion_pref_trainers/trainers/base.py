"""The accelerate training loop every objective shares.

A subclass states which config it takes and implements `compute_loss` on per-image denoising errors;
the loop does the rest: data order, shared noise and timesteps per row, one batched policy forward and
one reference forward (adapters off), mixed precision, accumulation, clipping, logging, checkpoints,
exact resume, evaluation, saving and pushing. It never asks which model family it trains.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
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
from tqdm.auto import tqdm

from diffusion_pref_trainers import adapters, cache, checkpoints, hub, offload, speed
from diffusion_pref_trainers.configs import DiffusionTrainingConfig
from diffusion_pref_trainers.data import (
    PAIRED_SCHEMAS,
    ImageTransform,
    PreferenceDataset,
    RowProcessor,
    StreamingPreferenceDataset,
    apply_column_mapping,
    decode_images_lazily,
    detect_schema,
    drop_ties,
    row_seed,
)
from diffusion_pref_trainers.dtypes import cast_model
from diffusion_pref_trainers.families import get_family
from diffusion_pref_trainers.loader import Loaders
from diffusion_pref_trainers.optim import build_optimizer, build_scheduler
from diffusion_pref_trainers.sources import load_pipeline, load_preference_dataset
from diffusion_pref_trainers.state import TrainerCallback, TrainerState
from diffusion_pref_trainers.trainers.checkpointing import CheckpointingMixin
from diffusion_pref_trainers.trainers.publishing import PublishingMixin, loggable_config

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Rows handled specially, counted per micro-batch and logged as `data/<name>` (running totals): unreadable rows
# replaced by the next readable one, prompts trained as empty, prompts longer than the CLIP tokenizer's limit.
DATA_COUNTS = ("skipped_rows", "empty_prompts", "truncated_prompts")


class DiffusionPreferenceTrainer(CheckpointingMixin, PublishingMixin):
    """Base trainer: `train()`, `evaluate()`, `save_model()`, `push_to_hub()` and `state.log_history`."""

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
    ) -> None:
        self.args = args if args is not None else self.config_class()
        if not isinstance(self.args, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(self.args).__name__}."
            )
        if self.args.push_to_hub:
            hub.ensure_hub_reachable(self.args.hub_token)
        self.callbacks = list(callbacks or [])
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
        set_seed(self.args.seed)
        self._loaders = Loaders(self.args, self.accelerator)
        self.weight_dtype = WEIGHT_DTYPES[self.args.mixed_precision]

        self.pipe = load_pipeline(model)
        self.family = get_family(self.pipe, self.args)
        self._check_resolution()
        self._dataset_name = train_dataset if isinstance(train_dataset, str) else None
        if eval_dataset is None and self.args.dataset_test_split and _names_splits(train_dataset):
            eval_dataset = train_dataset  # as TRL: the test split of the same dataset
        self.train_dataset = self._wrap_dataset(train_dataset, train=True) if train_dataset is not None else None
        self.eval_dataset = self._wrap_dataset(eval_dataset, train=False) if eval_dataset is not None else None
        self._validate()

        self._setup_model(peft_config)
        idle = offload.modules_to_offload(self.family, self.args, trained_text_encoders=bool(self.text_encoders))
        self.encoder_offload = offload.EncoderOffload(idle, self.accelerator.device)
        self.train_dataset, self.eval_dataset = self._cached(self.train_dataset), self._cached(self.eval_dataset)
        self.optimizer = build_optimizer(self.args, self.trainable_parameters)
        self.denoiser, self.optimizer = self.accelerator.prepare(self.family.denoiser, self.optimizer)
        self.lr_scheduler = None
        self._counts_pending = dict.fromkeys(DATA_COUNTS, 0)
        self._hub_repo_id: str | None = None
        self._push_executor: ThreadPoolExecutor | None = None
        self._push_future: Future | None = None

    # ----------------------------------------------------------------------------------------- setup
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

    def _wrap_dataset(self, source: Any, *, train: bool) -> torch.utils.data.Dataset:
        """Load, check the schema, drop ties and wrap a dataset into model-ready rows."""
        args = self.args
        split = args.dataset_train_split if train else args.dataset_test_split or "test"
        dataset = load_preference_dataset(
            source, split=split, config_name=args.dataset_config, streaming=args.dataset_streaming
        )
        dataset = decode_images_lazily(apply_column_mapping(dataset, args.column_mapping))
        schema = detect_schema(list(dataset.column_names or []))
        dataset = self._adapt_schema(dataset, schema)
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
        if isinstance(dataset, datasets.IterableDataset):
            if train and args.shuffle_buffer_size:
                dataset = dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
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
        if self.args.init_lora_weights and self.peft_config is not None:
            path = hub.adapter_file(self.args.init_lora_weights, token=self.args.hub_token)
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
        """LoRA on the family's CLIP text encoders (same rank and alpha as the denoiser's), by pipeline attribute."""
        config = adapters.lora_config_from_args(
            self.args.lora_rank, self.args.lora_alpha, self.args.lora_dropout,
            list(self.family.text_encoder_lora_targets),
        )  # fmt: skip
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
    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainerState:
        """Run the training loop; resumes exactly from a checkpoint folder or 'latest' when asked."""
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
        resume = checkpoints.resolve(args.output_dir, resume_from_checkpoint or args.resume_from_checkpoint)
        if resume is not None:
            self._load_checkpoint(resume)
        if self.accelerator.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            self.accelerator.init_trackers(self.method.replace("-", "_"), config=loggable_config(args.to_dict()))
        main = self.accelerator.is_local_main_process
        progress = tqdm(total=total, initial=self.state.global_step, desc="training", unit="step", disable=not main)
        self.encoder_offload.offload()  # idle while training reads the cache (`offload_cached_encoders`)
        try:
            for callback in self.callbacks:
                callback.on_train_begin(self)  # after the offload: a callback measuring memory sees the training's
            self._run_epochs(total, per_epoch, progress)
            final_eval = not (args.eval_steps and self.state.global_step % args.eval_steps == 0)
            if self.eval_dataset is not None and final_eval:  # reads the cache too, like the steps
                self._log(self.evaluate())
        finally:  # also when a step raises: the pipeline gets its encoders back, and no loader worker outlives the run
            progress.close()
            self.encoder_offload.restore()
            self._loaders.close()
        self._wait_for_push()
        self.save_model()
        if args.validation_prompts and self.accelerator.is_main_process:
            self._save_samples()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        for callback in self.callbacks:
            callback.on_train_end(self)
        if args.push_to_hub:
            self.push_to_hub()
        return self.state

    def _run_epochs(self, total: int, per_epoch: int | None, progress: tqdm) -> None:
        """Optimizer steps up to `total`, epoch after epoch, from where `state` stands (mid-epoch on resume)."""
        args = self.args
        micro = self.state.global_step * args.gradient_accumulation_steps
        epoch, skip = (micro // per_epoch, micro % per_epoch) if per_epoch else (int(self.state.epoch), 0)
        pending: dict[str, list[torch.Tensor]] = {}
        self.denoiser.train()
        while self.state.global_step < total:
            batches = 0
            for batch in self._loaders.batches(
                self.train_dataset, args.per_device_train_batch_size, epoch, shuffle=True, skip=skip
            ):
                batches += 1
                self._train_micro_step(batch, micro, pending)
                micro += 1
                if not self.accelerator.sync_gradients:
                    continue
                self.state.global_step += 1
                self.state.epoch = micro / per_epoch if per_epoch else float(epoch)
                progress.update(1)
                self._after_optimizer_step(pending, progress)
                if self.state.global_step >= total:
                    break
            if batches == 0:  # a stream with fewer rows than one batch would otherwise loop forever
                raise ValueError(
                    f"An epoch of the training data gave no full batch of {args.per_device_train_batch_size} rows "
                    "(too few rows, or none readable): check the dataset and its split."
                )
            epoch, skip = epoch + 1, 0

    def _train_micro_step(self, batch: dict[str, Any], micro: int, pending: dict[str, list[torch.Tensor]]) -> None:
        """Forward, loss and backward of one micro-batch; the optimizer steps when accumulation is done."""
        generator = torch.Generator().manual_seed(row_seed(self.args.seed, micro, self.accelerator.process_index))
        with self.accelerator.accumulate(self.denoiser):
            model_err, ref_err = self.denoising_errors(batch, generator)
            loss, metrics = self.compute_loss(model_err, ref_err, batch)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self._sync_text_encoder_gradients()
                norm = self._clip_gradients()
                pending.setdefault("grad_norm", []).append(norm)
            self.optimizer.step()
            if self.accelerator.sync_gradients:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._count_rows(batch)
        metrics = {"loss": loss.detach(), **metrics}
        for key, value in metrics.items():
            pending.setdefault(key, []).append(value.detach().float())

    def _count_rows(self, batch: dict[str, Any]) -> None:
        """Add a micro-batch's specially handled rows (see `DATA_COUNTS`) to the counts of the logging window."""
        prompts = batch["prompt"]
        self._counts_pending["skipped_rows"] += int(batch["bad_rows"])
        self._counts_pending["empty_prompts"] += sum(not prompt.strip() for prompt in prompts)
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is not None:
            ids = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
            self._counts_pending["truncated_prompts"] += sum(len(row) > tokenizer.model_max_length for row in ids)

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
            return torch.as_tensor(self.accelerator.clip_grad_norm_(self.trainable_parameters, self.args.max_grad_norm))
        grads = [p.grad.detach().float().norm() for p in self.trainable_parameters if p.grad is not None]
        return torch.stack(grads).norm() if grads else torch.zeros(())

    def _after_optimizer_step(self, pending: dict[str, list[torch.Tensor]], progress: tqdm) -> None:
        """Logging, evaluation and checkpoints on their schedules."""
        args, step = self.args, self.state.global_step
        if step % args.logging_steps == 0 or step == self.state.max_steps:
            logs = self._reduce(pending)
            counts = torch.tensor(
                [float(self._counts_pending[key]) for key in DATA_COUNTS], device=self.accelerator.device
            )
            for key, count in zip(DATA_COUNTS, self.accelerator.reduce(counts, reduction="sum").tolist(), strict=True):
                setattr(self.state, key, getattr(self.state, key) + int(count))
                logs[f"data/{key}"] = float(getattr(self.state, key))
            self._counts_pending = dict.fromkeys(DATA_COUNTS, 0)
            logs["learning_rate"] = self.lr_scheduler.get_last_lr()[0]
            pending.clear()
            self._log(logs)
            progress.set_postfix(loss=f"{logs['loss']:.4g}", acc=f"{logs.get('rewards/accuracies', float('nan')):.2f}")
        if self.eval_dataset is not None and args.eval_steps and step % args.eval_steps == 0:
            self._log(self.evaluate())
        if args.save_steps and step % args.save_steps == 0:
            self._save_checkpoint()
            if args.push_to_hub and args.hub_strategy == "every_save" and self.accelerator.is_main_process:
                self._push_in_background(f"Training in progress, step {step}")
        for callback in self.callbacks:
            callback.on_step_end(self)

    def _reduce(self, pending: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Average each metric over the window and across processes: the one host sync per log.

        A NaN marks a metric a micro-batch could not measure (KTO's `rewards/rejected` in a batch of
        desirable images only): it is left out of the average.
        """
        keys = sorted(pending)
        sums, counts = zip(*(_measured_sum(key, torch.stack(pending[key])) for key in keys), strict=True)
        totals = self.accelerator.reduce(torch.stack([*sums, *counts]).to(self.accelerator.device), reduction="sum")
        return dict(zip(keys, (totals[: len(keys)] / totals[len(keys) :]).tolist(), strict=True))

    def _log(self, logs: dict[str, float]) -> None:
        """Append to `state.log_history`, send to trackers and callbacks."""
        entry = {**logs, "step": self.state.global_step, "epoch": round(self.state.epoch, 4)}
        self.state.log_history.append(entry)
        self.accelerator.log(logs, step=self.state.global_step)
        for callback in self.callbacks:
            callback.on_log(self, entry)

    # --------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, eval_dataset: Any = None) -> dict[str, float]:
        """Loss and reward metrics on held-out rows with fixed noise, averaged over `eval_noise_draws`."""
        dataset = (
            self.eval_dataset if eval_dataset is None else self._cached(self._wrap_dataset(eval_dataset, train=False))
        )
        if dataset is None:
            raise ValueError("No eval dataset: pass one to the trainer or to evaluate().")
        self.denoiser.eval()
        totals: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}  # rows per metric, NaNs (unmeasurable in a batch) left out
        batches = self._loaders.batches(dataset, self.args.per_device_eval_batch_size, 0, shuffle=False)
        for index, batch in enumerate(self._eval_progress(batches)):
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
