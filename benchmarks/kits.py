"""The models the benchmarks train: the offline test kit, SD1.5- and SDXL-architecture kits (random weights built
from their configs) at full size for GPUs, and SD1.5 scaled down for CPUs.

The tiny kit (`testing.tiny_sd_pipeline`) is so small that Python overhead and the process dominate its step.
The SD1.5-shaped kit keeps SD1.5's architecture (UNet: 4 blocks, 2 layers a block, cross-attention in three;
VAE: 4 blocks, 2 layers a block; CLIP text encoder: 12 layers, 77 tokens) with every width divided by
`divisor`. At 128 px with `divisor=8` its cost proportions are SD1.5's at 512 px: FLOPs counted with
`FlopCounterMode` (`sd15_flop_shares`) give the VAE encode 27 % of a straightforward DPO step's FLOPs against
26 % for the full-size model, so caching latents saves what it saves at full size. The full-size kits (`sd15`
at 512 px, `sdxl` at 1024 px) are what the issue's GPU targets name; random weights cost and weigh what trained
ones do. They are built directly on the GPU when there is one.
"""

from __future__ import annotations

from typing import Any

import torch

SD15_UNET_WIDTHS = (320, 640, 1280, 1280)
SDXL_UNET_WIDTHS = (320, 640, 1280)
VAE_WIDTHS = (128, 256, 512, 512)
CLIP_L_WIDTH, CLIP_BIGG_WIDTH = 768, 1280
SDXL_TIME_DIM = 256
# Each kit's name, what it is, and the resolution the benchmarks run it at by default.
KITS = {
    "tiny": ("tiny SD (testing.tiny_sd_pipeline)", 32),
    "sd15_shaped": ("SD1.5 architecture, widths / 8, random weights (kits.sd15_shaped_pipeline)", 128),
    "sd15": ("SD1.5 architecture, full size, random weights (kits.sd15_shaped_pipeline(1))", 512),
    "sdxl": ("SDXL architecture, full size, random weights (kits.sdxl_shaped_pipeline(1))", 1024),
}


def pipeline(kit: str) -> Any:
    """A fresh pipeline of `kit` (see `KITS`); full-size kits are built on the GPU when there is one."""
    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    builders = {
        "tiny": tiny_sd_pipeline,
        "sd15_shaped": lambda: sd15_shaped_pipeline(8),
        "sd15": lambda: sd15_shaped_pipeline(1, device=device),
        "sdxl": lambda: sdxl_shaped_pipeline(1, device=device),
    }
    return builders[kit]()


def _groups(divisor: int) -> int:
    """Group-norm groups: the 32 of the real models at full size; narrower layers take fewer."""
    return 32 if divisor == 1 else 8


def _vae(divisor: int, scaling_factor: float) -> Any:
    """The SD/SDXL VAE (4 blocks, 2 layers a block, 4 latent channels) at widths / `divisor`."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=tuple(width // divisor for width in VAE_WIDTHS), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=_groups(divisor), scaling_factor=scaling_factor,
    ).eval()  # fmt: skip


def _clip_text(width: int, layers: int, heads: int, divisor: int, projection: bool = False, **config: Any) -> Any:
    """A CLIP text encoder at 77 tokens, `width` / `divisor` wide (with a projection head, as SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408 if divisor == 1 else 514, hidden_size=width // divisor,
        intermediate_size=4 * width // divisor, num_attention_heads=heads, num_hidden_layers=layers,
        max_position_embeddings=77, projection_dim=width // divisor, bos_token_id=512, eos_token_id=513,
        pad_token_id=513, **config,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def sd15_shaped_models(divisor: int, device: str = "cpu") -> tuple[Any, Any, Any]:
    """SD1.5's UNet, VAE and CLIP text encoder with every width divided by `divisor` (1: full size; `device="meta"`
    builds them without memory, for counting FLOPs)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(
            block_out_channels=tuple(width // divisor for width in SD15_UNET_WIDTHS), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=CLIP_L_WIDTH // divisor, attention_head_dim=8, norm_num_groups=_groups(divisor),
        ).eval()  # fmt: skip
        return unet, _vae(divisor, 0.18215), _clip_text(CLIP_L_WIDTH, 12, 12, divisor, hidden_act="quick_gelu")


def sdxl_shaped_models(divisor: int, device: str = "cpu") -> tuple[Any, Any, Any, Any]:
    """SDXL's UNet (10 transformer layers in its deepest block), VAE and two text encoders (CLIP ViT-L and
    OpenCLIP ViT-bigG with projection) with every width divided by `divisor` (1: full size)."""
    from diffusers import UNet2DConditionModel

    text_width = (CLIP_L_WIDTH + CLIP_BIGG_WIDTH) // divisor
    with torch.device(device):
        unet = UNet2DConditionModel(
            block_out_channels=tuple(width // divisor for width in SDXL_UNET_WIDTHS), layers_per_block=2,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=text_width,
            addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM // divisor,
            projection_class_embeddings_input_dim=6 * (SDXL_TIME_DIM // divisor) + CLIP_BIGG_WIDTH // divisor,
            norm_num_groups=_groups(divisor),
        ).eval()  # fmt: skip
        text_encoder = _clip_text(CLIP_L_WIDTH, 12, 12, divisor, hidden_act="quick_gelu")
        text_encoder_2 = _clip_text(CLIP_BIGG_WIDTH, 32, 20, divisor, projection=True, hidden_act="gelu")
        return unet, _vae(divisor, 0.13025), text_encoder, text_encoder_2


def sd15_shaped_pipeline(divisor: int = 8, seed: int = 0, device: str = "cpu") -> Any:
    """A StableDiffusionPipeline of SD1.5's architecture at widths / `divisor` (random weights, offline tokenizer)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from diffusion_pref_trainers.testing import tiny_clip_tokenizer

    torch.manual_seed(seed)
    unet, vae, text_encoder = sd15_shaped_models(divisor, device)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def sdxl_shaped_pipeline(divisor: int = 8, seed: int = 0, device: str = "cpu") -> Any:
    """A StableDiffusionXLPipeline of SDXL's architecture at widths / `divisor` (random weights, offline
    tokenizers)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from diffusion_pref_trainers.testing import tiny_clip_tokenizer

    torch.manual_seed(seed)
    unet, vae, text_encoder, text_encoder_2 = sdxl_shaped_models(divisor, device)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(), unet=unet, scheduler=scheduler, add_watermarker=False,
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
                torch.randn(1, 4, latent, latent), torch.tensor([10]), torch.randn(1, 77, CLIP_L_WIDTH // divisor)
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
