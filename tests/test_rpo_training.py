"""Diffusion-RPO trainer: it learns in both timestep-sharing modes, saves loadable LoRA, and spans processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_pref_trainers import DiffusionRPOConfig, DiffusionRPOTrainer
from diffusion_pref_trainers.testing import make_preference_dataset, tiny_sd3_pipeline, tiny_sd_pipeline


def _config(tmp_path: Path, **overrides) -> DiffusionRPOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=4, max_steps=30, beta=200.0,
        learning_rate=1e-3, logging_steps=10, save_steps=0, eval_noise_draws=4,
    )  # fmt: skip
    values.update(overrides)
    return DiffusionRPOConfig(**values)


@pytest.mark.parametrize(
    "similarity,sharing", [("multimodal", "batch"), ("image", "pair"), ("text", "pair")], ids=lambda v: str(v)
)
def test_rpo_learns(tmp_path, clip_dir, similarity, sharing) -> None:
    pairs = make_preference_dataset(8)
    model_path = None if similarity == "text" else clip_dir
    args = _config(tmp_path, similarity=similarity, timestep_sharing=sharing, similarity_model_name_or_path=model_path)
    trainer = DiffusionRPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_rewards/accuracies"] >= 0.75 > before["eval_rewards/accuracies"]
    assert after["eval_rewards/margins"] > 0
    logged = trainer.state.log_history[0]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rpo/weight_diagonal", "rpo/similarity_mean"):
        assert key in logged
    # A row-softmax over 4 losers: the diagonal weight lies strictly between uniform-ish and one-hot.
    assert 0.0 < logged["rpo/weight_diagonal"] < 1.0


def test_batch_sharing_draws_one_timestep_and_pair_sharing_one_per_row(tmp_path) -> None:
    pairs = make_preference_dataset(4)
    kwargs = dict(similarity="text", similarity_model_name_or_path=None, max_steps=1)
    batch_trainer = DiffusionRPOTrainer(tiny_sd_pipeline(), _config(tmp_path, **kwargs), pairs)
    pair_trainer = DiffusionRPOTrainer(tiny_sd_pipeline(), _config(tmp_path, timestep_sharing="pair", **kwargs), pairs)
    shared = batch_trainer.sample_timesteps(16, torch.Generator().manual_seed(0))
    separate = pair_trainer.sample_timesteps(16, torch.Generator().manual_seed(0))
    assert shared.shape == separate.shape == (16,)
    assert len(set(shared.tolist())) == 1
    assert len(set(separate.tolist())) > 1


def test_rpo_takes_the_familys_default_beta_when_unset(tmp_path) -> None:
    pairs, kwargs = make_preference_dataset(4), dict(similarity="text", similarity_model_name_or_path=None)
    assert DiffusionRPOTrainer(tiny_sd_pipeline(), _config(tmp_path, beta=None, **kwargs), pairs).args.beta == 5000.0
    assert DiffusionRPOTrainer(tiny_sd3_pipeline(), _config(tmp_path, beta=None, **kwargs), pairs).args.beta == 1000.0


def test_rpo_lora_round_trip(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    base_dir = tmp_path / "base"
    tiny_sd_pipeline().save_pretrained(base_dir)
    args = _config(tmp_path, similarity="text", similarity_model_name_or_path=None, max_steps=5)
    trainer = DiffusionRPOTrainer(str(base_dir), args, make_preference_dataset(8))
    trainer.train()

    def sample(pipe) -> np.ndarray:
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
        return out.images

    trained = sample(trainer.pipe)
    fresh = StableDiffusionPipeline.from_pretrained(base_dir)
    base = sample(fresh)
    fresh.load_lora_weights(args.output_dir)
    assert np.array_equal(sample(fresh), trained)
    assert not np.array_equal(base, trained)
    card = (Path(args.output_dir) / "README.md").read_text()
    assert "diffusion-rpo" in card and "distance_temperature" in card


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(distance_temperature=0.0), "distance_temperature"),
        (dict(similarity="colour"), "similarity"),
        (dict(timestep_sharing="step"), "timestep_sharing"),
        (dict(similarity="image", similarity_model_name_or_path=None), "similarity_model_name_or_path"),
        (dict(per_device_train_batch_size=1, gather_across_processes=False), "1x1"),
    ],
)
def test_rpo_config_validation(tmp_path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


def test_rpo_with_a_single_pair_per_step_is_refused_before_training(tmp_path) -> None:
    args = _config(tmp_path, per_device_train_batch_size=1, similarity="text", similarity_model_name_or_path=None)
    with pytest.raises(ValueError, match="plain DPO"):
        DiffusionRPOTrainer(tiny_sd_pipeline(), args, make_preference_dataset(4))
    assert not Path(args.output_dir).exists()


def test_two_processes_build_the_global_matrix(tmp_path, launch_two_processes) -> None:
    launch_two_processes("ddp_rpo.py", str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world"] == 2
        # 2 pairs per process, gathered: every step sees the 4 x 4 global matrix.
        assert report["shapes"] and all(shape == [4, 4] for shape in report["shapes"])
    # Gradients reached both processes' rows and DDP kept the replicas identical.
    assert reports[0]["local_param_sum"] == pytest.approx(reports[1]["local_param_sum"], rel=1e-9)
    assert reports[0]["losses"] == pytest.approx(reports[1]["losses"], rel=1e-6)
    assert reports[0]["lora_norm"] > 0
