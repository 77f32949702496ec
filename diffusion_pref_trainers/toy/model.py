"""The toy world's text-to-image model: a small Stable Diffusion pipeline, its architecture and the shipped weights.

The architecture is Stable Diffusion's (AutoencoderKL, UNet2DConditionModel with cross-attention, a CLIP text
encoder), scaled down to the world: 64 px images, 16 px latents, a word-level tokenizer for the world's
vocabulary. :mod:`diffusion_pref_trainers.toy.pretrain` trains it; the result ships in the package.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from diffusion_pref_trainers.toy.world import vocabulary

RESOLUTION = 64
LATENT_SIZE = 16  # the VAE downsamples 4x (three blocks)
LATENT_CHANNELS = 8  # per 4x4 px patch of 48 RGB values
TEXT_DIM = 64
MAX_TOKENS = 16  # the longest caption is 13 tokens with its start and end tokens
PIPELINE_DIR = Path(__file__).parent / "pipeline"
START, END = "<|startoftext|>", "<|endoftext|>"


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that spell each word as one token: repeatedly merge the most frequent adjacent pair.

    Ties go to the smallest pair, so the merges (and the token ids) are the same on every run and machine.
    """
    spelled = [[*word[:-1], word[-1] + "</w>"] for word in words]
    merges: list[tuple[str, str]] = []
    while any(len(pieces) > 1 for pieces in spelled):
        counts = Counter(pair for pieces in spelled for pair in zip(pieces, pieces[1:], strict=False))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for index, pieces in enumerate(spelled):
            merged, i = [], 0
            while i < len(pieces):
                if tuple(pieces[i : i + 2]) == best:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            spelled[index] = merged
    return merges


def toy_tokenizer() -> Any:
    """A CLIP tokenizer whose BPE merges spell every word of the world as one token (learned from the words)."""
    from transformers import CLIPTokenizer

    merges = learn_merges(vocabulary())
    letters = sorted({c for word in vocabulary() for c in word})
    tokens = [START, END, *letters, *(c + "</w>" for c in letters), *("".join(pair) for pair in merges)]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "".join(" ".join(pair) + "\n" for pair in merges))
        return CLIPTokenizer(
            str(vocab_file), str(merges_file), model_max_length=MAX_TOKENS, pad_token=END, unk_token=END
        )


def untrained_toy_pipeline(seed: int = 0) -> Any:
    """The toy pipeline's architecture with freshly initialised weights (what pretraining starts from)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.convert_tokens_to_ids(START), eos_token_id=tokenizer.convert_tokens_to_ids(END),
        pad_token_id=tokenizer.convert_tokens_to_ids(END),
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=RESOLUTION,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
        attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    # v-prediction on SD's betas rescaled to zero terminal SNR (Lin et al. 2024), as Stable Diffusion 2.x does: with
    # epsilon prediction, two pretraining runs learned to ignore the prompt at high noise levels (where its share of
    # the epsilon target is about sqrt(alpha_bar) < 0.07) and generated the same layout for every prompt.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
        clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing", steps_offset=1,
        prediction_type="v_prediction",
    )  # fmt: skip
    return StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def load_toy_pipeline(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """The pretrained toy pipeline shipped with the package (or one saved by the pretraining script at ``path``)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else PIPELINE_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no toy pipeline at {folder}; train one with `python -m diffusion_pref_trainers.toy.pretrain`"
        )
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
