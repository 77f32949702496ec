"""The models the benchmarks train: the offline test kit, and a Stable Diffusion 1.5-shaped kit scaled down for CPUs.

The tiny kit (`testing.tiny_sd_pipeline`) is so small that Python overhead and the process dominate its step.
The SD1.5-shaped kit keeps SD1.5's architecture (UNet: 4 blocks, 2 layers a block, cross-attention in three;
VAE: 4 blocks, 2 layers a block; CLIP text encoder: 12 layers, 77 tokens) with every width divided by
`divisor`, random weights built from configs. At 128 px with `divisor=8` its cost proportions are SD1.5's at
512 px: FLOPs counted with `FlopCounterMode` (`sd15_flop_shares`) give the VAE encode 27 % of a straightforward
DPO step's FLOPs against 26 % for the full-size model, so caching latents saves what it saves at full size.
"""

from __future__ import annotations

from typing import Any

import torch

SD15_UNET_WIDTHS = (320, 640, 1280, 1280)
SD15_VAE_WIDTHS = (128, 256, 512, 512)
SD15_TEXT_WIDTH = 768
# Each kit's name, what it is, and the resolution the benchmarks run it at by default.
KITS = {
    "tiny": ("tiny SD (testing.tiny_sd_pipeline)", 32),
    "sd15_shaped": ("SD1.5 architecture, widths / 8, random weights (kits.sd15_shaped_pipeline)", 128),
}


def pipeline(kit: str) -> Any:
    """A fresh pipeline of `kit` (see `KITS`)."""
    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    return tiny_sd_pipeline() if kit == "tiny" else sd15_shaped_pipeline()


def sd15_shaped_models(divisor: int, device: str = "cpu") -> tuple[Any, Any, Any]:
    """SD1.5's UNet, VAE and CLIP text encoder with every width divided by `divisor` (1: full size; `device="meta"`
    builds them without memory, for counting FLOPs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    groups = 32 if divisor == 1 else 8  # SD1.5's group norms have 32 groups; narrower layers take fewer
    with torch.device(device):
        unet = UNet2DConditionModel(
            block_out_channels=tuple(width // divisor for width in SD15_UNET_WIDTHS), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=SD15_TEXT_WIDTH // divisor, attention_head_dim=8, norm_num_groups=groups,
        )  # fmt: skip
        vae = AutoencoderKL(
            block_out_channels=tuple(width // divisor for width in SD15_VAE_WIDTHS), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, norm_num_groups=groups, scaling_factor=0.18215,
        )  # fmt: skip
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408 if divisor == 1 else 514,
                hidden_size=SD15_TEXT_WIDTH // divisor,
                intermediate_size=4 * SD15_TEXT_WIDTH // divisor,
                num_attention_heads=12,
                num_hidden_layers=12,
                max_position_embeddings=77,
                bos_token_id=512,
                eos_token_id=513,
                pad_token_id=513,
            )  # fmt: skip
        )
    return unet.eval(), vae.eval(), text_encoder.eval()


def sd15_shaped_pipeline(divisor: int = 8, seed: int = 0) -> Any:
    """A StableDiffusionPipeline of SD1.5's architecture at widths / `divisor` (random weights, offline tokenizer)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from diffusion_pref_trainers.testing import tiny_clip_tokenizer

    torch.manual_seed(seed)
    unet, vae, text_encoder = sd15_shaped_models(divisor)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def sd15_flop_shares(divisor: int, resolution: int) -> dict[str, float]:
    """FLOPs of one pair in a straightforward LoRA DPO step of the SD1.5-shaped models, and the shares of the VAE
    encode and the text encoder in it (policy forward and backward counted as 3 forwards, plus a reference forward,
    on winner and loser)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = "meta" if divisor == 1 else "cpu"
    unet, vae, text_encoder = sd15_shaped_models(divisor, device)
    latent = resolution // 8
    with torch.device(device):
        inputs = {
            "unet": lambda: unet(
                torch.randn(1, 4, latent, latent), torch.tensor([10]), torch.randn(1, 77, SD15_TEXT_WIDTH // divisor)
            ),  # fmt: skip
            "vae_encode": lambda: vae.encode(torch.randn(1, 3, resolution, resolution)),
            "text_encoder": lambda: text_encoder(torch.zeros(1, 77, dtype=torch.long)),
        }
        flops = {}
        for name, forward in inputs.items():
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                forward()
            flops[name] = counter.get_total_flops()
    pair = 2 * flops["vae_encode"] + flops["text_encoder"] + 2 * 4 * flops["unet"]
    return {
        "pair_gflop": round(pair / 1e9, 2),
        "vae_encode_share": round(2 * flops["vae_encode"] / pair, 3),
        "text_encoder_share": round(flops["text_encoder"] / pair, 4),
    }
