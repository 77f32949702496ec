"""What every model family provides to the training loop.

The loop (`trainers/base.py`) and the objectives (`losses.py`) never ask which family they train: a
family encodes prompts and images, draws timesteps, noises latents and builds the target, and calls
the denoiser with the inputs its architecture needs. Adding a family means one subclass here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from diffusion_pref_trainers.adapters import lora_layers_for_diffusers
from diffusion_pref_trainers.configs import DiffusionTrainingConfig


class ModelFamily(ABC):
    """A diffusers pipeline seen as a trainable denoiser plus frozen encoders."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    denoiser_attr: ClassVar[str] = "unet"
    default_beta: ClassVar[float] = 5000.0
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    # Pipeline attributes of the CLIP text encoders that `train_text_encoder` adapts (never T5: too large).
    lora_text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")

    def __init__(self, pipe: Any, config: DiffusionTrainingConfig | None = None) -> None:
        self.pipe = pipe
        # The training config (for families with settings of their own); None means its defaults.
        self.config = config if config is not None else DiffusionTrainingConfig()

    @property
    def denoiser(self) -> nn.Module:
        """The network that is trained (UNet or transformer)."""
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side: resolutions must be a multiple of it."""
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def resolution_multiple(self) -> int:
        """Training resolutions must be a multiple of this (the VAE factor, times patching if any)."""
        return self.vae_scale_factor

    @property
    def default_resolution(self) -> int:
        """The square size the pipeline generates at by default: its sample size (the pipeline's
        `default_sample_size` where it has one, else the denoiser's `sample_size`) times the VAE factor."""
        size = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        if size is None:
            raise ValueError(
                f"The {type(self.denoiser).__name__} config states no `sample_size`, so the pipeline has no size of "
                "its own: set `resolution`."
            )
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def frozen_modules(self) -> list[nn.Module]:
        """Encoders that are never trained: they get frozen and cast to the compute dtype."""
        return [self.pipe.vae, *self.text_encoders()]

    @abstractmethod
    def text_encoders(self) -> list[nn.Module]:
        """The pipeline's text encoders that are present (absent optional ones are skipped)."""

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents (the VAE posterior mean, so caching changes nothing)."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompt conditioning, one entry per prompt along dim 0 (cacheable per row).

        Runs under the caller's grad mode: the trainer enables gradients only to train text-encoder LoRA.
        """

    @abstractmethod
    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw `n` training timesteps on the CPU from `generator` (deterministic, resumable)."""

    @abstractmethod
    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noised latents fed to the denoiser and the regression target of `docs/model_families.md`."""

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of the denoising error at `timesteps` (all 1 unless the family weights them)."""
        return torch.ones(timesteps.shape[0], device=timesteps.device)

    @abstractmethod
    def predict(
        self,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        image_info: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Run the denoiser; `cond` is per image, `image_info` holds per-image sizes/crops if any."""

    def lora_text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders `train_text_encoder` puts LoRA on, by pipeline attribute (absent ones skipped)."""
        encoders = {name: getattr(self.pipe, name, None) for name in self.lora_text_encoder_attrs}
        return {name: encoder for name, encoder in encoders.items() if encoder is not None}

    def lora_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """A module's adapter weights keyed as this pipeline's LoRA loader reads them (UNet pipelines: diffusers')."""
        return lora_layers_for_diffusers(module)

    def save_lora_weights(self, output_dir: str, modules: dict[str, nn.Module]) -> None:
        """Write the adapters of `modules` (pipeline attribute -> adapted module) with the pipeline's own
        `save_lora_weights`, so that `pipe.load_lora_weights(output_dir)` restores them on a fresh pipeline.

        Each adapter's LoRA config goes along as metadata: without it the loader assumes alpha = rank.
        """
        kwargs: dict[str, Any] = {}
        for name, module in modules.items():
            kwargs[f"{name}_lora_layers"] = self.lora_state_dict(module)
            kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        self.pipe.save_lora_weights(output_dir, **kwargs)
