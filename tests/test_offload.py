"""`offload_cached_encoders`: which encoders a cached run leaves idle, moving them, and training and rendering with
them offloaded. Without a GPU, the meta device stands in for the place they are moved to: a module there has no
data, so any computation that read it would fail."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion_pref_trainers import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionRPOConfig,
    DiffusionRPOTrainer,
    TrainerCallback,
    cache,
    hub,
)
from diffusion_pref_trainers.evaluation.grid import HEADER_HEIGHT, LABEL_WIDTH, PADDING
from diffusion_pref_trainers.families import get_family
from diffusion_pref_trainers.offload import EncoderOffload, modules_to_offload
from diffusion_pref_trainers.testing import (
    make_preference_dataset,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

META = torch.device("meta")


def _devices(module: torch.nn.Module) -> set[str]:
    """The device types of a module's parameters and buffers."""
    return {tensor.device.type for tensor in [*module.parameters(), *module.buffers()]}


@pytest.mark.parametrize("build", [tiny_sdxl_pipeline, tiny_sd3_pipeline], ids=["sdxl", "sd3"])
def test_chooser_takes_the_vae_and_the_text_encoders_only_when_caching_leaves_them_idle(tmp_path, build) -> None:
    pipe = build()
    encoders = [pipe.text_encoder, pipe.text_encoder_2] + (
        [pipe.text_encoder_3] if hasattr(pipe, "text_encoder_3") else []
    )

    def chosen(trained: bool = False, **settings) -> list[torch.nn.Module]:
        args = DiffusionDPOConfig(output_dir=str(tmp_path), center_crop=True, **settings)
        return modules_to_offload(get_family(pipe, args), args, trained_text_encoders=trained)

    assert [id(m) for m in chosen(cache_latents=True)] == [id(m) for m in [pipe.vae, *encoders]]
    # Trained CLIP encoders leave prompts uncached: every text encoder (T5 too) runs each step, only the VAE idles.
    assert [id(m) for m in chosen(True, cache_latents=True)] == [id(pipe.vae)]
    assert chosen(cache_latents=False) == []
    assert chosen(cache_latents=True, offload_cached_encoders=False) == []


def test_offload_and_restore_move_parameters_and_buffers_and_on_device_only_when_offloaded() -> None:
    pipe = tiny_sd_pipeline()
    idle = [pipe.vae, pipe.text_encoder]
    offload = EncoderOffload(idle, device=torch.device("cpu"), offload_device=META)
    offload.offload()
    assert offload.offloaded and all(_devices(module) == {"meta"} for module in idle)
    assert _devices(pipe.unet) == {"cpu"}
    assert pipe.vae.dtype == torch.float32  # the dtype stays

    pipe = tiny_sd_pipeline()
    offload = EncoderOffload([pipe.vae], device=META)
    with offload.on_device():  # not offloaded: nothing moves
        assert _devices(pipe.vae) == {"cpu"}
    offload.restore()
    assert not offload.offloaded and _devices(pipe.vae) == {"meta"}


def test_on_device_brings_offloaded_encoders_to_the_device_for_the_block_and_offloads_them_after() -> None:
    pipe = tiny_sd_pipeline()
    offload = EncoderOffload([pipe.vae], device=META)  # offloaded to the CPU, where it already is
    offload.offload()
    # A meta tensor holds no data to copy back to the CPU: the error shows that the block's end moves the VAE there.
    with pytest.raises(NotImplementedError, match="meta"):
        with offload.on_device():
            assert _devices(pipe.vae) == {"meta"}


class DeviceRecorder(TrainerCallback):
    """The device types of a module's tensors at each step's end."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.at_steps = module, []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.at_steps.append(_devices(self.module))


@pytest.mark.parametrize(
    "method, train_text_encoder",
    [("dpo", False), ("dpo", True), ("rpo", False)],
    ids=["dpo", "dpo-trained-text-encoder", "rpo-pipeline-text-similarity"],
)
def test_cached_training_and_evaluation_never_read_the_offloaded_encoders(
    tmp_path, pairs, method, train_text_encoder
) -> None:
    """Encoders moved to the meta device for the whole run (restoring to it too): steps, evaluations and checkpoints
    still run and learn, so nothing read them; trained text encoders stay where they are, and train."""
    common = dict(
        output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=4, max_steps=2, beta=50.0,
        learning_rate=1e-2, logging_steps=1, save_steps=1, eval_steps=1, eval_noise_draws=1, cache_latents=True,
        cache_dir=str(tmp_path / "cache"), train_text_encoder=train_text_encoder,
    )  # fmt: skip
    if method == "dpo":
        trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), DiffusionDPOConfig(**common), pairs, eval_dataset=pairs)
    else:  # RPO's similarity from the pipeline's text encoder: its embeddings are cached
        args = DiffusionRPOConfig(**common, similarity="text", similarity_model_name_or_path=None)
        trainer = DiffusionRPOTrainer(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)
    pipe = trainer.pipe
    text_before = {name: p.detach().clone() for name, p in pipe.text_encoder.named_parameters() if p.requires_grad}
    trainer.encoder_offload.device = trainer.encoder_offload.offload_device = META
    recorder = DeviceRecorder(pipe.vae)
    trainer.add_callback(recorder)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(losses) == 2 and len(evals) == 2 and all(math.isfinite(value) for value in losses + evals)
    assert recorder.at_steps == [{"meta"}, {"meta"}]  # offloaded while it trained
    assert _devices(pipe.vae) == {"meta"} and _devices(pipe.unet) == {"cpu"}
    assert Path(trainer.args.output_dir, "pytorch_lora_weights.safetensors").is_file()
    if train_text_encoder:
        assert _devices(pipe.text_encoder) == {"cpu"}
        trained = dict(pipe.text_encoder.named_parameters())
        assert text_before and any(not torch.equal(trained[name], value) for name, value in text_before.items())
    else:
        assert _devices(pipe.text_encoder) == {"meta"}


class OffloadRecorder(TrainerCallback):
    """Whether the encoders were offloaded at each step's end, and around a new dataset's evaluation at the first."""

    def __init__(self, trainer, extra_eval) -> None:
        self.trainer, self.extra_eval, self.at_steps, self.around_eval, self.metrics = trainer, extra_eval, [], [], None

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.at_steps.append(self.trainer.encoder_offload.offloaded)
        if self.metrics is None:
            self.metrics = self.trainer.evaluate(self.extra_eval)
            self.around_eval.append(self.trainer.encoder_offload.offloaded)


def test_a_cached_run_offloads_while_training_and_renders_its_samples_with_the_encoders_back(
    tmp_path, pairs, monkeypatch
) -> None:
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=4, max_steps=2, beta=50.0,
        learning_rate=1e-2, logging_steps=1, save_steps=0, cache_latents=True, cache_dir=str(tmp_path / "cache"),
        validation_prompts=["a red cat"], num_validation_images=1, validation_inference_steps=2,
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    assert len(trainer.encoder_offload.modules) == 2  # the VAE and the one text encoder
    offloaded_at: dict[str, list[bool]] = {"render": [], "cache_build": []}

    def recording(record: str, function):
        def wrapper(*call_args, **kwargs):
            offloaded_at[record].append(trainer.encoder_offload.offloaded)
            return function(*call_args, **kwargs)

        return wrapper

    monkeypatch.setattr(hub, "render_samples", recording("render", hub.render_samples))
    monkeypatch.setattr(cache, "cache_dataset", recording("cache_build", cache.cache_dataset))
    recorder = OffloadRecorder(trainer, make_preference_dataset(4, seed=5))
    trainer.add_callback(recorder)
    trainer.train()

    assert recorder.at_steps == [True, True]
    # A new dataset's cache is built with the encoders on the device, and they are offloaded again after.
    assert offloaded_at["cache_build"] == [False] and recorder.around_eval == [True]
    assert math.isfinite(recorder.metrics["eval_loss"])
    assert offloaded_at["render"] == [False] and not trainer.encoder_offload.offloaded
    grid = Image.open(Path(args.output_dir, hub.SAMPLES_FILE))
    assert grid.size == (LABEL_WIDTH + 2 * (32 + PADDING), HEADER_HEIGHT + 32 + PADDING)  # base and aligned, 1 row
    assert hub.SAMPLES_FILE in Path(args.output_dir, "README.md").read_text()
    assert len([entry for entry in trainer.state.log_history if "loss" in entry]) == 2


def test_validation_steps_render_with_the_encoders_back_and_the_denoiser_in_eval_mode(
    tmp_path, pairs, monkeypatch
) -> None:
    pytest.importorskip("tensorboard", reason="the `tracking` extra: pip install -e '.[tracking]'")
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=4, max_steps=2, beta=50.0,
        save_steps=0, cache_latents=True, cache_dir=str(tmp_path / "cache"), validation_prompts=["a red cat"],
        num_validation_images=1, validation_inference_steps=2, validation_steps=1, report_to="tensorboard",
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    during: list[tuple[bool, bool]] = []
    render = hub.render_comparison

    def recording(*call_args, **kwargs):
        during.append((trainer.encoder_offload.offloaded, trainer._unwrapped.training))
        return render(*call_args, **kwargs)

    monkeypatch.setattr(hub, "render_comparison", recording)
    recorder = OffloadRecorder(trainer, make_preference_dataset(4, seed=5))
    trainer.add_callback(recorder)
    trainer.train()

    assert during == [(False, False), (False, False)]  # step 1, and the end (step 2): encoders back, eval mode
    assert recorder.at_steps == [True, True]  # offloaded again, and training, once step 1's images are logged


class FailingStep(TrainerCallback):
    """Records whether the encoders were offloaded and the loaders kept at the first step's end, then fails."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.during = (self.trainer.encoder_offload.offloaded, bool(self.trainer._loaders.kept))
        raise RuntimeError("a step failed")


def test_a_failing_step_gives_the_encoders_back_and_ends_the_loaders(tmp_path, pairs) -> None:
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=2, max_steps=2, save_steps=0,
        cache_latents=True, cache_dir=str(tmp_path / "cache"), dataloader_num_workers=1,
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    failing = FailingStep(trainer)
    trainer.add_callback(failing)
    with pytest.raises(RuntimeError, match="a step failed"):
        trainer.train()
    assert failing.during == (True, True)  # offloaded, with a kept loader (and its worker), while it trained
    assert not trainer.encoder_offload.offloaded and not trainer._loaders.kept
