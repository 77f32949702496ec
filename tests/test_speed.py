"""The speed switches (`channels_last`, `torch_compile`) change how the denoiser runs, never what it computes."""

from __future__ import annotations

import logging

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from diffusion_pref_trainers import DiffusionDPOConfig, DiffusionDPOTrainer, speed
from diffusion_pref_trainers.data import collate
from diffusion_pref_trainers.testing import (
    make_preference_dataset,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)

LOGGED = ("loss", "model_loss/chosen", "model_loss/rejected", "grad_norm")


def _train(pairs, make_config, **switches) -> tuple[list[dict], torch.Tensor, DiffusionDPOTrainer]:
    """Two logged DPO steps on the tiny pipeline; returns the logs, the adapter update (all weights, flattened:
    trained minus initial) and the trainer. Each run replaces the previous one's output (same folder)."""
    config = make_config(**switches, overwrite_output_dir=True)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), config, pairs)
    before = _adapter_weights(trainer)
    trainer.train()
    logs = trainer.state.log_history
    return logs, _adapter_weights(trainer) - before, trainer


def _adapter_weights(trainer: DiffusionDPOTrainer) -> torch.Tensor:
    """Every LoRA weight of the denoiser, in peft's key order, as one flat vector."""
    return torch.cat(
        [value.detach().flatten() for value in get_peft_model_state_dict(trainer.family.denoiser).values()]
    )


def _assert_same_training(logs, update, ref_logs, ref_update, rtol: float) -> None:
    """Same logged metrics at every step, up to `rtol`, and the same adapter update.

    Adam turns gradient elements near zero into steps of about +-lr, so a few single weights may differ by
    rounding (measured with channels-last, 1 thread: 42 of 19,968 by more than 1e-5, up to 2.0e-4, after 2 steps at
    lr 1e-3; the whole update by 0.23 % of its norm); the update as a whole must agree to 2 % of its norm.
    """
    assert [log["step"] for log in logs] == [log["step"] for log in ref_logs] == [1, 2]
    for log, ref in zip(logs, ref_logs, strict=True):
        for key in LOGGED:
            assert log[key] == pytest.approx(ref[key], rel=rtol, abs=1e-8), (log["step"], key, log[key], ref[key])
    assert ref_update.norm() > 0
    assert (update - ref_update).norm() <= 0.02 * ref_update.norm()


def test_channels_last_lays_out_the_unet_weights_and_keeps_its_outputs(pairs, make_config) -> None:
    eager = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), pairs)
    fast = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(channels_last=True), pairs)
    convs = [m for m in fast.family.denoiser.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not all(m.weight.is_contiguous() for m in convs)  # the layout really changed
    batch = collate([eager.train_dataset[index] for index in range(4)])
    for with_grad in (True, False):
        expected = eager.denoising_errors(batch, torch.Generator().manual_seed(0), with_grad=with_grad)
        got = fast.denoising_errors(batch, torch.Generator().manual_seed(0), with_grad=with_grad)
        for value, reference in zip(got, expected, strict=True):
            torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-7)


def test_channels_last_trains_like_the_default_layout(pairs, make_config) -> None:
    ref_logs, ref_update, _ = _train(pairs, make_config)
    logs, update, _ = _train(pairs, make_config, channels_last=True)
    # other conv kernels sum in another order: the gradient norm moved by 1.1e-5 (relative) in one run
    _assert_same_training(logs, update, ref_logs, ref_update, rtol=1e-4)


def test_compiled_denoiser_trains_to_the_same_losses_and_weights(pairs, make_config) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref_logs, ref_update, _ = _train(pairs, make_config)
    logs, update, trainer = _train(pairs, make_config, torch_compile=True, torch_compile_backend="aot_eager")
    assert trainer.family.denoiser._compiled_call_impl is not None  # the module's own call is the compiled one
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # policy (adapters on) and reference (off)
    _assert_same_training(logs, update, ref_logs, ref_update, rtol=1e-5)


def test_inductor_on_cpu_warns_about_its_measured_gradients(pairs, make_config, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="diffusion_pref_trainers.speed"):
        trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(torch_compile=True), pairs)  # compiles lazily
    assert trainer.family.denoiser._compiled_call_impl is not None
    assert (speed.CPU_INDUCTOR_WARNING in caplog.messages) == (trainer.accelerator.device.type == "cpu")


# Inductor generates and compiles C++ kernels: this took 114 s on this project's CPU machine (1 thread).
@pytest.mark.slow
@pytest.mark.xfail(
    not torch.cuda.is_available(),
    reason="torch 2.13's inductor CPU backend gives wrong gradients for the tiny UNet (with or without LoRA; measured: "
    "32 of 64 LoRA gradients differ, the mid block's are zero) while eager and aot_eager agree",
    strict=True,
)
def test_inductor_compiled_denoiser_trains_to_the_same_losses(pairs, make_config) -> None:
    torch._dynamo.reset()
    ref_logs, ref_update, _ = _train(pairs, make_config)
    logs, update, _ = _train(pairs, make_config, torch_compile=True)
    _assert_same_training(logs, update, ref_logs, ref_update, rtol=1e-3)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(torch_compile=True, torch_compile_mode="fastest"), r"`torch_compile_mode='fastest'` is not supported"),
        (dict(torch_compile_mode="max-autotune"), r"set `torch_compile=True` as well"),
        (dict(torch_compile=True, torch_compile_backend="tpu-magic"), r"`torch_compile_backend='tpu-magic'` is not"),
        (dict(torch_compile_backend="aot_eager"), r"set `torch_compile=True` as well"),
        (
            dict(torch_compile=True, torch_compile_backend="aot_eager", torch_compile_mode="max-autotune"),
            r"`torch_compile_mode` is an inductor setting",
        ),
    ],
)
def test_bad_compile_settings_fail_at_config_time(tmp_path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        DiffusionDPOConfig(output_dir=str(tmp_path), **overrides)


def test_eager_attention_swaps_the_unet_processors_and_trains_like_sdpa(pairs, make_config) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    ref_logs, ref_update, ref = _train(pairs, make_config)
    logs, update, eager = _train(pairs, make_config, attention_backend="eager")
    assert {type(p) for p in ref.family.denoiser.attn_processors.values()} == {AttnProcessor2_0}
    assert {type(p) for p in eager.family.denoiser.attn_processors.values()} == {AttnProcessor}
    _assert_same_training(logs, update, ref_logs, ref_update, rtol=1e-4)  # the same attention, summed otherwise


def test_dispatcher_backend_reaches_flux_attention_and_keeps_its_outputs(tmp_path) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    errors, trainers = [], []
    for backend in ("sdpa", "_native_math"):
        args = DiffusionDPOConfig(output_dir=str(tmp_path / backend), resolution=32, per_device_train_batch_size=2,
                                  attention_backend=backend, max_sequence_length=8)  # fmt: skip
        trainers.append(DiffusionDPOTrainer(tiny_flux_pipeline(), args, make_preference_dataset(2)))
        batch = collate([trainers[-1].train_dataset[i] for i in range(2)])
        errors.append(trainers[-1].denoising_errors(batch, torch.Generator().manual_seed(0), with_grad=False))
    default, dispatched = (trainer.family.denoiser.attn_processors.values() for trainer in trainers)
    assert {p._attention_backend for p in default} == {None}  # diffusers' default: SDPA
    assert {p._attention_backend for p in dispatched} == {AttentionBackendName._NATIVE_MATH}
    for got, expected in zip(errors[1], errors[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "builder,backend,message",
    [(tiny_sd3_pipeline, "eager", "made for UNets"), (tiny_sd_pipeline, "_native_math", "calls PyTorch's SDPA")],
)
def test_attention_backends_a_denoiser_would_ignore_are_refused_before_training(tmp_path, builder, backend, message):
    args = DiffusionDPOConfig(output_dir=str(tmp_path), resolution=32, attention_backend=backend)
    with pytest.raises(ValueError, match=message):
        DiffusionDPOTrainer(builder(), args, make_preference_dataset(2))


def test_unknown_attention_backend_fails_at_config_time(tmp_path) -> None:
    with pytest.raises(ValueError, match="attention_backend='fused'.*choose one of sdpa, eager, flash"):
        DiffusionDPOConfig(output_dir=str(tmp_path), attention_backend="fused")
