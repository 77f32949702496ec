"""The DPO trainer end to end on the tiny pipeline: forwards, learning, logs, evaluation, saving, options."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from peft.utils import get_peft_model_state_dict

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer, DiffusionTrainingConfig, TrainerCallback
from diffusion_pref_trainers.data import BadImageError, collate
from diffusion_pref_trainers.testing import (
    make_preference_dataset,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)

TRAIN_LOG_KEYS = (
    "loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "model_loss/chosen", "model_loss/rejected",
)  # fmt: skip
EVAL_KEYS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
             "eval_rewards/rejected")  # fmt: skip


def _first_batch(trainer: DiffusionDPOTrainer, rows: int = 4) -> dict:
    return collate([trainer.train_dataset[index] for index in range(rows)])


def _sample(pipe) -> np.ndarray:
    """Two DDIM steps from a fixed generator: a deterministic image per pipeline state."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat on a hill", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    return out.images


class _ForwardRecorder:
    """Records the inputs and outputs of every forward of the given denoisers, in call order."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.handles = [module.register_forward_hook(self._hook, with_kwargs=True) for module in modules]

    def _hook(self, module, args, kwargs, output) -> None:
        self.calls.append(
            {
                "sample": args[0].detach().clone(),
                "timestep": args[1].detach().clone(),
                "encoder_hidden_states": kwargs["encoder_hidden_states"].detach().clone(),
                "output": output.sample.detach().clone(),
            }
        )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_policy_and_reference_run_one_batched_forward_each_on_the_same_latents(pairs, make_config, use_lora) -> None:
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(use_lora=use_lora, learning_rate=1e-2), pairs)
    denoisers = [trainer.denoiser] + ([trainer.reference] if trainer.reference is not None else [])
    assert (trainer.reference is None) == use_lora  # LoRA: no second copy of the weights
    captured = {}
    noisy_and_target = trainer.family.noisy_and_target

    def spy(latents, noise, timesteps):
        captured.update(noise=noise, timesteps=timesteps)
        return noisy_and_target(latents, noise, timesteps)

    trainer.family.noisy_and_target = spy
    recorder = _ForwardRecorder(*denoisers)
    model_err, ref_err = trainer.denoising_errors(_first_batch(trainer), torch.Generator().manual_seed(0))

    # Image-major: 4 winners then 4 losers, each pair sharing its noise and timestep.
    assert model_err.shape == ref_err.shape == (8,)
    assert torch.equal(captured["noise"][:4], captured["noise"][4:])
    assert torch.equal(captured["timesteps"][:4], captured["timesteps"][4:])
    assert len(set(captured["timesteps"][:4].tolist())) > 1  # one draw per pair, not one per batch
    # Exactly one forward of all 8 latents for the policy and one for the reference, on identical inputs.
    assert len(recorder.calls) == 2
    policy, reference = recorder.calls
    assert policy["sample"].shape[0] == 8
    for key in ("sample", "timestep", "encoder_hidden_states"):
        assert torch.equal(policy[key], reference[key]), key
    # At initialisation the policy is the base model (LoRA B = 0, or an exact copy).
    assert torch.equal(model_err, ref_err)

    trainer.train()
    recorder.calls.clear()
    model_err, ref_err = trainer.denoising_errors(_first_batch(trainer), torch.Generator().manual_seed(1))
    recorder.remove()
    policy, reference = recorder.calls
    base = tiny_sd_pipeline().unet
    with torch.no_grad():
        expected = base(reference["sample"], reference["timestep"],
                        encoder_hidden_states=reference["encoder_hidden_states"]).sample  # fmt: skip
    # After training, the reference is still exactly the untouched base model; the policy has moved.
    torch.testing.assert_close(reference["output"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(policy["output"], expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(model_err, ref_err)


# ---------------------------------------------------------------------------- a short run that learns
@pytest.fixture(scope="module")
def trained(tiny_pipe_dir, pairs, tmp_path_factory) -> dict:
    """One 20-step LoRA run on 8 fixed pairs (beta 50, lr 3e-3, 4 pairs a step), loaded from a folder path.

    Measured here: eval accuracy 1.0 with seeds 42 and 0 (the 60-step lr 1e-3 setting also reaches 1.0).
    """
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path_factory.mktemp("dpo") / "out"), resolution=32, per_device_train_batch_size=4,
        max_steps=20, beta=50.0, learning_rate=3e-3, logging_steps=5, save_steps=0, eval_noise_draws=4,
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, args, pairs, eval_dataset=pairs)
    before = trainer.evaluate()
    trainer.train()
    return dict(trainer=trainer, before=before, after=trainer.evaluate(), again=trainer.evaluate())


def test_a_short_run_learns_the_preference(trained) -> None:
    before, after = trained["before"], trained["after"]
    # Before training the policy is the reference: every implicit reward is 0, no pair is ranked right.
    assert before["eval_rewards/margins"] == 0.0 and before["eval_rewards/accuracies"] == 0.0
    assert before["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert after["eval_rewards/accuracies"] >= 0.75
    assert after["eval_rewards/margins"] > 0
    assert after["eval_loss"] < math.log(2)


def test_log_history_has_the_trl_metrics(trained) -> None:
    trainer = trained["trainer"]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [5, 10, 15, 20]
    for entry in logs:
        missing = [key for key in TRAIN_LOG_KEYS if key not in entry]
        assert missing == []
        assert math.isfinite(entry["loss"]) and entry["grad_norm"] > 0
        assert entry["learning_rate"] == pytest.approx(3e-3)
        assert 0.0 <= entry["rewards/accuracies"] <= 1.0
    assert trainer.state.global_step == 20
    assert logs[-1]["rewards/margins"] > 0


def test_evaluate_is_deterministic_and_uses_eval_prefixed_keys(trained) -> None:
    after, again = trained["after"], trained["again"]
    assert all(key in after for key in EVAL_KEYS)
    assert all(key.startswith("eval_") for key in after)
    assert after == again
    # The end-of-training evaluation went into the history too.
    assert trained["trainer"].state.log_history[-1] == {**after, "step": 20, "epoch": pytest.approx(10.0)}


def test_saved_lora_reproduces_the_trained_pipeline(trained, tiny_pipe_dir) -> None:
    from diffusers import StableDiffusionPipeline

    trainer = trained["trainer"]
    output_dir = Path(trainer.args.output_dir)
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    trained_images = _sample(trainer.pipe)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    base_images = _sample(fresh)
    fresh.load_lora_weights(str(output_dir))
    assert np.array_equal(_sample(fresh), trained_images)
    assert not np.array_equal(base_images, trained_images)


def test_model_card_and_training_config(trained, tiny_pipe_dir) -> None:
    output_dir = Path(trained["trainer"].args.output_dir)
    card = ModelCard.load(output_dir / "README.md")
    assert {"diffusers", "lora", "text-to-image", "diffusion-dpo"} <= set(card.data.tags)
    assert card.data.base_model == tiny_pipe_dir
    assert "load_lora_weights" in card.text and "| beta | 50.0 |" in card.text
    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["beta"] == 50.0 and config["max_steps"] == 20 and "hub_token" not in config


def test_push_after_training_fails_fast_offline(trained) -> None:
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        trained["trainer"].push_to_hub()
    assert time.perf_counter() - start < 5.0


# --------------------------------------------------------------------------------- other settings
def test_full_fine_tuning_saves_a_diffusers_unet(pairs, make_config) -> None:
    from diffusers import UNet2DConditionModel

    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(use_lora=False), pairs)
    trainer.train()
    output_dir = Path(trainer.args.output_dir)
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()
    loaded = UNet2DConditionModel.from_pretrained(output_dir / "unet").state_dict()
    trained_state = trainer._unwrapped.state_dict()
    base_state = tiny_sd_pipeline().unet.state_dict()
    assert loaded.keys() == trained_state.keys() == base_state.keys()
    assert all(torch.equal(loaded[key], trained_state[key].cpu()) for key in loaded)
    assert any(not torch.equal(loaded[key], base_state[key]) for key in loaded)
    # The card describes what was saved: no LoRA tag, and the snippet loads the UNet sub-folder.
    card = ModelCard.load(output_dir / "README.md")
    assert "diffusion-dpo" in card.data.tags and "lora" not in card.data.tags
    assert f'UNet2DConditionModel.from_pretrained("{output_dir.resolve()}", subfolder="unet")' in card.text
    assert "load_lora_weights" not in card.text


def test_gradient_accumulation_steps_once_per_window(pairs, make_config) -> None:
    steps = []

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs) -> None:
            steps.append(state.global_step)

    args = make_config(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, callbacks=[CountSteps()])
    recorder = _ForwardRecorder(trainer.denoiser)
    trainer.train()
    recorder.remove()
    # 2 optimizer steps x 2 micro-batches x (policy + reference) forwards of 2 pairs (4 latents) each.
    assert steps == [1, 2]
    assert len(recorder.calls) == 8 and all(call["sample"].shape[0] == 4 for call in recorder.calls)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    assert logs[-1]["epoch"] == pytest.approx(1.0)  # 4 micro-batches of 2 = the 8 pairs once


def _bitsandbytes_cpu_problem() -> str | None:
    """Why bitsandbytes' 8-bit AdamW cannot step here, or None when it can."""
    try:
        import bitsandbytes as bnb

        param = torch.nn.Parameter(torch.randn(4096))
        param.grad = torch.randn(4096)
        bnb.optim.AdamW8bit([param], lr=1e-3).step()
    except Exception as error:  # noqa: BLE001 - any failure means the CPU path is unusable
        return f"bitsandbytes AdamW8bit cannot step on this machine: {error}"
    return None


@pytest.mark.parametrize(
    "overrides",
    [dict(optim="adafactor"), dict(mixed_precision="bf16"), dict(optim="adamw_8bit")],
    ids=["adafactor", "bf16", "adamw_8bit"],
)
def test_optimizers_and_precision_train_on_cpu(pairs, make_config, overrides) -> None:
    if overrides.get("optim") == "adamw_8bit" and (problem := _bitsandbytes_cpu_problem()):
        pytest.skip(problem)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(**overrides), pairs)
    before = {key: value.clone() for key, value in get_peft_model_state_dict(trainer._unwrapped).items()}
    trainer.train()
    after = get_peft_model_state_dict(trainer._unwrapped)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(before[key], after[key]) for key in before)
    assert all(p.dtype == torch.float32 for p in trainer.trainable_parameters)  # adapters stay fp32
    if overrides.get("mixed_precision") == "bf16":
        assert trainer.pipe.vae.dtype == torch.bfloat16  # frozen weights in the compute dtype


def test_trainers_with_different_precisions_live_in_one_process(pairs, make_config) -> None:
    # accelerate's state is process-wide: a notebook that builds an fp32 trainer and then a bf16 one must work.
    first = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(mixed_precision="no"), pairs)
    second = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(mixed_precision="bf16"), pairs)
    assert (first.weight_dtype, second.weight_dtype) == (torch.float32, torch.bfloat16)
    assert second.accelerator.mixed_precision == "bf16"


def test_sft_weight_adds_the_winner_denoising_loss(pairs, make_config) -> None:
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(sft_weight=0.5, beta=10.0), pairs)
    model_w, model_l, ref_w, ref_l = [0.1, 0.3], [0.2, 0.1], [0.15, 0.2], [0.1, 0.25]
    loss, metrics = trainer.compute_loss(torch.tensor(model_w + model_l), torch.tensor(ref_w + ref_l), {})
    logits = [(rw - mw) - (rl - ml) for mw, ml, rw, rl in zip(model_w, model_l, ref_w, ref_l, strict=True)]
    dpo = sum(math.log1p(math.exp(-10.0 / 2 * x)) for x in logits) / 2
    assert loss.item() == pytest.approx(dpo + 0.5 * (0.1 + 0.3) / 2, rel=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(10.0 / 2 * sum(logits) / 2, rel=1e-6)  # beta/2 * s
    assert metrics["errors/chosen_diff"].item() == pytest.approx((0.15 - 0.1 + 0.2 - 0.3) / 2, rel=1e-6)


def test_swap_preferences_trains_on_the_rejected_image_as_winner(pairs, make_config) -> None:
    plain = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), pairs).train_dataset[0]["pixel_values"]
    swapped = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(swap_preferences=True), pairs)
    assert torch.equal(swapped.train_dataset[0]["pixel_values"], plain.flip(0))


def test_unreadable_images_are_counted_in_the_logs_or_fail_with_the_row(make_config, tmp_path) -> None:
    rows = make_preference_dataset(4, schema="pickapic").to_dict()
    rows["jpg_0"][2] = b"not an image"
    broken = datasets.Dataset.from_dict(rows)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(max_steps=1), broken)
    trainer.train()
    assert trainer.state.skipped_rows == 1
    assert trainer.state.log_history[0]["data/skipped_rows"] == 1.0
    with pytest.raises(BadImageError, match="Row 2"):  # a row the probe reads: found before any compute
        DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(max_steps=1, skip_bad_images=False), broken)


# ------------------------------------------------------------------------- bad input, before compute
def test_push_to_hub_offline_fails_fast_in_words(pairs, make_config) -> None:
    args = make_config(push_to_hub=True, hub_model_id="user/tiny-dpo")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE.*push_to_hub=False"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    assert time.perf_counter() - start < 5.0
    assert not Path(args.output_dir).exists()


def test_resolution_must_be_a_multiple_of_the_vae_factor(pairs, make_config) -> None:
    args = make_config(resolution=33)
    with pytest.raises(ValueError, match=r"`resolution=33` must be a multiple of 2.*e\.g\. 32"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    assert not Path(args.output_dir).exists()


def test_missing_columns_are_refused_before_any_compute(make_config) -> None:
    wrong = datasets.Dataset.from_dict({"text": ["a cat"], "good": [b""], "bad": [b""]})
    args = make_config()
    with pytest.raises(ValueError, match=r"\['bad', 'good', 'text'\] match no known schema.*prompt, chosen, rejected"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), args, wrong)
    assert not Path(args.output_dir).exists()


def test_unpaired_data_points_to_the_right_trainer(make_config) -> None:
    unpaired = datasets.Dataset.from_dict({"prompt": ["a"], "image": [b""], "label": [True]})
    with pytest.raises(ValueError, match="trains on preference pairs.*KTO"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), unpaired)


def test_the_wrong_config_class_is_refused(pairs, tmp_path) -> None:
    with pytest.raises(TypeError, match="takes a DiffusionDPOConfig"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), DiffusionTrainingConfig(output_dir=str(tmp_path)), pairs)


def test_a_training_set_smaller_than_one_batch_is_refused(make_config) -> None:
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), make_preference_dataset(3))
    with pytest.raises(ValueError, match=r"\(3 rows\) is smaller than one batch"):
        trainer.train()


# ------------------------------------------------------------------------- resolution and device defaults
def _warnings(caplog: pytest.LogCaptureFixture, phrase: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and phrase in r.getMessage()]


def test_an_unset_resolution_is_the_pipelines_own_and_the_callers_config_stays_as_given(
    tiny_pipe_dir, pairs, make_config, caplog
) -> None:
    args = make_config(resolution=None)
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, args, pairs)
    unet, vae = trainer.pipe.unet.config, trainer.pipe.vae.config
    expected = unet.sample_size * 2 ** (len(vae.block_out_channels) - 1)
    assert trainer.args.resolution == expected == 32 and args.resolution is None
    assert trainer.train_dataset[0]["pixel_values"].shape[-1] == expected
    assert not _warnings(caplog, "`resolution`")  # the 32 px pairs match the pipeline's size


@pytest.mark.parametrize(
    ("builder", "expected"), [(tiny_sd_pipeline, 5000.0), (tiny_sd3_pipeline, 1000.0), (tiny_flux_pipeline, 1000.0)]
)
def test_an_unset_beta_is_the_familys_default_and_the_callers_config_stays_as_given(
    builder, expected, pairs, make_config, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="diffusion_pref_trainers")
    args = make_config(beta=None)
    trainer = DiffusionDPOTrainer(builder(), args, pairs)
    assert trainer.args.beta == expected and args.beta is None
    assert any(f"`beta` not set: using {expected}" in r.getMessage() for r in caplog.records)
    assert DiffusionDPOTrainer(builder(), make_config(beta=50.0), pairs).args.beta == 50.0  # a given beta is kept


def test_a_resolution_other_than_the_datas_image_size_is_one_warning_naming_both(
    tiny_pipe_dir, pairs, make_config, caplog
) -> None:
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, make_config(resolution=64), pairs)
    assert trainer.args.resolution == 64  # an explicit value is kept
    [message] = _warnings(caplog, "`resolution`")
    assert "32x32 px" in message and "`resolution` is 64" in message


@pytest.mark.parametrize(
    ("settings", "phrase"),
    [
        ({"mixed_precision": "bf16"}, "`mixed_precision='bf16'` on a CPU"),
        ({"optim": "adamw_8bit"}, "`optim='adamw_8bit'` on a CPU"),
    ],
    ids=["bf16", "adamw_8bit"],
)
def test_gpu_settings_on_a_cpu_are_one_warning_saying_what_to_use(
    tiny_pipe_dir, pairs, make_config, caplog, settings, phrase
) -> None:
    DiffusionDPOTrainer(tiny_pipe_dir, make_config(**settings), pairs)
    [message] = _warnings(caplog, "on a CPU")  # one warning, about the one setting given
    assert message.startswith(phrase) and "Use `" in message


def test_a_tracker_that_is_not_installed_stops_the_trainer_with_the_install_line(
    tiny_pipe_dir, pairs, make_config, monkeypatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    args = make_config(report_to=["tensorboard"])
    with pytest.raises(ImportError, match=r"`report_to` asks for 'tensorboard'.*`pip install tensorboard`"):
        DiffusionDPOTrainer(tiny_pipe_dir, args, pairs)
    assert not Path(args.output_dir).exists()
