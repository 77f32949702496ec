"""The precompute cache: identical training with and without it, hits and misses by fingerprint, flips, refusals."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pref_trainers import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    DiffusionKTOConfig,
    DiffusionKTOTrainer,
    DiffusionRPOConfig,
    DiffusionRPOTrainer,
    DiffusionSFTConfig,
    DiffusionSFTTrainer,
    cache,
)
from diffusion_pref_trainers.cache import CachedPreferenceDataset
from diffusion_pref_trainers.data import BadImageError, PreferenceDataset, RowKey, row_seed
from diffusion_pref_trainers.families.sd import StableDiffusionFamily
from diffusion_pref_trainers.similarity import ClipEmbedder
from diffusion_pref_trainers.testing import make_preference_dataset, tiny_sd_pipeline


def _refuse(*args, **kwargs):
    raise AssertionError("an encoder ran although the cache holds its output")


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("method", ["dpo", "rpo"])
def test_cached_training_matches_uncached_and_skips_the_encoders(tmp_path, pairs, clip_dir, method, monkeypatch):
    """Same seed, same losses (to 1e-6) over two epochs of random flips, evaluation included.

    The encoders' outputs depend on how rows are grouped into a batch, by float rounding (here up to 5e-7 in the
    prompt conditioning), and the loss scales such differences by about beta/4: beta 5 keeps them below 1e-6
    (measured: 2e-7 over 20 steps; 2e-6 with beta 50), while a wrong flip moves it by 4e-6 (RPO) to 1e-5 (DPO).
    """
    config_class, trainer_class = (
        (DiffusionDPOConfig, DiffusionDPOTrainer) if method == "dpo" else (DiffusionRPOConfig, DiffusionRPOTrainer)
    )
    extra = {} if method == "dpo" else {"similarity": "multimodal", "similarity_model_name_or_path": clip_dir}

    def run(cache_latents: bool):
        args = config_class(
            output_dir=str(tmp_path / f"out-{cache_latents}"), resolution=32, per_device_train_batch_size=4,
            max_steps=4, beta=5.0, learning_rate=1e-3, logging_steps=1, save_steps=0, eval_noise_draws=2,
            random_flip=True, cache_latents=cache_latents, cache_dir=str(tmp_path / "cache"), **extra,
        )  # fmt: skip
        trainer = trainer_class(tiny_sd_pipeline(), args, pairs, eval_dataset=pairs)
        if cache_latents:
            assert isinstance(trainer.train_dataset, CachedPreferenceDataset)
            with monkeypatch.context() as patch:
                for name in ("encode_images", "encode_prompts"):
                    patch.setattr(trainer.family, name, _refuse)
                if method == "rpo":
                    patch.setattr(trainer.embedder, "embed_text", _refuse)
                    patch.setattr(trainer.embedder, "embed_images", _refuse)
                trainer.train()
        else:
            assert isinstance(trainer.train_dataset, PreferenceDataset)
            trainer.train()
        return trainer

    plain, cached = run(False), run(True)
    assert len(_losses(plain)) == 4
    np.testing.assert_allclose(_losses(cached), _losses(plain), rtol=0, atol=1e-6)
    eval_plain, eval_cached = plain.state.log_history[-1], cached.state.log_history[-1]
    assert eval_cached["eval_loss"] == pytest.approx(eval_plain["eval_loss"], abs=1e-6)
    if method == "rpo":
        logged = cached.state.log_history[0]["rpo/similarity_mean"]
        assert logged == pytest.approx(plain.state.log_history[0]["rpo/similarity_mean"], abs=1e-6)


@pytest.fixture
def cached_config(make_config, tmp_path: Path) -> Callable[..., DiffusionDPOConfig]:
    """conftest's `make_config` for one step with the latent cache in this test's tmp folder."""
    return functools.partial(make_config, max_steps=1, cache_latents=True, cache_dir=str(tmp_path / "cache"))


def test_second_trainer_hits_the_cache_without_encoding(tmp_path, cached_config, pairs, monkeypatch) -> None:
    first = DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(), pairs)
    files = sorted((tmp_path / "cache").glob("*.arrow"))
    assert files == [first.train_dataset.cache_file]
    modified = files[0].stat().st_mtime_ns
    monkeypatch.setattr(StableDiffusionFamily, "encode_images", _refuse)
    monkeypatch.setattr(StableDiffusionFamily, "encode_prompts", _refuse)
    second = DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(output_dir=str(tmp_path / "b")), pairs)
    assert second.train_dataset.cache_file == files[0]
    assert sorted((tmp_path / "cache").glob("*.arrow")) == files and files[0].stat().st_mtime_ns == modified
    for index in range(len(pairs)):
        a, b = first.train_dataset[index], second.train_dataset[index]
        assert torch.equal(a["latents"], b["latents"]) and a["prompt"] == b["prompt"] == pairs[index]["prompt"]
        assert torch.equal(a["cond"]["encoder_hidden_states"], b["cond"]["encoder_hidden_states"])
    second.train()  # and trains from it


def test_changed_weights_or_resolution_miss_the_cache(tmp_path, cached_config, pairs) -> None:
    base = DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(), pairs).train_dataset
    changed = tiny_sd_pipeline()
    with torch.no_grad():
        changed.vae.encoder.conv_in.weight[0, 0, 0, 0] += 0.01  # same architecture and name, other weights
    other_model = DiffusionDPOTrainer(changed, cached_config(), pairs).train_dataset
    other_size = DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(resolution=16), pairs).train_dataset
    names = {base.cache_file, other_model.cache_file, other_size.cache_file}
    assert len(names) == 3 and names == set((tmp_path / "cache").glob("*.arrow"))
    assert not torch.equal(base[0]["latents"], other_model[0]["latents"])
    assert base[0]["latents"].shape[-1] == 2 * other_size[0]["latents"].shape[-1]


def _wide_pairs(n: int) -> datasets.Dataset:
    """Pairs of 48x32 images: the centre crop sits away from both edges, so a flip moves its `left`."""
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)) for _ in range(2)] for _ in range(n)]
    return datasets.Dataset.from_dict(
        {
            "prompt": [f"scene {i}" for i in range(n)],
            "chosen": [c for c, _ in images],
            "rejected": [r for _, r in images],
        }
    )


def test_random_flip_stores_both_orientations_and_replays_each_epochs_flip(cached_config) -> None:
    wide = _wide_pairs(4)
    cached = DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(random_flip=True), wide)
    plain = DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(random_flip=True, cache_latents=False), wide)
    stored = cached.train_dataset.rows[0]["latents"]
    assert stored.shape[0] == 2 and not torch.allclose(stored[0], stored[1])  # both orientations
    flips = set()
    for epoch in range(3):
        for index in range(len(wide)):
            flips.add(cached.train_dataset.processor.draw_flip(random.Random(row_seed(cached.args.seed, epoch, index))))
            ours, theirs = cached.train_dataset[RowKey(epoch, index)], plain.train_dataset[RowKey(epoch, index)]
            with torch.no_grad():
                expected = plain.family.encode_images(theirs["pixel_values"])
            torch.testing.assert_close(ours["latents"], expected, rtol=0, atol=1e-5)
            assert torch.equal(ours["crop_top_lefts"], theirs["crop_top_lefts"])
            assert torch.equal(ours["original_sizes"], theirs["original_sizes"])
    assert flips == {True, False}  # the rows and epochs above saw both orientations


def test_streaming_random_crops_and_blanked_prompts_are_refused(tmp_path, cached_config, pairs) -> None:
    with pytest.raises(ValueError, match="cache_latents` needs a map-style dataset"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(), pairs.to_iterable_dataset())
    with pytest.raises(ValueError, match="needs a map-style dataset"):
        cached_config(dataset_streaming=True, max_steps=2)
    with pytest.raises(ValueError, match="center_crop=True"):
        cached_config(center_crop=False)
    with pytest.raises(ValueError, match="proportion_empty_prompts=0"):
        cached_config(proportion_empty_prompts=0.2)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="must name a folder"):
        cached_config(cache_dir=str(tmp_path / "file"))


def test_unreadable_rows_are_replaced_as_without_cache_or_fail_with_the_row(cached_config) -> None:
    rows = make_preference_dataset(12, schema="pickapic").to_dict()
    rows["jpg_0"][1] = b"not an image"  # not among the rows probed at construction (0, 2, 3, 5, ...)
    broken = datasets.Dataset.from_dict(rows)
    cached = DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(), broken).train_dataset
    plain = DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(cache_latents=False), broken).train_dataset
    for index in range(len(broken)):
        assert cached[index]["prompt"] == plain[index]["prompt"]
        assert cached[index]["bad_rows"] == plain[index]["bad_rows"] == int(index == 1)
    strict = DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(skip_bad_images=False), broken)
    with pytest.raises(BadImageError, match="Row 1"):  # a cache built before marks the row unreadable
        strict.train_dataset[1]
    with pytest.raises(BadImageError, match="Row 1"):  # a new cache is not built past it
        DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(skip_bad_images=False, resolution=16), broken)


def test_trained_text_encoders_leave_prompts_uncached(cached_config, pairs) -> None:
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), cached_config(train_text_encoder=True), pairs)
    item = trainer.train_dataset[0]
    assert "latents" in item and "cond" not in item
    trainer.train()


def test_objectives_own_views_are_cached_sft_winners_and_kto_labels(tmp_path, pairs) -> None:
    common = dict(resolution=32, max_steps=1, save_steps=0, cache_latents=True, cache_dir=str(tmp_path / "cache"))
    pickapic = make_preference_dataset(4, schema="pickapic")  # SFT views its winners lazily
    sft = DiffusionSFTTrainer(
        tiny_sd_pipeline(), DiffusionSFTConfig(output_dir=str(tmp_path / "sft"), **common), pickapic
    )
    assert sft.train_dataset[1]["latents"].shape[0] == 1  # one image per row
    sft.train()
    labels = [True, False, False, True]
    unpaired = datasets.Dataset.from_dict(
        {"prompt": pairs["prompt"][:4], "image": pairs["chosen"][:4], "label": labels},
        features=datasets.Features(
            {"prompt": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Value("bool")}
        ),
    )
    kto = DiffusionKTOTrainer(
        tiny_sd_pipeline(), DiffusionKTOConfig(output_dir=str(tmp_path / "kto"), **common), unpaired
    )
    assert [kto.train_dataset[i]["label"] for i in range(4)] == labels
    kto.train()


def test_rpo_text_similarity_with_the_pipeline_encoder_caches_text_embeddings(tmp_path, pairs, monkeypatch) -> None:
    args = DiffusionRPOConfig(
        output_dir=str(tmp_path / "out"), resolution=32, max_steps=1, save_steps=0, similarity="text",
        similarity_model_name_or_path=None, cache_latents=True, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    trainer = DiffusionRPOTrainer(tiny_sd_pipeline(), args, pairs)
    assert not isinstance(trainer.embedder, ClipEmbedder)
    assert trainer.train_dataset[0]["clip_text"].dim() == 1
    monkeypatch.setattr(trainer.embedder, "embed_text", _refuse)
    trainer.train()


def test_arrow_rows_read_what_the_torch_formatter_reads_across_chunks() -> None:
    rng = np.random.default_rng(0)
    template = {
        "latents": rng.standard_normal((2, 2, 4, 3, 3)).astype(np.float32),  # 5-D: orientations x images x C x H x W
        "cond/encoder_hidden_states": rng.standard_normal((7, 5)).astype(np.float32),
        "extra/clip_text": rng.standard_normal(6).astype(np.float32),  # 1-D: a fixed-length list
        "crop_top_lefts": rng.integers(0, 9, (2, 2, 2)),
    }
    features = cache._features(template, labelled=True)

    def draw(value: np.ndarray) -> np.ndarray:
        """A new array of the template's shape and dtype."""
        if value.dtype == np.float32:
            return rng.standard_normal(value.shape).astype(np.float32)
        return rng.integers(0, 9, value.shape)

    def part(start: int, rows: int) -> datasets.Dataset:
        """Rows start..start+rows-1 as one Arrow chunk."""
        columns = {key: [draw(value) for _ in range(rows)] for key, value in template.items()}
        indices = range(start, start + rows)
        columns.update(prompt=[f"p{i}" for i in indices], readable=[True] * rows, label=[i % 2 == 0 for i in indices])
        return datasets.Dataset.from_dict(columns, features=features)

    rows = datasets.concatenate_datasets([part(0, 3), part(3, 4)])
    assert rows.data.table.column("latents").num_chunks == 2
    reader, formatted = cache.ArrowRows(rows), rows.with_format("torch")
    assert len(reader) == 7
    for index in range(7):
        got, want = reader[index], formatted[index]
        assert got.keys() == want.keys() and got["prompt"] == f"p{index}" and got["label"] == (index % 2 == 0)
        for key in template:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (index, key)


def test_arrow_rows_pickle_as_the_file_not_its_bytes(tmp_path) -> None:
    import pickle

    big = np.zeros((64, 64, 64), np.float32)  # 1 MiB a row
    features = cache._features({"latents": big}, labelled=False)
    columns = {"latents": [big] * 8, "prompt": ["p"] * 8, "readable": [True] * 8}
    rows = datasets.Dataset.from_dict(columns, features=features)
    rows.save_to_disk(str(tmp_path / "rows"))
    reader = cache.ArrowRows(datasets.load_from_disk(str(tmp_path / "rows")))  # memory-mapped, as a cache file is
    copy = pickle.loads(pickle.dumps(reader))
    assert len(pickle.dumps(reader)) < 100_000  # 8 MiB of arrays stay in the file
    assert torch.equal(copy[5]["latents"], reader[5]["latents"]) and copy[5]["latents"].shape == (64, 64, 64)
    with pytest.raises(ValueError, match="unselected dataset"):
        cache.ArrowRows(rows.select([3, 1]))  # non-contiguous: datasets keeps an indices mapping
