"""Checkpoints of a run for an exact resume, written and read as safetensors and JSON only (nothing is unpickled).

A mixin of `DiffusionPreferenceTrainer`. A checkpoint folder holds the trained weights (the LoRA adapters, or the
whole denoiser when fully fine-tuned), the optimizer state, the LR schedule, the fp16 loss scale, each process's
random generators, and `trainer_state.json` (not accelerate's accumulation counter: a checkpoint follows an optimizer
step, where the fresh counter, 0, starts the next accumulation window alike). It is written into a temporary folder
and renamed into place once complete (`checkpoints.commit`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from diffusion_pref_trainers import adapters, checkpoints, train_state
from diffusion_pref_trainers.state import TrainerState

logger = logging.getLogger(__name__)

OPTIMIZER = "optimizer"  # optimizer.safetensors + optimizer.json
RANDOM_STATES = "random_states_{}"  # per process index, .safetensors + .json
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
MODEL_FILE = "model.safetensors"


class CheckpointingMixin:
    """`_save_checkpoint` and `_load_checkpoint`, called by the training loop."""

    def _save_checkpoint(self) -> None:
        """Write the training state into a temporary folder, then rename it into place (finite weights only)."""
        step, out = self.state.global_step, self.args.output_dir
        self._check_finite_weights(f"checkpoint-{step}")
        tmp = checkpoints.temporary_path(out, step)
        self._write_training_state(tmp)
        self.accelerator.wait_for_everyone()  # every process's random states are on disk before the rename
        if self.accelerator.is_main_process:
            self.state.save(tmp)
            checkpoints.commit(out, step)
            checkpoints.rotate(out, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()
        for callback in self.callbacks:
            callback.on_save(self, str(checkpoints.checkpoint_path(out, step)))

    def _write_training_state(self, folder: Path) -> None:
        """Each process's random states; weights, optimizer, schedule and loss scale from the main process only."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            checkpoints.clear_temporary(folder)
        accelerator.wait_for_everyone()
        folder.mkdir(parents=True, exist_ok=True)
        train_state.save(train_state.rng_state(), folder, RANDOM_STATES.format(accelerator.process_index))
        if not accelerator.is_main_process:
            return
        save = save_model if self.peft_config is None else adapters.save_adapter_state
        for name, module in self._checkpointed_modules().items():
            save(module, str(folder / name))
        train_state.save(self.optimizer.state_dict(), folder, OPTIMIZER)
        (folder / SCHEDULER_FILE).write_text(json.dumps(self.lr_scheduler.state_dict()))
        if accelerator.scaler is not None:
            (folder / SCALER_FILE).write_text(json.dumps(accelerator.scaler.state_dict()))

    def _load_checkpoint(self, folder: Path) -> None:
        """Restore everything `_save_checkpoint` wrote, on every process."""
        logger.info("Resuming from %s", folder)
        load = load_model if self.peft_config is None else adapters.load_adapter_state
        for name, module in self._checkpointed_modules().items():
            load(module, str(folder / name))
        self.optimizer.load_state_dict(train_state.load(folder, OPTIMIZER))
        self.lr_scheduler.load_state_dict(json.loads((folder / SCHEDULER_FILE).read_text()))
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(json.loads((folder / SCALER_FILE).read_text()))
        train_state.set_rng_state(train_state.load(folder, RANDOM_STATES.format(self.accelerator.process_index)))
        self.state = TrainerState.load(folder)
        self.state.max_steps = self._total_steps()

    def _check_finite_weights(self, what: str) -> None:
        """Refuse to write `what` when a trained weight holds NaN or infinity, naming the first such parameter.

        Every process checks (their weights are the same), so all raise together before anything is written.
        """
        named = [
            (f"{attr}.{name}", param)
            for attr, module in {self.family.denoiser_attr: self._unwrapped, **self.text_encoders}.items()
            for name, param in module.named_parameters()
            if param.requires_grad
        ]
        finite = torch.stack([param.detach().isfinite().all() for _, param in named]).tolist()  # one host read
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
