"""Checkpoints: written atomically, rotated, and resumed exactly (same losses, same final weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import InterruptAt, Interrupted
from peft.utils import get_peft_model_state_dict

from diffusion_pref_trainers import DiffusionDPOTrainer, TrainerCallback, checkpoints
from diffusion_pref_trainers.adapters import ADAPTER_FILE
from diffusion_pref_trainers.hub import LORA_FILE
from diffusion_pref_trainers.state import STATE_FILE
from diffusion_pref_trainers.testing import make_preference_dataset, tiny_sd_pipeline
from diffusion_pref_trainers.trainers.checkpointing import MODEL_FILE

# A LoRA checkpoint of one process: safetensors and JSON only, nothing that would be unpickled to resume; the
# adapter twice: for the resume, and in diffusers' format for `load_lora_weights` (sorted by name).
CHECKPOINT_FILES = [
    ADAPTER_FILE, "optimizer.json", "optimizer.safetensors", LORA_FILE, "random_states_0.json",
    "random_states_0.safetensors", "run.json", "scheduler.json", STATE_FILE,
]  # fmt: skip


def _names(folder: str | Path) -> list[str]:
    return sorted(path.name for path in Path(folder).iterdir() if "checkpoint-" in path.name)


def _trained_weights(trainer: DiffusionDPOTrainer) -> dict[str, torch.Tensor]:
    """The adapter weights with LoRA, else the whole denoiser's, as detached copies."""
    weights = get_peft_model_state_dict(trainer._unwrapped) if trainer.peft_config else trainer._unwrapped.state_dict()
    return {key: value.detach().clone() for key, value in weights.items()}


def _train_logs(trainer: DiffusionDPOTrainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------- folder helpers
def _mark(folder: Path, identity: dict) -> None:
    """Make `folder` a checkpoint of the run of `identity`."""
    folder.mkdir()
    checkpoints.write_run(folder, {"identity": identity, "fingerprint": checkpoints.fingerprint(identity)})


def test_list_rotate_and_resolve(tmp_path) -> None:
    ours, other = {"seed": 1}, {"seed": 2}
    for step in (10, 2, 30):
        _mark(checkpoints.checkpoint_path(tmp_path, step), ours)
    _mark(checkpoints.checkpoint_path(tmp_path, 50), other)  # another run's, newest of all
    checkpoints.temporary_path(tmp_path, 40).mkdir()  # a save that never finished
    found = [path.name for path in checkpoints.list_checkpoints(tmp_path)]
    assert found == ["checkpoint-2", "checkpoint-10", "checkpoint-30", "checkpoint-50"]  # numeric, tmp ignored
    fp = checkpoints.fingerprint(ours)
    assert checkpoints.resolve(tmp_path, "latest", fp).name == "checkpoint-30"  # the newest of this run
    assert checkpoints.resolve(tmp_path, True, fp).name == "checkpoint-30"
    assert checkpoints.resolve(tmp_path, None, fp) is None
    assert checkpoints.rotate(tmp_path, None, fp) == []
    assert [p.name for p in checkpoints.rotate(tmp_path, 1, fp)] == ["checkpoint-2", "checkpoint-10"]
    assert _names(tmp_path) == ["checkpoint-30", "checkpoint-50", "tmp-checkpoint-40"]  # the other run's kept


def test_commit_replaces_a_stale_checkpoint_in_one_rename(tmp_path) -> None:
    stale = checkpoints.checkpoint_path(tmp_path, 5)
    stale.mkdir()
    (stale / "old.txt").write_text("old")
    tmp = checkpoints.temporary_path(tmp_path, 5)
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    assert checkpoints.commit(tmp_path, 5) == stale
    assert sorted(p.name for p in stale.iterdir()) == ["new.txt"]
    assert not tmp.exists()


def test_resolve_explains_what_is_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="No checkpoint-\\* folder in"):
        checkpoints.resolve(tmp_path, "latest", "0")
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):
        checkpoints.resolve(tmp_path, str(tmp_path / "checkpoint-7"), "0")


# ------------------------------------------------------------------------------------ while training
def test_save_steps_write_complete_checkpoints_atomically_and_keep_the_newest(pairs, make_config) -> None:
    args = make_config(per_device_train_batch_size=2, max_steps=6, save_steps=2, save_total_limit=2)
    on_disk_at_save = []

    class Watch(TrainerCallback):
        def on_save(self, args, state, control, **kwargs) -> None:
            on_disk_at_save.append((f"checkpoint-{state.global_step}", _names(args.output_dir)))

    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, callbacks=[Watch()])
    written_into = []
    write = trainer._write_training_state

    def spy(folder: Path) -> None:
        step = int(folder.name.rsplit("-", 1)[1])
        written_into.append((folder.name, checkpoints.checkpoint_path(args.output_dir, step).exists()))
        write(folder)

    trainer._write_training_state = spy
    trainer.train()

    # Every save goes into a temporary folder while the final name does not exist yet...
    assert written_into == [("tmp-checkpoint-2", False), ("tmp-checkpoint-4", False), ("tmp-checkpoint-6", False)]
    # ...and is renamed into place before anyone is told; the oldest beyond the limit is gone.
    assert on_disk_at_save == [
        ("checkpoint-2", ["checkpoint-2"]),
        ("checkpoint-4", ["checkpoint-2", "checkpoint-4"]),
        ("checkpoint-6", ["checkpoint-4", "checkpoint-6"]),
    ]
    assert _names(args.output_dir) == ["checkpoint-4", "checkpoint-6"]
    for step in (4, 6):
        folder = checkpoints.checkpoint_path(args.output_dir, step)
        assert (folder / ADAPTER_FILE).is_file()  # LoRA: the adapter only, not the whole UNet
        assert sorted(path.name for path in folder.iterdir()) == CHECKPOINT_FILES
        assert json.loads((folder / STATE_FILE).read_text())["global_step"] == step


def _sample(pipe) -> torch.Tensor:
    """One fixed-seed image of the pipeline, as an array."""
    generator = torch.Generator().manual_seed(0)
    call = dict(num_inference_steps=2, height=32, width=32, output_type="pt", generator=generator)
    return pipe("a red square", **call).images


def test_a_lora_checkpoint_loads_with_load_lora_weights_and_reproduces_its_step(
    tiny_pipe_dir, pairs, make_config
) -> None:
    args = make_config(per_device_train_batch_size=2, max_steps=4, save_steps=2)
    at_save = {}

    class Render(TrainerCallback):
        def __init__(self, trainer) -> None:
            self.trainer = trainer

        def on_save(self, args, state, control, **kwargs) -> None:
            with torch.no_grad():
                at_save[checkpoints.checkpoint_path(args.output_dir, state.global_step).name] = _sample(
                    self.trainer.pipe
                )

    trainer = DiffusionDPOTrainer(tiny_pipe_dir, args, pairs)
    trainer.add_callback(Render(trainer))
    trainer.train()
    fresh = DiffusionPipeline.from_pretrained(tiny_pipe_dir)
    base = _sample(fresh)
    fresh.load_lora_weights(str(checkpoints.checkpoint_path(args.output_dir, 2)))
    loaded = _sample(fresh)
    assert not torch.allclose(base, at_save["checkpoint-2"], atol=1e-4)  # the adapter changes the sample...
    torch.testing.assert_close(loaded, at_save["checkpoint-2"], atol=1e-5, rtol=1e-4)  # ...as at its step
    assert not torch.allclose(at_save["checkpoint-2"], at_save["checkpoint-4"], atol=1e-4)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_to_resume_from(pairs, make_config) -> None:
    args = make_config(per_device_train_batch_size=2, max_steps=4, save_steps=2)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    write = trainer._write_training_state

    def dies_at_step_4(folder: Path) -> None:
        write(folder)
        if folder.name.endswith("-4"):
            raise OSError("disk full")

    trainer._write_training_state = dies_at_step_4
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert _names(args.output_dir) == ["checkpoint-2", "tmp-checkpoint-4"]
    assert checkpoints.resolve(args.output_dir, "latest", trainer._fingerprint).name == "checkpoint-2"
    # A file the unfinished save left (here: a pickle an older version wrote) must not end up in the new checkpoint.
    (checkpoints.temporary_path(args.output_dir, 4) / "optimizer.bin").write_bytes(b"pickle")

    args.resume_from_checkpoint = "latest"
    resumed = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    resumed.train()
    assert resumed.state.global_step == 4
    assert _names(args.output_dir) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(path.name for path in checkpoints.checkpoint_path(args.output_dir, 4).iterdir()) == CHECKPOINT_FILES


@pytest.mark.parametrize(
    "rows,settings,stop",
    [
        # 4 batches an epoch, a warm-up + linear schedule, stopped mid-epoch at step 3 of 6.
        (8, dict(max_steps=6, save_steps=3, lr_scheduler_type="linear", warmup_steps=2), 3),
        # 3 micro-batches an epoch with 2 per optimizer step: accumulation windows straddle epochs.
        (6, dict(max_steps=4, save_steps=2, gradient_accumulation_steps=2), 2),
        # Full fine-tuning: the whole denoiser and its optimizer state go through the checkpoint.
        (8, dict(max_steps=4, save_steps=2, use_lora=False, learning_rate=1e-4), 2),
        # A worker process kept across epochs reads the rows: resumed mid-epoch, then into the next epoch.
        (8, dict(max_steps=6, save_steps=3, dataloader_num_workers=1), 3),
    ],
    ids=["schedule", "accumulation", "full", "workers"],
)
def test_resume_reproduces_the_uninterrupted_run(make_config, tmp_path, rows, settings, stop) -> None:
    # 40 px images with random crops and flips: a resumed run must restore data order, augmentation, noise,
    # optimizer and schedule to see exactly what the uninterrupted run saw.
    pairs = make_preference_dataset(rows, size=40)
    settings = dict(per_device_train_batch_size=2, random_flip=True, center_crop=False, **settings)
    straight = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(**settings, output_dir=str(tmp_path / "a")), pairs)
    straight.train()

    args = make_config(**settings, output_dir=str(tmp_path / "b"))
    interrupted = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, callbacks=[InterruptAt(stop)])
    with pytest.raises(Interrupted):
        interrupted.train()
    at_checkpoint = _trained_weights(interrupted)
    folder = tmp_path / "b" / f"checkpoint-{stop}"
    assert {path.suffix for path in folder.iterdir()} == {".safetensors", ".json"}
    assert (folder / (ADAPTER_FILE if args.use_lora else MODEL_FILE)).is_file()
    resumed = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    resumed.train(resume_from_checkpoint=str(folder))

    expected, got = _train_logs(straight), _train_logs(resumed)
    steps = list(range(1, args.max_steps + 1))
    assert [entry["step"] for entry in got] == steps == [entry["step"] for entry in expected]
    if args.warmup_steps:
        assert len({entry["learning_rate"] for entry in expected}) > 2  # the schedule really moves
    for want, have in zip(expected, got, strict=True):
        for key in ("loss", "learning_rate", "grad_norm", "rewards/margins", "epoch"):
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (have["step"], key)
    final_straight, final_resumed = _trained_weights(straight), _trained_weights(resumed)
    assert final_straight.keys() == final_resumed.keys() == at_checkpoint.keys()
    for key, value in final_straight.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(value, at_checkpoint[key]) for key, value in final_resumed.items())  # it trained on


def test_two_processes_write_their_own_random_states_and_resume_exactly(tmp_path, launch_two_processes) -> None:
    for mode in ("straight", "resumed"):
        launch_two_processes("ddp_checkpoint.py", str(tmp_path), mode)
    per_process = ["random_states_1.json", "random_states_1.safetensors"]
    for rank in (0, 1):
        straight, resumed = (
            json.loads((tmp_path / f"{mode}{rank}.json").read_text()) for mode in ("straight", "resumed")
        )
        assert straight["world"] == resumed["world"] == 2
        assert resumed["files"] == straight["files"] == sorted(CHECKPOINT_FILES + per_process)
        assert len(resumed["losses"]) == len(straight["losses"]) == 4
        assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-6, abs=1e-9)
