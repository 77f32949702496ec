"""Trackers get `train/` and `eval/` namespaces, the epoch, a run name and validation images; `log_history` keeps
TRL's keys."""

from __future__ import annotations

import dataclasses
import io
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from PIL import Image

from diffusion_pref_trainers import DiffusionDPOTrainer, hub
from diffusion_pref_trainers.testing import tiny_sd_pipeline
from diffusion_pref_trainers.tracking import log_image, namespaced, resolved_run_name, tracker_init_kwargs


def test_namespaces_follow_transformers_rewrite_logs() -> None:
    logs = {"loss": 0.5, "rewards/margins": 1.0, "eval_loss": 0.7, "eval_rewards/accuracies": 0.75}
    assert namespaced(logs) == {
        "train/loss": 0.5, "train/rewards/margins": 1.0, "eval/loss": 0.7, "eval/rewards/accuracies": 0.75,
    }  # fmt: skip


def test_run_name_defaults_to_the_output_folder_name(tmp_path: Path) -> None:
    assert resolved_run_name(None, str(tmp_path / "sd15-dpo")) == "sd15-dpo"
    assert resolved_run_name("first try", str(tmp_path / "sd15-dpo")) == "first try"
    assert tracker_init_kwargs("first try")["wandb"] == {"name": "first try"}


def _scalars(events_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_gets_namespaced_scalars_under_the_run_name(pairs, make_config) -> None:
    pytest.importorskip("tensorboard", reason="the `tracking` extra: pip install -e '.[tracking]'")
    args = make_config(report_to="tensorboard", run_name="named-run", eval_steps=2)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)
    trainer.train()
    scalars = _scalars(Path(args.output_dir) / "runs" / "named-run" / "diffusion_dpo")  # accelerate adds the project
    history = trainer.state.log_history
    assert {"loss", "eval_loss"} <= {key for entry in history for key in entry}  # TRL's keys stay
    assert {"train/loss", "train/rewards/margins", "train/epoch", "eval/loss", "eval/rewards/accuracies"} <= set(
        scalars
    )
    assert not any(tag.startswith("eval_") or tag == "loss" for tag in scalars)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    assert scalars["eval/loss"][-1][1] == pytest.approx(history[-1]["eval_loss"], rel=1e-6)


def _images(events_dir: Path, tag: str) -> list[tuple[int, Image.Image]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events_dir), size_guidance={"images": 0})
    accumulator.Reload()
    return [(e.step, Image.open(io.BytesIO(e.encoded_image_string))) for e in accumulator.Images(tag)]


def test_validation_images_reach_tensorboard_at_the_validation_steps_and_the_end_without_changing_training(
    pairs, make_config
) -> None:
    pytest.importorskip("tensorboard", reason="the `tracking` extra: pip install -e '.[tracking]'")
    validation = dict(validation_prompts=["a red cat"], num_validation_images=1, validation_inference_steps=2)
    args = make_config(max_steps=3, report_to="tensorboard", validation_steps=2, **validation)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    trainer.train()
    rng_after = torch.get_rng_state()
    quiet = make_config(max_steps=3, report_to="tensorboard", output_dir=str(Path(args.output_dir).parent / "quiet"))
    plain = DiffusionDPOTrainer(tiny_sd_pipeline(), dataclasses.replace(quiet, **validation), pairs)
    plain.train()
    assert torch.equal(rng_after, torch.get_rng_state())  # rendering drew nothing from the global generator

    images = _images(Path(args.output_dir) / "runs" / "out" / "diffusion_dpo", "validation")
    assert [step for step, _ in images] == [2, 3]  # step 2, then the end (step 3)
    end = Image.open(Path(args.output_dir, hub.SAMPLES_FILE)).convert("RGB")
    assert np.array_equal(np.asarray(images[-1][1].convert("RGB")), np.asarray(end))  # base next to aligned
    assert not np.array_equal(np.asarray(images[0][1]), np.asarray(images[1][1]))  # the weights moved in between
    trained, reference = get_peft_model_state_dict(trainer._unwrapped), get_peft_model_state_dict(plain._unwrapped)
    assert all(torch.equal(trained[key], reference[key]) for key in reference)  # rendering drew no training noise
    assert trainer._unwrapped.training


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(report_to="tensorboard"), "`validation_steps` renders `validation_prompts`, but none are set"),
        (dict(validation_prompts=["a cat"]), "`validation_steps` logs images to the trackers, but `report_to`"),
        (dict(validation_prompts=["a cat"], report_to="tensorboard", validation_steps=-1), "must be >= 0"),
    ],
)
def test_validation_steps_need_prompts_and_a_tracker(make_config, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_config(**{"validation_steps": 2, **overrides})


class _Tracker:
    """An accelerate tracker's image and scalar entry points, recording their calls."""

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, []

    def log_images(self, values: dict, step: int, **kwargs) -> None:
        self.calls.append(("log_images", values, step, kwargs))

    def log(self, values: dict, step: int) -> None:
        self.calls.append(("log", values, step, {}))


def test_each_tracker_gets_the_image_its_own_way_and_the_others_are_named(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "trackio", SimpleNamespace(Image=lambda pixels: ("trackio.Image", pixels.shape)))
    image = Image.new("RGB", (6, 4), "red")
    trackers = [_Tracker(name) for name in ("tensorboard", "wandb", "trackio", "mlflow")]
    assert log_image(trackers, "validation", image, 3) == ["mlflow"]
    board, wandb, trackio, mlflow = (tracker.calls for tracker in trackers)
    ((method, values, step, kwargs),) = board
    assert (method, values["validation"].shape, step, kwargs) == (
        "log_images",
        (1, 4, 6, 3),
        3,
        {"dataformats": "NHWC"},
    )
    assert wandb == [("log_images", {"validation": [image]}, 3, {})]
    assert trackio == [("log", {"validation": ("trackio.Image", (4, 6, 3))}, 3, {})] and mlflow == []
