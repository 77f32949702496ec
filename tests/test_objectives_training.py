"""KTO, MaPO, SFT, the SDPO safeguard and NPO on the offline kit: data, learning, saving and reloading."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from diffusion_pref_trainers import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionKTOConfig,
    DiffusionKTOTrainer,
    DiffusionMaPOConfig,
    DiffusionMaPOTrainer,
    DiffusionRPOConfig,
    DiffusionRPOTrainer,
    DiffusionSFTConfig,
    DiffusionSFTTrainer,
    load_negative_adapter,
    negative_guidance,
)
from diffusion_pref_trainers.adapters import lora_config_from_args, lora_layers_for_diffusers
from diffusion_pref_trainers.data import load_image, winners_only
from diffusion_pref_trainers.testing import make_preference_dataset, tiny_sd_pipeline, tiny_sdxl_pipeline

COMMON = dict(resolution=32, learning_rate=1e-3, logging_steps=10, save_steps=0, eval_noise_draws=4)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """The tiny SD pipeline saved to a folder: trainers load it by path, reload tests start from it again."""
    folder = tmp_path_factory.mktemp("base")
    tiny_sd_pipeline().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pairs() -> datasets.Dataset:
    return make_preference_dataset(8)


def _sample(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip
    return out.images


def _assert_round_trip(trainer, base_dir: str, method: str) -> None:
    """The saved LoRA reproduces the trained pipeline's samples in a fresh one, and changes the base model's."""
    from diffusers import StableDiffusionPipeline

    trained = _sample(trainer.pipe)
    fresh = StableDiffusionPipeline.from_pretrained(base_dir)
    base = _sample(fresh)
    fresh.load_lora_weights(trainer.args.output_dir)
    assert np.array_equal(_sample(fresh), trained)
    assert not np.array_equal(base, trained)
    assert method in (Path(trainer.args.output_dir) / "README.md").read_text()


# ------------------------------------------------------------------------------------------------- data
def test_winners_only_views_each_pairs_preferred_image(pairs) -> None:
    rows = winners_only(pairs, "preference")
    assert len(rows) == 8 and rows.column_names == ["prompt", "image"]
    for index in (0, 5):
        assert rows[index]["prompt"] == pairs[index]["prompt"]
        assert np.array_equal(np.asarray(rows[index]["image"]), np.asarray(pairs[index]["chosen"]))


def test_winners_only_reads_pickapic_orientation_and_drops_ties() -> None:
    pickapic = make_preference_dataset(4, schema="pickapic", ties=2)
    preference = make_preference_dataset(4)
    rows = winners_only(pickapic, "pickapic")
    assert len(rows) == 4  # the two ties have no winner
    for index in range(4):  # odd rows store the winner second (label_0 == 0)
        assert np.array_equal(np.asarray(load_image(rows[index]["image"])), np.asarray(preference[index]["chosen"]))


@pytest.mark.parametrize("schema", ["preference", "pickapic"])
def test_streaming_winners_match_the_map_style_ones(schema) -> None:
    pairs = make_preference_dataset(4, schema=schema, ties=1 if schema == "pickapic" else 0)
    streamed = list(winners_only(pairs.to_iterable_dataset(), schema))
    viewed = winners_only(pairs, schema)
    assert len(streamed) == len(viewed) == 4
    for index, got in enumerate(streamed):
        assert got["prompt"] == viewed[index]["prompt"]
        assert np.array_equal(np.asarray(load_image(got["image"])), np.asarray(load_image(viewed[index]["image"])))


def test_kto_reads_labelled_images_and_pairs_and_rejects_unlabelled_ones(tmp_path, base_dir, pairs) -> None:
    labels = [True, False, False, True, False, True]
    unpaired = datasets.Dataset.from_dict(
        {"prompt": pairs["prompt"][:6], "image": pairs["chosen"][:6], "label": labels},
        features=datasets.Features(
            {"prompt": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Value("bool")}
        ),
    )
    args = DiffusionKTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, **COMMON)
    trainer = DiffusionKTOTrainer(base_dir, args, unpaired, eval_dataset=pairs)
    assert [trainer.train_dataset[i]["label"] for i in range(6)] == labels
    assert trainer.train_dataset[0]["pixel_values"].shape == (1, 3, 32, 32)  # one image per row
    assert trainer.eval_dataset[0]["pixel_values"].shape == (2, 3, 32, 32)  # a pair stays one row
    trainer.train()
    logged = trainer.state.log_history
    assert np.isnan(logged[0]["rewards/accuracies"])  # single images have no partner to beat
    assert 0.0 <= logged[-1]["eval_rewards/accuracies"] <= 1.0  # pairs do
    pickapic = make_preference_dataset(4, schema="pickapic", ties=2)
    with_ties = DiffusionKTOConfig(output_dir=str(tmp_path), max_steps=1, drop_ties=False, **COMMON)
    assert len(DiffusionKTOTrainer(base_dir, with_ties, pickapic).train_dataset) == 4  # a tie labels no image
    with pytest.raises(ValueError, match="needs a label per image"):
        DiffusionKTOTrainer(base_dir, args, unpaired.remove_columns("label"))


def test_sft_reads_winners_desirable_rows_and_captions(tmp_path, base_dir, pairs) -> None:
    args = DiffusionSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, **COMMON)
    from_pairs = DiffusionSFTTrainer(base_dir, args, pairs)
    assert len(from_pairs.train_dataset) == 8
    chosen = torch.from_numpy(np.asarray(pairs[3]["chosen"], dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(from_pairs.train_dataset[3]["pixel_values"][0], chosen)
    labelled = datasets.Dataset.from_dict(
        {"prompt": pairs["prompt"][:6], "image": pairs["chosen"][:6], "label": [True, False, True, False, True, False]}
    )
    assert len(DiffusionSFTTrainer(base_dir, args, labelled).train_dataset) == 3  # the desirable rows only
    captioned = labelled.remove_columns("label")
    assert len(DiffusionSFTTrainer(base_dir, args, captioned).train_dataset) == 6


@pytest.mark.parametrize("other_sum,expected", [(0.03, (0.01 - 0.02 + 0.03) / 5), (-0.03, 0.0)])
def test_kto_reference_point_averages_every_process_and_clamps_at_zero(
    tmp_path, base_dir, pairs, other_sum, expected
) -> None:
    trainer = DiffusionKTOTrainer(base_dir, DiffusionKTOConfig(output_dir=str(tmp_path), max_steps=1, **COMMON), pairs)
    reductions = []

    def reduce(tensor: torch.Tensor, reduction: str) -> torch.Tensor:  # a second process holding three images
        reductions.append(reduction)
        return tensor + torch.tensor([other_sum, 3.0])

    trainer.accelerator.reduce = reduce
    rewards = torch.tensor([0.01, -0.02], requires_grad=True)
    kl = trainer.reference_point(rewards)
    assert reductions == ["sum"] and not kl.requires_grad
    assert kl.item() == pytest.approx(expected)


def test_unmeasurable_metrics_are_left_out_of_averages_but_a_nan_loss_shows(tmp_path, base_dir, pairs) -> None:
    args = DiffusionKTOConfig(output_dir=str(tmp_path), max_steps=1, **COMMON)
    trainer = DiffusionKTOTrainer(base_dir, args, pairs)
    logs = trainer._reduce(
        {
            "rewards/rejected": [torch.tensor(float("nan")), torch.tensor(2.0), torch.tensor(4.0)],
            "loss": [torch.tensor(1.0), torch.tensor(float("nan"))],
        }
    )
    assert logs["rewards/rejected"] == pytest.approx(3.0)
    assert np.isnan(logs["loss"])


# --------------------------------------------------------------------------------------------- learning
def test_kto_learns_and_round_trips(tmp_path, base_dir, pairs) -> None:
    args = DiffusionKTOConfig(
        output_dir=str(tmp_path / "kto"), beta=1000.0, per_device_train_batch_size=4, max_steps=40, **COMMON
    )
    trainer = DiffusionKTOTrainer(base_dir, args, pairs, eval_dataset=pairs)
    before = trainer.evaluate()
    assert before["eval_rewards/margins"] == 0.0  # LoRA starts at zero: the policy is the reference
    trainer.train()
    after = trainer.evaluate()
    # The desirable images' implicit reward rose above the undesirable ones', pair by pair.
    assert after["eval_rewards/chosen"] > after["eval_rewards/rejected"]
    assert after["eval_rewards/accuracies"] >= 0.75 > before["eval_rewards/accuracies"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "kl"):
        assert key in trainer.state.log_history[0]
    assert all(entry["kl"] >= 0 for entry in trainer.state.log_history if "kl" in entry)
    _assert_round_trip(trainer, base_dir, "diffusion-kto")


def test_mapo_learns_with_one_forward_and_no_reference(tmp_path, base_dir, pairs) -> None:
    # beta 5 rather than the paper's 0.1: a random-init model has far more to gain from the winners' denoising
    # term than a pretrained one, so the margin term needs more weight to show in 60 steps.
    args = DiffusionMaPOConfig(
        output_dir=str(tmp_path / "mapo"), beta=5.0, per_device_train_batch_size=4, max_steps=60, **COMMON
    )
    trainer = DiffusionMaPOTrainer(base_dir, args, pairs, eval_dataset=pairs)
    calls = []
    handle = trainer.family.denoiser.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    batch = next(trainer._loaders.batches(trainer.train_dataset, 4, 0, shuffle=True))
    model_err, ref_err = trainer.denoising_errors(batch, torch.Generator().manual_seed(0))
    handle.remove()
    assert len(calls) == 1 and ref_err is None and model_err.shape == (8,)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"]
    assert after["eval_rewards/accuracies"] >= 0.75 > before["eval_rewards/accuracies"]
    _assert_round_trip(trainer, base_dir, "diffusion-mapo")


def test_mapo_and_sft_keep_no_frozen_copy_when_fine_tuning_everything(tmp_path, base_dir, pairs) -> None:
    for trainer_class, config_class in (
        (DiffusionMaPOTrainer, DiffusionMaPOConfig),
        (DiffusionSFTTrainer, DiffusionSFTConfig),
    ):
        args = config_class(output_dir=str(tmp_path), use_lora=False, max_steps=1, **COMMON)
        assert trainer_class(base_dir, args, pairs).reference is None
    args = DiffusionDPOConfig(output_dir=str(tmp_path), use_lora=False, max_steps=1, **COMMON)
    assert DiffusionDPOTrainer(base_dir, args, pairs).reference is not None


def test_sft_lowers_the_winners_denoising_error_and_round_trips(tmp_path, base_dir, pairs) -> None:
    args = DiffusionSFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=30, **COMMON)
    trainer = DiffusionSFTTrainer(base_dir, args, pairs, eval_dataset=pairs)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]  # fixed eval noise: the same draws before and after
    _assert_round_trip(trainer, base_dir, "diffusion-sft")


# --------------------------------------------------------------------------------------------- safeguard
def _first_batch(trainer) -> dict:
    batch_size = trainer.args.per_device_train_batch_size
    return next(trainer._loaders.batches(trainer.train_dataset, batch_size, 0, shuffle=True))


def test_safeguard_scales_only_the_losers_gradient_in_the_trainer(tmp_path, pairs) -> None:
    grads, errors, scales = {}, {}, {}
    for safeguard in (False, True):
        args = DiffusionDPOConfig(
            output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, safeguard=safeguard,
            safeguard_mu=0.5, **COMMON,
        )  # fmt: skip
        trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
        with torch.no_grad():  # move off the zero LoRA init so that every adapter weight has a gradient
            for param in trainer.trainable_parameters:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
        model_err, _ = trainer.denoising_errors(_first_batch(trainer), torch.Generator().manual_seed(0))
        errors[safeguard] = model_err.detach()
        for part, half in (("winners", model_err[:4]), ("losers", model_err[4:])):
            flat = torch.autograd.grad(half.sum(), trainer.trainable_parameters, retain_graph=True)
            grads[safeguard, part] = torch.cat([g.flatten() for g in flat])
        scales[safeguard] = trainer._safeguard_scale
    scale = scales[True].item()
    assert scales[False] is None and 0.0 < scale < 1.0  # winner and loser residuals align: lambda bites
    assert torch.equal(errors[True], errors[False])
    assert torch.allclose(grads[True, "winners"], grads[False, "winners"])
    assert torch.allclose(grads[True, "losers"], scale * grads[False, "losers"], atol=1e-7)


def test_safeguard_keeps_the_winners_error_down_where_plain_dpo_raises_it(tmp_path, pairs) -> None:
    chosen_rewards, lambdas = {}, []
    for safeguard in (False, True):
        args = DiffusionDPOConfig(
            output_dir=str(tmp_path / str(safeguard)), beta=200.0, per_device_train_batch_size=4, max_steps=30,
            safeguard=safeguard, **COMMON,
        )  # fmt: skip
        trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)
        trainer.train()
        final = trainer.state.log_history[-1]
        assert "eval_safeguard/lambda" not in final
        chosen_rewards[safeguard] = final["eval_errors/chosen_diff"]  # r_w - m_w: > 0 when the winners improved
        lambdas += [entry["safeguard/lambda"] for entry in trainer.state.log_history if "safeguard/lambda" in entry]
    assert chosen_rewards[False] < 0 < chosen_rewards[True]
    assert len(lambdas) == 3 and all(0.0 < value <= 1.0 for value in lambdas)


def test_rpo_takes_the_safeguard_too(tmp_path, pairs) -> None:
    args = DiffusionRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=2, save_steps=0,
        resolution=32, safeguard=True, safeguard_mu=0.6, similarity="text", similarity_model_name_or_path=None,
    )  # fmt: skip
    trainer = DiffusionRPOTrainer(tiny_sd_pipeline(), args, pairs)
    trainer.train()
    lambdas = [entry["safeguard/lambda"] for entry in trainer.state.log_history]
    assert len(lambdas) == 2 and all(0.0 < value <= 1.0 for value in lambdas)


@pytest.mark.parametrize("mu", [-0.1, 1.5])
def test_safeguard_mu_is_validated(tmp_path, mu) -> None:
    with pytest.raises(ValueError, match="safeguard_mu"):
        DiffusionDPOConfig(output_dir=str(tmp_path), safeguard=True, safeguard_mu=mu)


# --------------------------------------------------------------------------------------------------- NPO
def _capture_first_call(denoiser) -> tuple[dict, object]:
    """A forward hook keeping the inputs and output of the denoiser's first call."""
    seen: dict = {}

    def hook(module, args, kwargs, output):
        if not seen:
            seen.update(args=args, kwargs=kwargs, output=output[0] if isinstance(output, tuple) else output.sample)

    return seen, denoiser.register_forward_hook(hook, with_kwargs=True)


def _halves(value, part: slice, batch: int):
    if isinstance(value, torch.Tensor):
        return value[part] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: _halves(item, part, batch) for key, item in value.items()}
    return value


def _check_negative_guidance(make_pipe, negative_dir: str) -> None:
    """NPO sampling: the unconditional half runs with the negative adapter only, the conditional half without."""
    pipe = make_pipe()
    plain = _sample(pipe, guidance_scale=5.0)
    seen, handle = _capture_first_call(pipe.unet)
    with negative_guidance(pipe, negative_dir):
        guided = _sample(pipe, guidance_scale=5.0)
        with pytest.raises(ValueError, match="guidance_scale > 1"):
            _sample(pipe, guidance_scale=1.0)
    handle.remove()
    assert not np.array_equal(plain, guided)
    assert np.array_equal(_sample(pipe, guidance_scale=5.0), plain)  # the pipeline is restored on exit
    sample = seen["args"][0]
    batch, half = sample.shape[0], sample.shape[0] // 2
    negative, positive = make_pipe(), make_pipe()
    negative.load_lora_weights(negative_dir)
    expected = []
    for reference, part in ((negative, slice(0, half)), (positive, slice(half, batch))):
        args = [_halves(a, part, batch) for a in seen["args"]]
        kwargs = {key: _halves(value, part, batch) for key, value in seen["kwargs"].items()}
        with torch.no_grad():
            out = reference.unet(*args, **kwargs)
        expected.append(out[0] if isinstance(out, tuple) else out.sample)
    assert torch.allclose(seen["output"], torch.cat(expected), atol=1e-6)


def test_npo_negative_adapter_trains_on_swapped_pairs_and_guides_sd(tmp_path, pairs) -> None:
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path / "npo"), beta=200.0, per_device_train_batch_size=4, max_steps=30,
        swap_preferences=True, **COMMON,
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)
    rejected = torch.from_numpy(np.asarray(pairs[0]["rejected"], dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(trainer.train_dataset[0]["pixel_values"][0], rejected)  # the loser is trained as winner
    trainer.train()
    # In the swapped orientation the adapter prefers the rejected images: the original preference is reversed.
    assert trainer.state.log_history[-1]["eval_rewards/accuracies"] >= 0.75
    _check_negative_guidance(tiny_sd_pipeline, args.output_dir)


def test_negative_guidance_on_sdxl_and_with_a_loaded_adapter(tmp_path) -> None:
    from diffusers import StableDiffusionXLPipeline

    donor = tiny_sdxl_pipeline()
    config = lora_config_from_args(4, 4, 0.0, ["to_q", "to_k", "to_v", "to_out.0"])
    config.init_lora_weights = False  # random A and B: the adapter changes the outputs at once
    torch.manual_seed(0)
    donor.unet.add_adapter(config)
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=lora_layers_for_diffusers(donor.unet))
    _check_negative_guidance(tiny_sdxl_pipeline, str(tmp_path))

    pipe = tiny_sdxl_pipeline()
    plain = _sample(pipe, guidance_scale=5.0)
    name = load_negative_adapter(pipe, str(tmp_path))
    assert np.array_equal(_sample(pipe, guidance_scale=5.0), plain)  # loaded but inactive
    with negative_guidance(pipe, name):
        guided = _sample(pipe, guidance_scale=5.0)
    with negative_guidance(pipe, name):
        assert np.array_equal(_sample(pipe, guidance_scale=5.0), guided)
    assert not np.array_equal(guided, plain)
    assert np.array_equal(_sample(pipe, guidance_scale=5.0), plain)


def test_negative_guidance_refuses_pipelines_without_a_unet() -> None:
    class NoUnet:
        pass

    with pytest.raises(ValueError, match="no `unet`"), negative_guidance(NoUnet(), "x"):
        pass
