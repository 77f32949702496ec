"""Checkpoints of a run for an exact resume, written and read as safetensors and JSON only (nothing is unpickled).

A mixin of `DiffusionPreferenceTrainer`. A checkpoint folder holds the trained weights (the LoRA adapters, or the
whole denoiser when fully fine-tuned), the optimizer state, the LR schedule, the fp16 loss scale, each process's
random generators, and `trainer_state.json` (not accelerate's accumulation counter: a checkpoint follows an optimizer
step, where the fresh counter, 0, starts the next accumulation window alike). A LoRA checkpoint also holds the adapters
in diffusers' format, the file `save_model` writes, so that `pipe.load_lora_weights(checkpoint_dir)` loads it (a resume
reads its own file). It is written into a temporary folder and renamed into place once complete (`checkpoints.commit`).

The mixin also owns the output folder: a lock keeps other runs out (`folder_lock`), every checkpoint and the final
output carry the run's `run.json` (`checkpoints.run_identity`), a fresh run refuses a folder holding another run's
output unless `overwrite_output_dir`, and a resume refuses a checkpoint of another run before loading anything.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from diffusion_pref_trainers import adapters, cache, checkpoints, distributed, hub, train_state
from diffusion_pref_trainers.folder_lock import OutputDirLock
from diffusion_pref_trainers.state import STATE_FILE, TrainerState

T = TypeVar("T")

logger = logging.getLogger(__name__)

OPTIMIZER = "optimizer"  # optimizer.safetensors + optimizer.json
RANDOM_STATES = "random_states_{}"  # per process index, .safetensors + .json
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
MODEL_FILE = "model.safetensors"


class CheckpointingMixin:
    """`_save_checkpoint` and `_load_checkpoint`, called by the training loop, and the output folder's guards."""

    # ------------------------------------------------------------------------------------ run identity
    def _identify_run(self) -> None:
        """Fix this run's identity and fingerprint (after the adapters are added, before any data is cached)."""
        denoiser = self.family.denoiser
        base_params = sum(p.numel() for name, p in denoiser.named_parameters() if "lora_" not in name)
        base_model = f"{self.pipe.config.get('_name_or_path') or 'unnamed'} ({type(denoiser).__name__}, {base_params})"
        self._identity = checkpoints.run_identity(
            self.args.to_dict(), method=self.method, base_model=base_model, dataset=self._data_identity(),
            adapter=self._adapter_identity(),
        )  # fmt: skip
        self._fingerprint = checkpoints.fingerprint(self._identity)
        self._resumes: list[dict[str, Any]] = []

    def _data_identity(self) -> str:
        """datasets' fingerprint of the training rows (as the cache reads it); a stream is known by its source."""
        rows = getattr(self.train_dataset, "dataset", None)
        if rows is None or isinstance(rows, torch.utils.data.IterableDataset) or not hasattr(rows, "__len__"):
            return f"stream {self._dataset_name or 'of unknown source'}"
        try:
            return cache.dataset_fingerprint(rows)
        except TypeError:  # rows not held by datasets: known by their type and count only
            return f"{type(rows).__name__} of {len(rows)} rows"

    def _adapter_identity(self) -> str:
        """The trained weights: the LoRA rank, alpha and targets (text encoders too), or the full denoiser."""
        if self.peft_config is None:
            return "full fine-tuning"
        targets = self.peft_config.target_modules
        targets = [targets] if isinstance(targets, str) else sorted(targets or [])
        encoders = f", text encoders {sorted(self.text_encoders)}" if self.text_encoders else ""
        return f"LoRA r={self.peft_config.r} alpha={self.peft_config.lora_alpha} targets={targets}{encoders}"

    def _run_record(self) -> dict[str, Any]:
        """What `run.json` holds: identity, fingerprint, the optimizer settings now in force, earlier resumes."""
        settings = {key: getattr(self.args, key) for key in checkpoints.APPLIED_ON_RESUME}
        return {
            "fingerprint": self._fingerprint, "identity": self._identity, "settings": settings,
            "resumes": self._resumes,
        }  # fmt: skip

    # ----------------------------------------------------------------------------------- output folder
    def _lock_output_dir(self) -> None:
        """The main process takes `output_dir/.lock`; every process raises if it could not."""
        self._lock, failure = OutputDirLock(self.args.output_dir), None
        if self.accelerator.is_main_process:
            try:
                self._lock.acquire()
            except FileExistsError as error:
                failure = error
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(failure is not None)], device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() and failure is None:
                failure = FileExistsError(f"The main process could not lock {self.args.output_dir}: see its error.")
        if failure is not None:
            raise failure

    def _prepare_output_dir(self, requested: str | bool | None, total: int) -> Path | None:
        """The checkpoint to resume, checked to be this run's and unfinished; for a fresh run, a clean folder."""
        resume = checkpoints.resolve(self.args.output_dir, requested, self._fingerprint)
        if resume is None:
            self._claim_output_dir()
            return None
        self._resumes = list(checkpoints.check_belongs(resume, self._identity).get("resumes", []))
        step = _read(resume, STATE_FILE, lambda: TrainerState.load(resume)).global_step
        if step >= total:
            raise ValueError(
                f"{resume} is already complete at step {step} (this run trains {total} steps): raise max_steps "
                "(or num_train_epochs) to train on, or start a new output_dir."
            )
        return resume

    def _claim_output_dir(self) -> None:
        """Refuse a fresh run into a folder holding another run's output, or delete it with `overwrite_output_dir`."""
        out = Path(self.args.output_dir)
        found = _previous_output(out)
        if not found:
            return
        names = ", ".join(path.name for path in found[:4]) + (", ..." if len(found) > 4 else "")
        if not self.args.overwrite_output_dir:
            raise ValueError(
                f"output_dir {out} already holds another run's output ({names}); a fresh run would mix its "
                "checkpoints and weights with them. Resume with resume_from_checkpoint='latest' if it is this "
                "run, choose another output_dir, or set overwrite_output_dir=True to delete its checkpoints."
            )
        # The earlier run's model too: a LoRA file left beside this run's full fine-tune would load as its result.
        model_files = (hub.LORA_FILE, self.family.denoiser_attr, Path(hub.SAMPLES_FILE).parts[0], "README.md")
        found += [out / name for name in model_files if (out / name).exists()]
        self.accelerator.wait_for_everyone()  # every process has looked before the main one deletes
        if self.accelerator.is_main_process:
            logger.warning("overwrite_output_dir: deleting the previous run's %s in %s", names, out)
            for path in found:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self) -> None:
        """Write the training state into a temporary folder, then rename it into place (finite weights only)."""
        step, out = self.state.global_step, self.args.output_dir
        self._check_finite_weights(f"checkpoint-{step}")
        tmp = checkpoints.temporary_path(out, step)
        self._write_training_state(tmp)
        self.accelerator.wait_for_everyone()  # every process's random states are on disk before the rename
        best = self.state.best_global_step
        if best is not None and (best == step or checkpoints.checkpoint_path(out, best).is_dir()):
            self.state.best_model_checkpoint = str(checkpoints.checkpoint_path(out, best))
        self._export_callback_states()
        if self.accelerator.is_main_process:
            self.state.save(tmp)
            checkpoints.write_run(tmp, self._run_record())
            checkpoints.commit(out, step)
            checkpoints.rotate(out, self.args.save_total_limit, self._fingerprint, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
        self._event("on_save")

    def _write_training_state(self, folder: Path) -> None:
        """Each process's random states; weights, optimizer, schedule and loss scale from the main process only (their
        full tensors, gathered by every process first when the model is sharded)."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            checkpoints.clear_temporary(folder)
        accelerator.wait_for_everyone()
        folder.mkdir(parents=True, exist_ok=True)
        train_state.save(train_state.rng_state(), folder, RANDOM_STATES.format(accelerator.process_index))
        modules = {name: distributed.gathered(accelerator, mod) for name, mod in self._checkpointed_modules().items()}
        optimizer = distributed.optimizer_state(accelerator, self.denoiser, self.optimizer)
        if not accelerator.is_main_process:
            return
        save = save_model if self.peft_config is None else adapters.save_adapter_state
        for name, module in modules.items():
            save(module, str(folder / name))
        if self.peft_config is not None:  # also as `save_model` writes it: `pipe.load_lora_weights(checkpoint)`
            denoiser = modules[adapters.ADAPTER_FILE]
            self.family.save_lora_weights(str(folder), {self.family.denoiser_attr: denoiser, **self.text_encoders})
        train_state.save(optimizer, folder, OPTIMIZER)
        (folder / SCHEDULER_FILE).write_text(json.dumps(self.lr_scheduler.state_dict()))
        if accelerator.scaler is not None:
            (folder / SCALER_FILE).write_text(json.dumps(accelerator.scaler.state_dict()))

    def _load_checkpoint(self, folder: Path) -> None:
        """Restore everything `_save_checkpoint` wrote, on every process; then apply this run's optimizer settings.

        Every file is read before anything is restored: a damaged one stops the resume in our words.
        """
        logger.info("Resuming from %s", folder)
        rng_name = RANDOM_STATES.format(self.accelerator.process_index)
        optimizer = _read(folder, f"{OPTIMIZER}.safetensors/.json", lambda: train_state.load(folder, OPTIMIZER))
        schedule = _read(folder, SCHEDULER_FILE, lambda: json.loads((folder / SCHEDULER_FILE).read_text()))
        rng = _read(folder, f"{rng_name}.safetensors/.json", lambda: train_state.load(folder, rng_name))
        state = _read(folder, STATE_FILE, lambda: TrainerState.load(folder))
        record = _read(folder, checkpoints.RUN_FILE, lambda: checkpoints.read_run(folder))
        load = _load_weights if self.peft_config is None else adapters.load_adapter_state
        for name, module in self._checkpointed_modules().items():
            target = distributed.gathered(self.accelerator, module, gather=False)
            _read(folder, name, lambda target=target, name=name: load(target, str(folder / name)))
        _read(
            folder, f"{OPTIMIZER}.safetensors/.json",
            lambda: distributed.load_optimizer_state(self.accelerator, self.denoiser, self.optimizer, optimizer),
        )  # fmt: skip
        self.lr_scheduler.load_state_dict(schedule)
        if self.accelerator.scaler is not None:
            scaler = _read(folder, SCALER_FILE, lambda: json.loads((folder / SCALER_FILE).read_text()))
            self.accelerator.scaler.load_state_dict(scaler)
        train_state.set_rng_state(rng)
        self.state = state
        self._restore_callback_states()
        self.state.max_steps = self._total_steps()
        self._apply_settings(folder, record["settings"] if record else {})

    def _apply_settings(self, folder: Path, saved: dict[str, Any]) -> None:
        """Make this run's learning rate, weight decay, betas and epsilon rule the restored optimizer and schedule
        (which carry the checkpoint's), and record the change in `run.json`'s `resumes`."""
        args = self.args
        if self._custom_optimizer:  # `optimizers=(...)`: the caller's optimizer and schedule hold their own settings
            return
        changed = checkpoints.differences(saved, self._run_record()["settings"])
        for group in self.optimizer.param_groups:
            group["initial_lr"] = args.learning_rate
            if "weight_decay" in group:
                group["weight_decay"] = args.weight_decay
            if "betas" in group:  # the Adam family; Adafactor's eps is a pair of another meaning
                group["betas"], group["eps"] = (args.adam_beta1, args.adam_beta2), args.adam_epsilon
        scheduler = self.lr_scheduler
        scheduler.base_lrs = [args.learning_rate] * len(self.optimizer.param_groups)
        factors = [factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]  # this run's schedule
        for group, base, factor in zip(self.optimizer.param_groups, scheduler.base_lrs, factors, strict=True):
            group["lr"] = base * factor
        if changed:
            logger.warning("Resuming %s with these settings changed, from step %d on: %s", folder,
                           self.state.global_step, "; ".join(changed))  # fmt: skip
            self._resumes.append({"step": self.state.global_step, "checkpoint": folder.name, "changed": changed})

    def _check_finite_weights(self, what: str) -> None:
        """Refuse to write `what` when a trained weight holds NaN or infinity, naming the first such parameter.

        Every process checks (their weights are the same, or under FSDP2 its shards, the flags then reduced), so all
        raise together before anything is written.
        """
        named = [
            (f"{attr}.{name}", param)
            for attr, module in {self.family.denoiser_attr: self._unwrapped, **self.text_encoders}.items()
            for name, param in module.named_parameters()
            if param.requires_grad
        ]
        finite = distributed.all_finite(self.accelerator, [param for _, param in named])  # one host read
        if not all(finite):
            name = named[finite.index(False)][0]
            raise RuntimeError(
                f"Not writing {what}: the trained parameter {name} holds non-finite values (NaN or inf), so the "
                "model diverged; nothing was written and earlier checkpoints are kept. Lower `learning_rate` or "
                "`beta`, check the data for broken rows, or train with mixed_precision='bf16' or 'no'."
            )

    def _checkpointed_modules(self) -> dict[str, nn.Module]:
        """The trained modules by file name: with LoRA only the adapters (megabytes), else the whole denoiser."""
        if self.peft_config is None:
            return {MODEL_FILE: self._unwrapped}
        encoders = {f"{name}_{adapters.ADAPTER_FILE}": encoder for name, encoder in self.text_encoders.items()}
        return {adapters.ADAPTER_FILE: self._unwrapped, **encoders}


def _load_weights(module: nn.Module, path: str) -> None:
    """A fully fine-tuned denoiser's weights from its checkpoint file; under FSDP2 (a `GatheredView`) every process
    reads the whole file and keeps its shards."""
    if isinstance(module, distributed.GatheredView):
        module.load_state_dict(load_file(path))
    else:
        load_model(module, path)


def _read(folder: Path, name: str, reader: Callable[[], T]) -> T:
    """`reader()`, its failure on a truncated or corrupt file re-raised as a damaged checkpoint naming the file."""
    try:
        return reader()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        raise ValueError(
            f"The checkpoint {folder} is damaged: {name} cannot be read ({type(error).__name__}: {error}). "
            "Resume from an earlier checkpoint, or start fresh."
        ) from error


def _previous_output(folder: Path) -> list[Path]:
    """What an earlier run left in `folder`: checkpoints (finished or not) and a final output's record."""
    if not folder.is_dir():
        return []
    markers = (checkpoints.RUN_FILE, "training_config.json")
    return sorted(
        path for path in folder.iterdir()
        if path.name.startswith((checkpoints.PREFIX, checkpoints.TMP_PREFIX)) or path.name in markers
    )  # fmt: skip
