"""Sharded engines: FSDP2 over gloo on two CPU processes (accelerate's FSDP2 state forced onto CPU processes, see
tests/scripts/fsdp2_cpu.py) trains as DDP does, checkpoints and resumes exactly, saves one diffusers-format model;
launches asking for an engine accelerate did not start, and DeepSpeed's `auto` micro-batch, are handled."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from diffusion_pref_trainers import DiffusionDPOTrainer, distributed

CHECKPOINT_FILES = {"optimizer.json", "optimizer.safetensors", "run.json", "scheduler.json", "trainer_state.json"}
CHECKPOINT_FILES |= {f"random_states_{rank}.{ext}" for rank in (0, 1) for ext in ("json", "safetensors")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, launch_two_processes) -> tuple[Path, dict, dict]:
    """The FSDP2 launch and the DDP one, and rank 0's reports."""
    root = tmp_path_factory.mktemp("sharded")
    for mode in ("fsdp2", "ddp"):
        launch_two_processes("fsdp2_cpu.py", str(root), mode)
    fsdp2, ddp = (json.loads((root / f"{mode}0.json").read_text()) for mode in ("fsdp2", "ddp"))
    assert json.loads((root / "fsdp21.json").read_text()) == fsdp2  # both processes report the same
    return root, fsdp2, ddp


def test_fsdp2_losses_equal_ddp_on_the_same_global_batch(runs) -> None:
    _, fsdp2, ddp = runs
    assert fsdp2["lora_engine"] == fsdp2["full_engine"] == "DistributedType.FSDP"
    for kind in ("lora", "full"):  # 4 steps each
        assert len(fsdp2[f"{kind}_straight"]) == 4
        assert fsdp2[f"{kind}_straight"] == pytest.approx(ddp[kind], rel=1e-4)  # reduce-scatter vs all-reduce order
    assert ddp["full"][-1] < ddp["full"][0] / 2


@pytest.mark.parametrize(
    ("kind", "weights"),
    [("lora", "pytorch_lora_weights.safetensors"), ("full", "unet/diffusion_pytorch_model.safetensors")],
)
def test_fsdp2_resumes_exactly_and_saves_one_full_model(runs, kind: str, weights: str) -> None:
    root, fsdp2, _ = runs
    assert fsdp2[f"{kind}_resumed"] == fsdp2[f"{kind}_straight"]
    resumed_dir = root / f"{kind}-resumed" / ("final" if kind == "lora" else "")
    straight_dir = root / f"{kind}-straight" / "final"
    straight, resumed = (load_file(str(folder / weights)) for folder in (straight_dir, resumed_dir))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    checkpoint = root / f"{kind}-resumed" / "checkpoint-2"
    model_file = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    expected = CHECKPOINT_FILES | {model_file} | ({"pytorch_lora_weights.safetensors"} if kind == "lora" else set())
    assert {path.name for path in checkpoint.iterdir()} == expected  # full tensors, no per-rank shards
    if kind == "full":  # a diffusers UNet that loads as one; neither its config nor the card names FSDP's class
        unet = UNet2DConditionModel.from_pretrained(str(resumed_dir / "unet"))
        assert sum(p.numel() for p in unet.parameters()) == sum(v.numel() for v in resumed.values())
        card = (resumed_dir / "README.md").read_text()
        assert "UNet2DConditionModel" in card and "FSDP" not in card


def test_lora_adapters_off_on_a_sharded_denoiser_give_the_base_model(runs) -> None:
    _, fsdp2, _ = runs
    assert fsdp2["adapters"]["off_vs_base"] == 0.0
    assert fsdp2["adapters"]["on_vs_base"] > 1e-4  # the adapters trained, so the check could fail


def test_full_fine_tuning_with_a_reference_is_refused_under_fsdp2_naming_the_alternatives(runs) -> None:
    _, fsdp2, _ = runs
    assert "Full fine-tuning with a reference model under FSDP2" in fsdp2["refused"]
    assert "use_lora=True" in fsdp2["refused"] and "DiffusionMaPOTrainer" in fsdp2["refused"]


def test_a_launch_asking_for_fsdp_that_accelerate_did_not_start_stops(
    tiny_pipe_dir: str, pairs, make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets; on CPUs accelerate ignores it
    with pytest.raises(RuntimeError, match="set this process up as DistributedType.NO.*Launch on GPUs"):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(), pairs)


@pytest.mark.parametrize(("configured", "expected"), [("auto", 3), (5, 5)])
def test_deepspeed_auto_micro_batch_is_the_trainers_batch_size(configured, expected) -> None:
    config = {"train_micro_batch_size_per_gpu": configured, "zero_optimization": {"stage": 3}}
    accelerator = SimpleNamespace(
        distributed_type=distributed.DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)),
    )
    distributed.set_deepspeed_micro_batch(accelerator, 3)
    assert config["train_micro_batch_size_per_gpu"] == expected
    assert distributed.zero_stage(accelerator) == 3 and distributed.shards_parameters(accelerator)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_the_gpu_script_writes_accelerate_configs_of_each_engine(engine: str, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import distributed_gpu

    path = tmp_path / "config.json"
    path.write_text(json.dumps(distributed_gpu.accelerate_config(engine, 2)))
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type.value == ("FSDP" if engine == "fsdp2" else "DEEPSPEED")
    assert loaded.num_processes == 2 and loaded.mixed_precision == "bf16"
    if engine == "fsdp2":
        assert loaded.fsdp_config["fsdp_version"] == 2


def _engine(kind: str) -> SimpleNamespace:
    """An accelerator stand-in launched as `kind` (what `check_engine` reads of it)."""
    types = {"fsdp2": "FSDP", "fsdp1": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "ddp": "MULTI_GPU"}
    deepspeed = {"zero_optimization": {"stage": {"zero2": 2, "zero3": 3}.get(kind, 0)}}
    return SimpleNamespace(
        distributed_type=distributed.DistributedType[types[kind]], is_fsdp2=kind == "fsdp2",
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=deepspeed)),
    )  # fmt: skip


SETTINGS = {
    "train_text_encoder": False, "save_strategy": "no", "validation_prompts": [], "push_to_hub": False,
    "hub_strategy": "every_save",
}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "changed", "refused"),
    [
        ("fsdp1", {}, "FSDP version 1 is not supported"),
        ("fsdp2", {"validation_prompts": ["a cat"]}, "validation_prompts: not supported under FSDP2"),
        ("zero3", {"validation_prompts": ["a cat"]}, "validation_prompts: not supported under DeepSpeed"),
        ("fsdp2", {"train_text_encoder": True}, "train_text_encoder"),
        ("fsdp2", {"push_to_hub": True}, "hub_strategy='every_save'"),
        ("zero2", {"save_strategy": "steps"}, "checkpoints under DeepSpeed"),
        ("fsdp2", {"streaming_eval": True}, "a streaming eval set"),
        ("zero3", {"full_reference": True}, "Full fine-tuning with a reference model under DeepSpeed ZeRO"),
    ],
)
def test_what_an_engine_cannot_do_is_refused_by_name(kind: str, changed: dict, refused: str) -> None:
    flags = {key: changed.pop(key, False) for key in ("full_reference", "streaming_eval")}
    with pytest.raises(ValueError, match=re.escape(refused)):
        distributed.check_engine(_engine(kind), SimpleNamespace(**{**SETTINGS, **changed}), **flags)


@pytest.mark.parametrize("kind", ["ddp", "zero2", "fsdp2"])
def test_what_an_engine_can_do_passes(kind: str) -> None:
    settings = {**SETTINGS, "validation_prompts": ["a cat"] if kind != "fsdp2" else [], "push_to_hub": kind == "zero2"}
    distributed.check_engine(_engine(kind), SimpleNamespace(**settings), full_reference=kind != "fsdp2")
