"""Two-process FSDP2 runs over gloo for tests (or, with `ddp`, the same two runs straight on DDP, for their losses).

accelerate 1.15 does not turn FSDP on for CPU processes (it only does for GPU-type distributed setups, and silently
trains DDP instead), so `fsdp2` forces accelerate's FSDP2 state onto the CPU accelerator the trainer builds: what
runs is accelerate's FSDP2 `prepare` (torch's `fully_shard`) and the trainer's sharded paths, over gloo.

`fsdp2` trains, per kind (LoRA DPO; full fine-tuning with MaPO, which needs no reference): 4 steps straight, then 2
steps with a checkpoint and a resume to 4; it saves each final model, checks that LoRA's adapters off on the sharded
denoiser give the base model's outputs, and that full fine-tuning DPO (which needs a frozen copy) is refused.
Only the launch's last training ends normally (the end of a run closes the process group).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from diffusion_pref_trainers import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionMaPOConfig,
    DiffusionMaPOTrainer,
    TrainerCallback,
    adapters,
)
from diffusion_pref_trainers.testing import make_preference_dataset, tiny_sd_pipeline
from diffusion_pref_trainers.trainers import base

torch.set_num_threads(1)
root, mode = Path(sys.argv[1]), sys.argv[2]
data = make_preference_dataset(8, size=40)
KINDS = {"lora": (DiffusionDPOTrainer, DiffusionDPOConfig), "full": (DiffusionMaPOTrainer, DiffusionMaPOConfig)}


def fsdp2_accelerator(**kwargs) -> Accelerator:
    """A CPU accelerator with accelerate's FSDP2 state, as a GPU launch of examples/accelerate_configs/fsdp2.yaml."""
    accelerator = Accelerator(**kwargs)
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP  # both states agree
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
    )  # fmt: skip
    if accelerator.mixed_precision != "no":  # as accelerate's state does for an FSDP launch
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    return accelerator


class Stop(Exception):
    """Stands for a job killed after a step (its checkpoint, if any, is written by then)."""


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:  # the step, and its checkpoint, are done
            raise Stop

    def on_log(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step == state.max_steps:  # no step begins after the last: stop once it is logged
            raise Stop


def trainer(kind: str, name: str, stop: int | None = None):
    trainer_class, config_class = KINDS[kind]
    config = config_class(
        output_dir=str(root / name), resolution=32, per_device_train_batch_size=2, max_steps=4, beta=50.0,
        learning_rate=1e-3, logging_steps=1, save_steps=2, random_flip=True, center_crop=False,
        use_lora=kind == "lora",
    )  # fmt: skip
    return trainer_class(tiny_sd_pipeline(), config, data, callbacks=[StopAt(stop)] if stop else [])


def run(kind: str, name: str, stop: int | None = None, resume: bool = False):
    """Train (to `stop`, raising there, or to the end) and return the trainer."""
    run_trainer = trainer(kind, name, stop)
    try:
        run_trainer.train(resume_from_checkpoint="latest" if resume else None)
    except Stop:
        pass
    return run_trainer


def losses(run_trainer) -> list[float]:
    return [entry["loss"] for entry in run_trainer.state.log_history if "loss" in entry]


def adapters_off_check(lora_trainer) -> dict[str, float]:
    """Max differences of the sharded denoiser with adapters off from the base UNet, and with them on (every rank
    runs the forward: FSDP2 gathers the shards)."""
    unet = tiny_sd_pipeline().unet.eval()
    generator = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, unet.config.cross_attention_dim)
    t = torch.tensor([10, 500])
    model = lora_trainer.denoiser.eval()
    with torch.no_grad():
        base_out = unet(x, t, cond).sample
        with adapters.adapters_disabled(model):
            off = model(x, t, cond).sample
        on = model(x, t, cond).sample
    return {"off_vs_base": (off - base_out).abs().max().item(), "on_vs_base": (on - base_out).abs().max().item()}


report: dict[str, object] = {}
if mode == "ddp":
    report["lora"] = losses(run("lora", "ddp-lora", stop=4))
    report["full"] = losses(run("full", "ddp-full"))
else:
    base.Accelerator = fsdp2_accelerator
    refused = ""
    try:
        DiffusionDPOTrainer(tiny_sd_pipeline(), DiffusionDPOConfig(output_dir=str(root / "r"), use_lora=False), data)
    except ValueError as error:
        refused = str(error)
    report["refused"] = refused
    for kind in ("lora", "full"):
        straight = run(kind, f"{kind}-straight", stop=4)
        report[f"{kind}_engine"] = str(straight.accelerator.distributed_type)
        report[f"{kind}_straight"] = losses(straight)
        straight.save_model(str(root / f"{kind}-straight" / "final"))
        run(kind, f"{kind}-resumed", stop=2)
        last = kind == "full"  # the launch's last training ends normally (saving into its output_dir)
        resumed = run(kind, f"{kind}-resumed", stop=None if last else 4, resume=True)
        report[f"{kind}_resumed"] = losses(resumed)
        if not last:
            resumed.save_model(str(root / f"{kind}-resumed" / "final"))
            report["adapters"] = adapters_off_check(resumed)
(root / f"{mode}{os.environ['RANK']}.json").write_text(json.dumps(report))
