"""The accelerate training loop every objective shares.

A subclass states which config it takes and implements `compute_loss` on per-image denoising errors;
the loop does the rest: data order, shared noise and timesteps per row, one batched policy forward and
one reference forward (adapters off), mixed precision, accumulation, clipping, logging, checkpoints,
exact resume, evaluation, saving and pushing. It never asks which model family it trains.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig
from tqdm.auto import tqdm

from diffusion_pref_trainers import adapters, checkpoints, hub
from diffusion_pref_trainers.configs import DiffusionTrainingConfig
from diffusion_pref_trainers.data import (
    PAIRED_SCHEMAS,
    ImageTransform,
    PreferenceDataset,
    RowProcessor,
    StreamingPreferenceDataset,
    apply_column_mapping,
    collate,
    detect_schema,
    drop_ties,
    row_seed,
)
from diffusion_pref_trainers.families import get_family
from diffusion_pref_trainers.optim import build_optimizer, build_scheduler
from diffusion_pref_trainers.sources import load_pipeline, load_preference_dataset
from diffusion_pref_trainers.state import TrainerCallback, TrainerState

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DiffusionPreferenceTrainer:
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
            hub.ensure_hub_reachable()
        self.callbacks = list(callbacks or [])
        self.state = TrainerState()
        self.accelerator = Accelerator(
            mixed_precision=self.args.mixed_precision,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            log_with=self.args.report_to or None,
            project_dir=self.args.output_dir,
        )
        set_seed(self.args.seed)
        self.weight_dtype = WEIGHT_DTYPES[self.args.mixed_precision]

        self.pipe = load_pipeline(model)
        self.family = get_family(self.pipe)
        self._check_resolution()
        self._dataset_name = train_dataset if isinstance(train_dataset, str) else None
        self.train_dataset = self._wrap_dataset(train_dataset, train=True) if train_dataset is not None else None
        self.eval_dataset = self._wrap_dataset(eval_dataset, train=False) if eval_dataset is not None else None
        self._validate()

        self._setup_model(peft_config)
        self.optimizer = build_optimizer(self.args, self.trainable_parameters)
        self.denoiser, self.optimizer = self.accelerator.prepare(self.family.denoiser, self.optimizer)
        self._register_checkpoint_hooks()
        self.lr_scheduler = None
        self._skipped_pending = 0

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
        split = getattr(args, "dataset_train_split" if train else "dataset_test_split", "train" if train else "test")
        dataset = load_preference_dataset(
            source,
            split=split,
            config_name=getattr(args, "dataset_config", None),
            streaming=getattr(args, "dataset_streaming", False),
        )
        dataset = apply_column_mapping(dataset, getattr(args, "column_mapping", None))
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
            proportion_empty_prompts=getattr(args, "proportion_empty_prompts", 0.0) if train else 0.0,
            swap=getattr(args, "swap_preferences", False),
        )
        if isinstance(dataset, datasets.IterableDataset):
            return StreamingPreferenceDataset(dataset, processor, args.seed, args.skip_bad_images)
        return PreferenceDataset(dataset, processor, args.seed, args.skip_bad_images)

    def _adapt_schema(self, dataset: Any, schema: str) -> Any:
        """Check the schema suits the objective (pairs by default); subclasses may convert instead."""
        if schema not in PAIRED_SCHEMAS:
            raise ValueError(
                f"{type(self).__name__} trains on preference pairs, but the dataset has the {schema!r} schema "
                "(prompt, image, label). Use DiffusionKTOTrainer for unpaired feedback, or provide "
                "prompt/chosen/rejected or Pick-a-Pic columns."
            )
        return dataset

    def _setup_model(self, peft_config: LoraConfig | None) -> None:
        """Freeze the encoders, add adapters (or unfreeze for full fine-tuning) and move to the device."""
        device = self.accelerator.device
        for module in self.family.frozen_modules():
            module.requires_grad_(False).to(device, dtype=self.weight_dtype).eval()
        if self.args.use_lora and peft_config is None:
            targets = self.args.lora_target_modules or list(self.family.default_lora_targets)
            peft_config = adapters.lora_config_from_args(
                self.args.lora_rank, self.args.lora_alpha, self.args.lora_dropout, targets
            )
        self.peft_config = peft_config if self.args.use_lora or peft_config is not None else None
        denoiser = self.family.denoiser
        self.reference = adapters.prepare_denoiser(
            denoiser, self.peft_config, self.weight_dtype, self.args.gradient_checkpointing
        )
        denoiser.to(device)
        if self.reference is not None:
            self.reference.to(device)
        self.trainable_parameters = [p for p in denoiser.parameters() if p.requires_grad]
        if not self.trainable_parameters:
            raise ValueError(
                "No trainable parameters: check `lora_target_modules` against the denoiser's module names."
            )

    def _register_checkpoint_hooks(self) -> None:
        """With LoRA, checkpoints hold only the adapter weights (megabytes, not the whole denoiser)."""
        if self.peft_config is None:
            return

        def save_hook(models: list, weights: list, output_dir: str) -> None:
            if self.accelerator.is_main_process:
                adapters.save_adapter_state(self._unwrapped, str(Path(output_dir, adapters.ADAPTER_FILE)))
            weights.clear()

        def load_hook(models: list, input_dir: str) -> None:
            adapters.load_adapter_state(self._unwrapped, str(Path(input_dir, adapters.ADAPTER_FILE)))
            models.clear()

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

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
        cond = batch["cond"] if "cond" in batch else self.family.encode_prompts(batch["prompt"])
        cond = {key: value.to(device).repeat(per_row, *([1] * (value.dim() - 1))) for key, value in cond.items()}
        image_info = {
            key: batch[key].to(device).transpose(0, 1).flatten(0, 1) for key in ("original_sizes", "crop_top_lefts")
        }
        noise = torch.randn((rows, *latents.shape[1:]), generator=generator).to(device).repeat(per_row, 1, 1, 1)
        timesteps = self.sample_timesteps(rows, generator).to(device).repeat(per_row)
        noisy, target = self.family.noisy_and_target(latents, noise, timesteps)

        with torch.set_grad_enabled(with_grad), self.accelerator.autocast():
            pred = self.family.predict(self.denoiser, noisy, timesteps, cond, image_info)
        model_err = _per_sample_mse(pred, target)
        ref_err = None
        if self.needs_reference:
            with torch.no_grad(), self.accelerator.autocast(), self._reference() as reference:
                ref_err = _per_sample_mse(self.family.predict(reference, noisy, timesteps, cond, image_info), target)
        return model_err, ref_err

    def _reference(self) -> Any:
        """Context giving the reference denoiser: adapters off, or the frozen copy."""
        if self.reference is not None:
            return contextlib.nullcontext(self.reference)
        return adapters.adapters_disabled(self._unwrapped)

    # --------------------------------------------------------------------------------------- data
    def _batches(self, dataset: torch.utils.data.Dataset, batch_size: int, epoch: int, *, shuffle: bool,
                 skip: int = 0) -> Iterator[dict[str, Any]]:  # fmt: skip
        """This process's batches of one epoch, in an order fixed by (seed, epoch); `skip` resumes mid-epoch."""
        dataset.epoch = epoch
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        loader_kwargs = dict(
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
        )
        if isinstance(dataset, StreamingPreferenceDataset):
            dataset.dataset = datasets.distributed.split_dataset_by_node(dataset.dataset, rank=rank, world_size=world)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=shuffle, **loader_kwargs)
            iterator = iter(loader)
            for _ in range(skip):
                next(iterator, None)
            yield from iterator
            return
        order = torch.arange(len(dataset))
        if shuffle:
            order = torch.randperm(
                len(dataset), generator=torch.Generator().manual_seed(row_seed(self.args.seed, epoch, -1))
            )
        order = order[: len(order) // world * world][rank::world].tolist()
        if shuffle:
            batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        else:
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if batches[skip:]:
            yield from torch.utils.data.DataLoader(dataset, batch_sampler=batches[skip:], **loader_kwargs)

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
        per_epoch = self._batches_per_epoch()
        if per_epoch == 0:
            raise ValueError(
                f"The training set ({len(self.train_dataset)} rows) is smaller than one batch across "
                f"{self.accelerator.num_processes} process(es) of {args.per_device_train_batch_size} rows."
            )
        total = self._total_steps()
        self.state.max_steps = total
        if self.lr_scheduler is None:
            self.lr_scheduler = build_scheduler(args, self.optimizer, total)
            self.accelerator.register_for_checkpointing(self.lr_scheduler)
        resume = checkpoints.resolve(args.output_dir, resume_from_checkpoint or args.resume_from_checkpoint)
        if resume is not None:
            self._load_checkpoint(resume)
        if self.accelerator.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            self.accelerator.init_trackers(self.method.replace("-", "_"), config=_loggable(args.to_dict()))
        for callback in self.callbacks:
            callback.on_train_begin(self)

        accum = args.gradient_accumulation_steps
        micro = self.state.global_step * accum
        epoch, skip = (micro // per_epoch, micro % per_epoch) if per_epoch else (int(self.state.epoch), 0)
        pending: dict[str, list[torch.Tensor]] = {}
        progress = tqdm(total=total, initial=self.state.global_step, disable=not self.accelerator.is_local_main_process)
        self.denoiser.train()
        while self.state.global_step < total:
            for batch in self._batches(
                self.train_dataset, args.per_device_train_batch_size, epoch, shuffle=True, skip=skip
            ):
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
            epoch, skip = epoch + 1, 0
        progress.close()
        if self.eval_dataset is not None and not (args.eval_steps and self.state.global_step % args.eval_steps == 0):
            self._log(self.evaluate())
        self.save_model()
        self.accelerator.end_training()
        for callback in self.callbacks:
            callback.on_train_end(self)
        if args.push_to_hub:
            self.push_to_hub()
        return self.state

    def _train_micro_step(self, batch: dict[str, Any], micro: int, pending: dict[str, list[torch.Tensor]]) -> None:
        """Forward, loss and backward of one micro-batch; the optimizer steps when accumulation is done."""
        generator = torch.Generator().manual_seed(row_seed(self.args.seed, micro, self.accelerator.process_index))
        with self.accelerator.accumulate(self.denoiser):
            model_err, ref_err = self.denoising_errors(batch, generator)
            loss, metrics = self.compute_loss(model_err, ref_err, batch)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                norm = self._clip_gradients()
                pending.setdefault("grad_norm", []).append(norm)
            self.optimizer.step()
            if self.accelerator.sync_gradients:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._skipped_pending += int(batch["bad_rows"])
        metrics = {"loss": loss.detach(), **metrics}
        for key, value in metrics.items():
            pending.setdefault(key, []).append(value.detach().float())

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
            skipped = torch.tensor(float(self._skipped_pending), device=self.accelerator.device)
            self.state.skipped_rows += int(self.accelerator.reduce(skipped, reduction="sum").item())
            self._skipped_pending = 0
            logs["data/skipped_rows"] = float(self.state.skipped_rows)
            logs["learning_rate"] = self.lr_scheduler.get_last_lr()[0]
            pending.clear()
            self._log(logs)
            progress.set_postfix(loss=f"{logs['loss']:.4g}", acc=f"{logs.get('rewards/accuracies', float('nan')):.2f}")
        if self.eval_dataset is not None and args.eval_steps and step % args.eval_steps == 0:
            self._log(self.evaluate())
        if args.save_steps and step % args.save_steps == 0:
            self._save_checkpoint()
        for callback in self.callbacks:
            callback.on_step_end(self)

    def _reduce(self, pending: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Average each metric over the window and across processes: the one host sync per log."""
        keys = sorted(pending)
        local = torch.stack([torch.stack(pending[key]).mean().to(self.accelerator.device) for key in keys])
        averaged = self.accelerator.reduce(local, reduction="mean")
        return dict(zip(keys, averaged.tolist(), strict=True))

    def _log(self, logs: dict[str, float]) -> None:
        """Append to `state.log_history`, send to trackers and callbacks."""
        entry = {**logs, "step": self.state.global_step, "epoch": round(self.state.epoch, 4)}
        self.state.log_history.append(entry)
        self.accelerator.log(logs, step=self.state.global_step)
        for callback in self.callbacks:
            callback.on_log(self, entry)

    # --------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self) -> Path:
        """Write optimizer, scheduler, adapter and trainer state into a temp folder, then rename it."""
        step, out = self.state.global_step, self.args.output_dir
        tmp = checkpoints.temporary_path(out, step)
        self.accelerator.save_state(str(tmp))
        final = checkpoints.checkpoint_path(out, step)
        if self.accelerator.is_main_process:
            self.state.save(tmp)
            final = checkpoints.commit(out, step)
            checkpoints.rotate(out, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()
        for callback in self.callbacks:
            callback.on_save(self, str(final))
        return final

    def _load_checkpoint(self, folder: Path) -> None:
        """Restore weights, optimizer, scheduler and the trainer state written by `_save_checkpoint`."""
        logger.info("Resuming from %s", folder)
        self.accelerator.load_state(str(folder))
        self.state = TrainerState.load(folder)
        self.state.max_steps = self._total_steps()

    # --------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, eval_dataset: Any = None) -> dict[str, float]:
        """Loss and reward metrics on held-out rows with fixed noise, averaged over `eval_noise_draws`."""
        dataset = self._wrap_dataset(eval_dataset, train=False) if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("No eval dataset: pass one to the trainer or to evaluate().")
        self.denoiser.eval()
        totals: dict[str, torch.Tensor] = {}
        rows = torch.zeros((), device=self.accelerator.device)
        for index, batch in enumerate(self._batches(dataset, self.args.per_device_eval_batch_size, 0, shuffle=False)):
            draws = []
            for draw in range(self.args.eval_noise_draws):
                seed = row_seed(self.args.seed, 10_000_019 * (draw + 1) + index, self.accelerator.process_index)
                draws.append(self.denoising_errors(batch, torch.Generator().manual_seed(seed), with_grad=False))
            model_err = torch.stack([m for m, _ in draws]).mean(0)
            ref_err = torch.stack([r for _, r in draws]).mean(0) if self.needs_reference else None
            loss, metrics = self.compute_loss(model_err, ref_err, batch)
            size = len(batch["prompt"])
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() * size
            rows += size
        self.denoiser.train()
        keys = sorted(totals)
        summed = self.accelerator.reduce(torch.stack([totals[k] for k in keys] + [rows]), reduction="sum")
        return {f"eval_{key}": value for key, value in zip(keys, (summed[:-1] / summed[-1]).tolist(), strict=True)}

    # ---------------------------------------------------------------------------------- save/push
    def save_model(self, output_dir: str | None = None) -> str:
        """Write the trained weights in diffusers format plus a model card; returns the folder.

        LoRA: `pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(folder)`.
        Full fine-tuning: the denoiser in a sub-folder named like the pipeline's (e.g. `unet/`).
        """
        folder = Path(output_dir or self.args.output_dir)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            if self.peft_config is not None:
                self.family.save_lora_weights(str(folder), adapters.lora_layers_for_diffusers(self._unwrapped))
            else:
                self._unwrapped.save_pretrained(str(folder / self.family.denoiser_attr))
            (folder / "training_config.json").write_text(json.dumps(_loggable(self.args.to_dict()), indent=2))
            self.model_card(folder.name).save(str(folder / "README.md"))
        self.accelerator.wait_for_everyone()
        return str(folder)

    def model_card(self, repo_id: str) -> Any:
        """The model card of this run (base model, method, hyperparameters, dataset, final metrics)."""
        last: dict[str, float] = {}
        for entry in self.state.log_history:
            last.update({k: v for k, v in entry.items() if isinstance(v, float) and k not in ("epoch",)})
        return hub.build_model_card(
            base_model=str(self.pipe.config.get("_name_or_path") or "unknown"),
            method=self.method,
            repo_id=repo_id,
            dataset=self._dataset_name,
            config=self.args.to_dict(),
            metrics=last,
            steps=self.state.global_step,
        )

    def push_to_hub(self, commit_message: str = "Upload aligned LoRA adapter", **_: Any) -> str | None:
        """Save, then upload `output_dir` (adapter, card; never checkpoints or tokens) to `hub_model_id`."""
        hub.ensure_hub_reachable()
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).name
        folder = self.save_model()
        if not self.accelerator.is_main_process:
            return None
        self.model_card(repo_id).save(str(Path(folder, "README.md")))
        return hub.push_folder(
            folder,
            repo_id,
            private=self.args.hub_private_repo,
            token=self.args.hub_token,
            commit_message=commit_message,
        )


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every latent element of each sample, in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def _loggable(config: dict[str, Any]) -> dict[str, Any]:
    """Config values trackers accept (lists and None become strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
