"""Trackers get `train/` and `eval/` namespaces, the epoch and a run name; `log_history` keeps TRL's keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_pref_trainers import DiffusionDPOTrainer
from diffusion_pref_trainers.testing import tiny_sd_pipeline
from diffusion_pref_trainers.tracking import namespaced, resolved_run_name, tracker_init_kwargs


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
