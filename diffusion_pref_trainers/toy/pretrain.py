"""Pretrain the toy pipeline on the toy world: ``python -m diffusion_pref_trainers.toy.pretrain [--output-dir D]``.

Three seeded stages on rendered scenes: (1) the VAE learns to reconstruct 64 px images through 16 px latents;
(2) every training image is encoded once and the latent scale is set to unit variance, as Stable Diffusion's
``scaling_factor`` does; (3) the UNet and the text encoder learn v-prediction together on captions that
leave each attribute out with probability ``omit_prob`` (so partial prompts work, and tasks can act on what a
prompt leaves open) and are empty with probability ``empty_prob`` (for classifier-free guidance). The weights
are an exponential moving average of the UNet's and the text encoder's. The script ends by measuring prompt
fidelity on held-out captions and writes it with the settings to ``pretrain_report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_pref_trainers.toy.model import PIPELINE_DIR, RESOLUTION, untrained_toy_pipeline
from diffusion_pref_trainers.toy.world import ATTRIBUTE_VALUES, Attributes, caption, render, sample_attributes

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Settings of a pretraining run; the defaults are those of the shipped pipeline."""

    seed: int = 0
    num_images: int = 12288
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    vae_crop: int = 32
    foreground_weight: float = 5.0
    kl_weight: float = 1e-6
    unet_steps: int = 4000
    unet_batch_size: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    omit_prob: float = 0.2
    empty_prob: float = 0.1
    eval_prompts: int = 96
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    threads: int = 1


def render_scenes(n: int, rng: np.random.Generator) -> tuple[list[Attributes], torch.Tensor]:
    """``n`` random scenes with jitter, as images in [-1, 1] of shape (n, 3, 64, 64)."""
    scenes = [sample_attributes(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(render(scene, RESOLUTION, rng)) for scene in scenes])
    return scenes, torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_caption(scene: Attributes, rng: np.random.Generator, omit_prob: float, empty_prob: float) -> str:
    """The caption a training image is shown with: empty, or with each attribute left out at random."""
    if rng.random() < empty_prob:
        return ""
    return caption(scene, [name for name in ATTRIBUTE_VALUES if rng.random() < omit_prob])


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def foreground(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) mask of pixels that differ from the top-left corner (the background)."""
    return ((images - images[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()


def train_vae(vae: Any, images: torch.Tensor, config: PretrainConfig, generator: torch.Generator) -> list[float]:
    """Reconstruction (L1 + MSE, shape pixels weighted ``foreground_weight`` x) plus a small KL term.

    The shape covers a few percent of an image, yet its colour and texture are what the detectors read, so its
    pixels weigh more. The VAE is convolutional, so it trains on ``vae_crop`` px crops (4x cheaper at 32 px) and
    runs on whole images; crop offsets are multiples of 4 px so stripes and dots keep their phase on the latent
    grid.
    """
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 50, config.vae_steps))
    vae.train()
    losses = []
    for step in range(config.vae_steps):
        top, left = (4 * torch.randint((RESOLUTION - config.vae_crop) // 4 + 1, (2,), generator=generator)).tolist()
        rows = torch.randint(len(images), (config.vae_batch_size,), generator=generator)
        weight = 1.0 + (config.foreground_weight - 1.0) * foreground(images[rows])
        crop = (slice(None), slice(None), slice(top, top + config.vae_crop), slice(left, left + config.vae_crop))
        batch, weight = images[rows][crop], weight[crop]
        posterior = vae.encode(batch).latent_dist
        error = vae.decode(posterior.sample(generator)).sample - batch
        loss = (weight * (error.abs() + error.square())).mean() + config.kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == config.vae_steps - 1:
            logger.info("vae step %d/%d loss %.4f", step + 1, config.vae_steps, np.mean(losses[-100:]))
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_all(vae: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of every image, scaled to unit variance; the scale is written into the VAE config."""
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in chunks])
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    return latents * scale


def attribute_hits(images: Any, expected: list[dict[str, str]]) -> dict[str, float]:
    """Per attribute, the share of images whose detected value is the expected one."""
    from diffusion_pref_trainers.toy.world import detect_attributes

    found = [detect_attributes(image) for image in images]
    return {
        name: float(np.mean([f[name] == e[name] for f, e in zip(found, expected, strict=True)]))
        for name in ATTRIBUTE_VALUES
    }


@torch.no_grad()
def reconstruction_fidelity(vae: Any, n: int, seed: int) -> dict[str, float]:
    """Per attribute, the share the detectors read back from VAE reconstructions of ``n`` fresh scenes."""
    scenes, images = render_scenes(n, np.random.default_rng(seed))
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    pixels = recon.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return attribute_hits(pixels, [scene.as_dict() for scene in scenes])


def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * params``, in place."""
    torch._foreach_lerp_(ema, params, 1.0 - decay)


def train_denoiser(
    pipe: Any, latents: torch.Tensor, scenes: list[Attributes], config: PretrainConfig, seed: int
) -> list[float]:
    """V-prediction training of the UNet and the text encoder together; both end holding their EMA."""
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    modules = [pipe.unet.train(), pipe.text_encoder.train()]
    params = [p for module in modules for p in module.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.unet_steps)
    )
    losses = []
    for step in range(config.unet_steps):
        index = torch.from_numpy(rng.integers(len(latents), size=config.unet_batch_size))
        texts = [training_caption(scenes[i], rng, config.omit_prob, config.empty_prob) for i in index.tolist()]
        ids = pipe.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(pipe.scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = pipe.scheduler.add_noise(clean, noise, t)
        prediction = pipe.unet(noisy, t, pipe.text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, pipe.scheduler.get_velocity(clean, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, [p.detach() for p in params], config.ema_decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == config.unet_steps - 1:
            logger.info("denoiser step %d/%d loss %.4f", step + 1, config.unet_steps, np.mean(losses[-100:]))
    with torch.no_grad():
        for param, average in zip(params, ema, strict=True):
            param.copy_(average)
    for module in modules:
        module.eval().requires_grad_(False)
    return losses


def measure_fidelity(pipe: Any, config: PretrainConfig) -> dict[str, Any]:
    """Prompt fidelity of generations for held-out random captions (seeds apart from training)."""
    from diffusion_pref_trainers.evaluation import generate

    rng = np.random.default_rng(config.seed + 10_000)
    scenes = [sample_attributes(rng) for _ in range(config.eval_prompts)]
    images = generate(
        pipe, [caption(scene) for scene in scenes], [config.seed], batch_size=32,
        num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
    )  # fmt: skip
    per_attribute = attribute_hits([row[0] for row in images], [scene.as_dict() for scene in scenes])
    return {"prompt_fidelity": float(np.mean(list(per_attribute.values()))), "per_attribute": per_attribute}


def pretrain(config: PretrainConfig, output_dir: str | Path = PIPELINE_DIR) -> dict[str, Any]:
    """Run the three stages, save the pipeline (safetensors) and its report into ``output_dir``."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    pipe = untrained_toy_pipeline(config.seed)
    scenes, images = render_scenes(config.num_images, np.random.default_rng(config.seed))
    vae_losses = train_vae(pipe.vae, images, config, torch.Generator().manual_seed(config.seed + 1))
    vae_minutes = (time.perf_counter() - started) / 60
    vae_fidelity = reconstruction_fidelity(pipe.vae, 128, config.seed + 20_000)
    logger.info("vae reconstruction fidelity %s", vae_fidelity)
    latents = encode_all(pipe.vae, images)
    unet_losses = train_denoiser(pipe, latents, scenes, config, config.seed + 2)
    train_minutes = (time.perf_counter() - started) / 60
    pipe.set_progress_bar_config(disable=True)
    fidelity = measure_fidelity(pipe, config)
    report = {
        "config": asdict(config),
        "vae_final_loss": float(np.mean(vae_losses[-100:])),
        "denoiser_final_loss": float(np.mean(unet_losses[-100:])),
        "vae_reconstruction_fidelity": float(np.mean(list(vae_fidelity.values()))),
        "vae_reconstruction_per_attribute": vae_fidelity,
        "vae_minutes": round(vae_minutes, 2),
        "train_minutes": round(train_minutes, 2),
        "total_minutes": round((time.perf_counter() - started) / 60, 2),
        "torch_version": torch.__version__,
        **fidelity,
    }
    pipe.save_pretrained(output_dir, safe_serialization=True)
    Path(output_dir, "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("saved the toy pipeline to %s: %s", output_dir, json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> None:
    """Command line: every :class:`PretrainConfig` field is a ``--flag``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(PIPELINE_DIR))
    for name, value in asdict(PretrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    output_dir = args.pop("output_dir")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pretrain(PretrainConfig(**args), output_dir)


if __name__ == "__main__":
    main()
