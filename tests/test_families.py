"""Model families: detection, noising and targets, timestep draws, conditioning, learning and LoRA round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pref_trainers import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionRPOConfig,
    DiffusionRPOTrainer,
    TrainerCallback,
)
from diffusion_pref_trainers.configs import DiffusionTrainingConfig
from diffusion_pref_trainers.data import collate
from diffusion_pref_trainers.families import get_family
from diffusion_pref_trainers.testing import (
    make_preference_dataset,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

BUILDERS = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "flux": tiny_flux_pipeline,
}


# ------------------------------------------------------------------------------------------ detection
@pytest.mark.parametrize(
    "builder,family",
    [("sd", "stable-diffusion"), ("sdxl", "stable-diffusion-xl"), ("sd3", "stable-diffusion-3"), ("flux", "flux")],
)
def test_family_is_detected_from_the_pipeline_class(builder, family) -> None:
    assert get_family(BUILDERS[builder]()).name == family


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_default_resolution_is_the_size_the_pipeline_generates_at(builder) -> None:
    pipe = BUILDERS[builder]()
    image = pipe("a cat", num_inference_steps=1, output_type="np").images[0]
    assert image.shape[:2] == (get_family(pipe).default_resolution,) * 2


def test_unsupported_pipeline_is_an_error_naming_the_supported_ones() -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8, block_out_channels=(8, 16), norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="DDPMPipeline is not supported") as error:
        get_family(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))
    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert name in str(error.value)


# ----------------------------------------------------------------------------------- noising/target
def _scaled_linear_alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> np.ndarray:
    """DDPM's cumulative alphas for SD's 'scaled_linear' betas, computed here in float64."""
    betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize(
    "builder,prediction_type",
    [("sd", "epsilon"), ("sd", "v_prediction"), ("sdxl", "epsilon"), ("sdxl", "v_prediction")],
)
def test_ddpm_noising_and_target_match_the_closed_form(builder, prediction_type) -> None:
    family = get_family(BUILDERS[builder](prediction_type=prediction_type))
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    noisy, target = family.noisy_and_target(latents, noise, timesteps)

    abar = torch.from_numpy(_scaled_linear_alphas_cumprod()[timesteps.numpy()]).float().view(-1, 1, 1, 1)
    assert torch.allclose(noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise, atol=1e-5)
    expected = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    assert torch.allclose(target, expected, atol=1e-5)


@pytest.mark.parametrize("builder", ["sd3", "flux"])
def test_flow_noising_and_target_by_hand(builder) -> None:
    family = get_family(BUILDERS[builder]())
    latents, noise = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), -1.0)
    noisy, target = family.noisy_and_target(latents, noise, torch.tensor([250.0]))  # sigma = 250 / 1000
    assert torch.allclose(noisy, torch.full_like(noisy, 0.75 * 2.0 + 0.25 * -1.0))
    assert torch.allclose(target, torch.full_like(target, -1.0 - 2.0))


@pytest.mark.parametrize("builder", ["sd3", "flux"])
def test_flow_noising_agrees_with_the_scheduler_at_drawn_timesteps(builder) -> None:
    """Drawn timesteps are points of the scheduler's (shifted) grid and noise as its own `scale_noise` does."""
    pipe = BUILDERS[builder]()
    family = get_family(pipe)
    generator = torch.Generator().manual_seed(0)
    timesteps = family.sample_timesteps(6, generator)
    latents, noise = torch.randn(6, 4, 4, 4, generator=generator), torch.randn(6, 4, 4, 4, generator=generator)
    noisy, target = family.noisy_and_target(latents, noise, timesteps)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    for i, t in enumerate(timesteps):
        expected = scheduler.scale_noise(latents[i : i + 1], t.view(1), noise[i : i + 1])
        assert torch.allclose(noisy[i : i + 1], expected, atol=1e-5)
    assert torch.equal(target, noise - latents)


# -------------------------------------------------------------------------------------------- timesteps
def test_flux_timesteps_are_logit_normal_with_the_configured_mean_and_std() -> None:
    config = DiffusionTrainingConfig(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.8)
    family = get_family(tiny_flux_pipeline(), config)  # dynamic shifting: the training grid is unshifted
    sigmas = family.sample_timesteps(4000, torch.Generator().manual_seed(0)).float() / 1000
    u = (1 - sigmas).clamp(1e-4, 1 - 1e-4)  # the index into the descending grid is floor(u * T)
    logits = torch.log(u / (1 - u))
    assert abs(logits.mean().item() - 0.5) < 0.05
    assert abs(logits.std().item() - 0.8) < 0.05


def test_sd3_timesteps_follow_its_shifted_schedule() -> None:
    """Logit-normal around 0 puts the median unshifted sigma at 0.5; SD3's shift 3 maps it to 3*0.5/(1+2*0.5)."""
    family = get_family(tiny_sd3_pipeline(with_t5=False))
    sigmas = family.sample_timesteps(4000, torch.Generator().manual_seed(0)).float() / 1000
    assert abs(sigmas.median().item() - 0.75) < 0.02


def test_cosmap_weights_the_errors_and_other_schemes_do_not(tmp_path) -> None:
    pipe = tiny_sd3_pipeline(with_t5=False)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    cosmap = get_family(pipe, DiffusionTrainingConfig(weighting_scheme="cosmap")).loss_weights(sigmas * 1000)
    assert torch.allclose(cosmap, 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    assert torch.equal(get_family(pipe).loss_weights(sigmas * 1000), torch.ones(3))

    # The trainer applies them: 'cosmap' and 'none' draw the same uniform timesteps from the same generator.
    errors = {}
    for scheme in ("cosmap", "none"):
        args = _dpo_config(tmp_path, weighting_scheme=scheme, max_sequence_length=8)
        trainer = DiffusionDPOTrainer(tiny_sd3_pipeline(with_t5=False), args, make_preference_dataset(2))
        batch = collate([trainer.train_dataset[i] for i in range(2)])
        errors[scheme] = trainer.denoising_errors(batch, torch.Generator().manual_seed(0), with_grad=False)
    weights = errors["cosmap"][1] / errors["none"][1]
    assert not torch.allclose(weights, torch.ones_like(weights))
    assert torch.allclose(errors["cosmap"][0] / errors["none"][0], weights, rtol=1e-4)


# ----------------------------------------------------------------------------------------- conditioning
def _capture_kwargs(module: torch.nn.Module) -> list[dict]:
    """Record the keyword arguments of every forward call of `module`."""
    calls: list[dict] = []
    module.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


def _find_crop(resized: np.ndarray, crop: np.ndarray) -> tuple[int, int]:
    """The (top, left) where `crop` lies in `resized`, found by exhaustive search."""
    size = crop.shape[0]
    errors = {
        (top, left): np.abs(resized[top : top + size, left : left + size] - crop).mean()
        for top in range(resized.shape[0] - size + 1)
        for left in range(resized.shape[1] - size + 1)
    }
    return min(errors, key=errors.get)


def test_sdxl_time_ids_are_each_images_original_size_applied_crop_and_target(tmp_path) -> None:
    import datasets

    resolution, rng = 32, np.random.default_rng(0)
    sizes = [((40, 56), (64, 36)), ((33, 48), (32, 32))]  # (height, width) of winner and loser: per-image ids
    images = [[rng.integers(0, 256, (*size, 3), dtype=np.uint8) for size in pair] for pair in sizes]
    data = datasets.Dataset.from_dict(
        {"prompt": ["a", "b"], "chosen": [Image.fromarray(w) for w, _ in images],
         "rejected": [Image.fromarray(lose) for _, lose in images]},
        features=datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Image(),
                                    "rejected": datasets.Image()}),
    )  # fmt: skip
    args = _dpo_config(tmp_path, center_crop=False, per_device_train_batch_size=2)
    trainer = DiffusionDPOTrainer(tiny_sdxl_pipeline(), args, data)
    batch = collate([trainer.train_dataset[i] for i in range(2)])
    calls = _capture_kwargs(trainer.pipe.unet)
    trainer.denoising_errors(batch, torch.Generator().manual_seed(0), with_grad=False)

    expected = []
    for side in range(2):  # image-major: both winners, then both losers
        for row in range(2):
            original = images[row][side]
            height, width = original.shape[:2]
            scale = resolution / min(height, width)
            resized_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
            resized = np.asarray(Image.fromarray(original).resize(resized_size, Image.BILINEAR), dtype=np.float32)
            applied = (batch["pixel_values"][row, side].permute(1, 2, 0).numpy() + 1) * 127.5
            top, left = _find_crop(resized, applied)
            expected.append([height, width, top, left, resolution, resolution])
    assert any(e[2] or e[3] for e in expected)  # random crops away from the corner are exercised
    assert len(calls) == 2  # the policy's and the reference's forwards
    for call in calls:
        assert call["added_cond_kwargs"]["time_ids"].tolist() == expected


def test_flux_gets_the_guidance_embedding_only_when_it_has_one() -> None:
    config = DiffusionTrainingConfig(guidance_scale=2.5)
    for guidance_embeds, expected in ((True, [2.5, 2.5]), (False, None)):
        family = get_family(tiny_flux_pipeline(guidance_embeds=guidance_embeds), config)
        calls = _capture_kwargs(family.denoiser)
        cond = family.encode_prompts(["a cat", "a dog"])
        noisy = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            pred = family.predict(family.denoiser, noisy, torch.tensor([500.0, 500.0]), cond, {})
        assert pred.shape == noisy.shape  # packed 2x2 for the transformer, unpacked back to the latent layout
        guidance = calls[0]["guidance"]
        assert (guidance.tolist() if guidance is not None else None) == expected
        assert torch.allclose(calls[0]["timestep"], torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_conditioning_with_and_without_t5(with_t5) -> None:
    config = DiffusionTrainingConfig(max_sequence_length=12)
    family = get_family(tiny_sd3_pipeline(with_t5=with_t5), config)
    cond = family.encode_prompts(["a cat", "a dog"])
    assert cond["prompt_embeds"].shape == (2, 77 + 12, 64)  # CLIP tokens, then T5 tokens (zeros without T5)
    assert cond["pooled_prompt_embeds"].shape == (2, 64)  # both CLIP encoders' pooled outputs
    t5_part = cond["prompt_embeds"][:, 77:]
    assert bool(t5_part.abs().sum() > 0) == with_t5
    assert [type(e).__name__ for e in family.text_encoders()][2:] == (["T5EncoderModel"] if with_t5 else [])


# ----------------------------------------------------------------------------- learning and round trips
def _dpo_config(tmp_path: Path, config_class: type = DiffusionDPOConfig, **overrides) -> DiffusionDPOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=4, max_steps=30, beta=50.0,
        learning_rate=1e-3, logging_steps=10, save_steps=0, eval_noise_draws=4,
    )  # fmt: skip
    values.update(overrides)
    return config_class(**values)


def _sample(pipe, prompt: str = "a warm cat") -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def _load(pipe_class, folder: Path, with_t5: bool = True):
    """A fresh pipeline from `folder`, every module in eval mode (modules built from configs start in train)."""
    extra = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = pipe_class.from_pretrained(folder, **extra)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


CASES = {
    # family: (builder kwargs, objective, extra settings)
    "sd-v_prediction": ("sd", dict(prediction_type="v_prediction"), "dpo", {}),
    "sdxl-text-encoders": ("sdxl", {}, "rpo", dict(train_text_encoder=True, lora_rank=4, lora_alpha=8, beta=200.0)),
    "sd3-t5": ("sd3", dict(with_t5=True), "dpo", dict(max_sequence_length=16)),
    "sd3-no-t5": ("sd3", dict(with_t5=False), "rpo", dict(max_sequence_length=16)),
    "flux-text-encoder": ("flux", {}, "dpo", dict(max_sequence_length=16, train_text_encoder=True)),
}


TEXT_ENCODERS_WITH_LORA = {  # `train_text_encoder` adapts the CLIP encoders, never T5
    "sd": ["text_encoder"],
    "sdxl": ["text_encoder", "text_encoder_2"],
    "sd3": ["text_encoder", "text_encoder_2"],
    "flux": ["text_encoder"],
}


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_text_encoder_lora_targets_the_clip_encoders(builder) -> None:
    encoders = get_family(BUILDERS[builder]()).lora_text_encoders()
    assert sorted(encoders) == TEXT_ENCODERS_WITH_LORA[builder]
    assert all(type(encoder).__name__.startswith("CLIPText") for encoder in encoders.values())


@pytest.mark.parametrize("case", list(CASES))
def test_training_learns_and_the_saved_lora_reproduces_it_on_a_fresh_pipeline(tmp_path, case) -> None:
    builder, build_kwargs, objective, settings = CASES[case]
    pipe = BUILDERS[builder](**build_kwargs)
    base_dir = tmp_path / "base"
    pipe.save_pretrained(base_dir)
    pipe_class, with_t5 = type(pipe), build_kwargs.get("with_t5", True)
    pairs = make_preference_dataset(8)
    if objective == "rpo":
        settings = dict(
            settings, config_class=DiffusionRPOConfig, similarity="text", similarity_model_name_or_path=None
        )
    trainer_class = DiffusionRPOTrainer if objective == "rpo" else DiffusionDPOTrainer
    args = _dpo_config(tmp_path, **settings)
    trainer = trainer_class(_load(pipe_class, base_dir, with_t5), args, pairs, eval_dataset=pairs)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_rewards/margins"] > max(before["eval_rewards/margins"], 0.0)
    assert after["eval_rewards/accuracies"] >= 0.75
    for key in ("eval_ref_loss/chosen", "eval_ref_loss/rejected"):  # the reference (LoRA off everywhere) stays put
        assert after[key] == pytest.approx(before[key], rel=1e-5)

    trained = _sample(trainer.pipe)
    fresh = _load(pipe_class, base_dir, with_t5)
    base = _sample(fresh)
    fresh.load_lora_weights(args.output_dir)
    assert np.array_equal(_sample(fresh), trained)
    assert not np.array_equal(base, trained)
    if settings.get("train_text_encoder"):  # the text encoders' adapters were trained and are in the saved file
        assert sorted(trainer.text_encoders) == TEXT_ENCODERS_WITH_LORA[builder]
        for name, encoder in trainer.text_encoders.items():
            lora_b = [p for key, p in encoder.named_parameters() if "lora_B" in key]
            assert lora_b and any(p.abs().sum() > 0 for p in lora_b), name
            assert getattr(fresh, name).peft_config, name


def test_text_encoder_lora_stays_identical_across_two_processes(tmp_path, launch_two_processes) -> None:
    """Each process sees other rows; the text encoders' gradients are averaged like the denoiser's (DDP)."""
    launch_two_processes("ddp_text_encoder.py", str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(report["world"] == 2 and report["text_encoder_moved"] for report in reports)
    assert reports[0]["text_encoder"] == pytest.approx(reports[1]["text_encoder"], rel=1e-12, abs=1e-12)


class _Stopped(Exception):
    """Stands for a run stopped once its checkpoint is restored."""


class _StopAtBegin(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs) -> None:
        raise _Stopped


def test_checkpoints_hold_and_restore_the_text_encoder_adapters(tmp_path) -> None:
    args = _dpo_config(tmp_path, per_device_train_batch_size=2, max_steps=2, save_steps=2, train_text_encoder=True)
    data = make_preference_dataset(4)
    trained = DiffusionDPOTrainer(tiny_sdxl_pipeline(), args, data)
    trained.train()
    files = {path.name for path in (Path(args.output_dir) / "checkpoint-2").iterdir()}
    assert {"text_encoder_adapter_model.safetensors", "text_encoder_2_adapter_model.safetensors"} <= files

    args.max_steps = 3  # one step more, stopped before it: only the restore happens
    resumed = DiffusionDPOTrainer(tiny_sdxl_pipeline(), args, data, callbacks=[_StopAtBegin()])
    fresh = [p.detach().clone() for p in resumed.text_encoder_parameters]
    with pytest.raises(_Stopped):
        resumed.train(resume_from_checkpoint="latest")
    for saved, restored in zip(trained.text_encoder_parameters, resumed.text_encoder_parameters, strict=True):
        assert torch.equal(saved, restored)
    assert any(not torch.equal(a, b) for a, b in zip(fresh, trained.text_encoder_parameters, strict=True))
