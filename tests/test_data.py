"""Data: schema detection, Pick-a-Pic ties and order, unreadable images, transforms and collation."""

from __future__ import annotations

import io
import logging
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pref_trainers import DiffusionDPOTrainer
from diffusion_pref_trainers.data import (
    BadImageError,
    ImageTransform,
    PreferenceDataset,
    RowKey,
    RowProcessor,
    StreamingPreferenceDataset,
    apply_column_mapping,
    collate,
    decode_images_lazily,
    detect_schema,
    drop_ties,
    load_image,
)
from diffusion_pref_trainers.testing import make_preference_dataset, preference_images, tiny_sd_pipeline


def _processor(schema: str, **kwargs) -> RowProcessor:
    return RowProcessor(schema=schema, transform=ImageTransform(32), **kwargs)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(image: Image.Image) -> torch.Tensor:
    """A 32x32 RGB image as the [-1, 1] CHW tensor the transform should produce, computed directly."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------ schemas
@pytest.mark.parametrize(
    "columns,schema",
    [
        (["caption", "jpg_0", "jpg_1", "label_0", "extra"], "pickapic"),
        (["prompt", "chosen", "rejected"], "preference"),
        (["prompt", "image", "label"], "unpaired"),
    ],
)
def test_schema_is_detected_from_the_columns(columns, schema) -> None:
    assert detect_schema(columns) == schema


def test_unknown_columns_list_what_was_found_and_what_is_accepted() -> None:
    with pytest.raises(ValueError) as error:
        detect_schema(["text", "good", "bad"])
    message = str(error.value)
    assert "['bad', 'good', 'text']" in message
    for name in ("caption, jpg_0, jpg_1, label_0", "prompt, chosen, rejected", "column_mapping"):
        assert name in message


def test_column_mapping_renames_and_names_missing_columns() -> None:
    dataset = datasets.Dataset.from_dict({"text": ["a"], "good": [b""], "bad": [b""]})
    renamed = apply_column_mapping(dataset, {"text": "prompt", "good": "chosen", "bad": "rejected"})
    assert detect_schema(renamed.column_names) == "preference"
    with pytest.raises(ValueError, match=r"lacks: \['caption'\]"):
        apply_column_mapping(dataset, {"caption": "prompt"})


# --------------------------------------------------------------------------------------- Pick-a-Pic
def test_ties_are_dropped_and_counted(pickapic_pairs) -> None:
    kept, dropped = drop_ties(pickapic_pairs)
    assert dropped == 2
    assert len(kept) == 8 and 0.5 not in kept["label_0"]


def test_pickapic_rows_put_the_winner_first(pickapic_pairs, pairs) -> None:
    # Both datasets come from the same generated triples; odd Pick-a-Pic rows store the winner second.
    assert pickapic_pairs["label_0"][:2] == [1.0, 0.0]
    pick, pref = _processor("pickapic"), _processor("preference")
    for index in range(4):
        left, right = pick(pickapic_pairs[index], seed=index), pref(pairs[index], seed=index)
        assert left["prompt"] == right["prompt"]
        assert torch.equal(left["pixel_values"], right["pixel_values"])


def test_label_0_of_zero_swaps_the_images() -> None:
    _, first, second = preference_images(1)[0]
    row = {"caption": "x", "jpg_0": _png(first), "jpg_1": _png(second), "label_0": 0.0}
    pixels = _processor("pickapic")(row, seed=0)["pixel_values"]
    assert torch.equal(pixels[0], _pixels(Image.fromarray(second)))
    assert torch.equal(pixels[1], _pixels(Image.fromarray(first)))


def test_swap_reverses_every_pair(pairs) -> None:
    plain, swapped = _processor("preference")(pairs[0], 0), _processor("preference", swap=True)(pairs[0], 0)
    assert torch.equal(swapped["pixel_values"], plain["pixel_values"].flip(0))


def test_the_trainer_logs_the_number_of_dropped_ties(pickapic_pairs, make_config, caplog) -> None:
    caplog.set_level(logging.INFO, logger="diffusion_pref_trainers")
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), pickapic_pairs)
    assert len(trainer.train_dataset) == 8
    assert trainer.state.dropped_ties == 2
    assert "Dropped 2 tied" in caplog.text


def test_a_dataset_of_ties_only_is_an_error(make_config) -> None:
    ties = make_preference_dataset(0, schema="pickapic", ties=3)
    with pytest.raises(ValueError, match="empty.*after dropping ties"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), ties)


# ------------------------------------------------------------------------------------- bad images
def _with_bad_row(bad_index: int, value: bytes) -> datasets.Dataset:
    rows = make_preference_dataset(4, schema="pickapic").to_dict()
    rows["jpg_1"][bad_index] = value
    return datasets.Dataset.from_dict(rows)


def test_unreadable_images_are_skipped_and_counted_by_default() -> None:
    dataset = PreferenceDataset(_with_bad_row(2, b"not an image"), _processor("pickapic"), seed=0)
    item = dataset[2]
    assert item["bad_rows"] == 1
    assert torch.equal(item["pixel_values"], dataset[3]["pixel_values"])  # replaced by the next readable row
    assert dataset[1]["bad_rows"] == 0


def test_truncated_images_are_errors_not_grey_pixels() -> None:
    _, winner, _ = preference_images(1)[0]
    truncated = _png(winner)[:200]
    with pytest.raises(OSError):
        load_image(truncated)
    dataset = PreferenceDataset(_with_bad_row(0, truncated), _processor("pickapic"), seed=0)
    assert dataset[0]["bad_rows"] == 1


def test_unreadable_images_fail_with_the_row_index_when_asked() -> None:
    dataset = PreferenceDataset(
        _with_bad_row(2, b"not an image"), _processor("pickapic"), seed=0, skip_bad_images=False
    )
    assert dataset[1]["bad_rows"] == 0
    with pytest.raises(BadImageError, match="Row 2"):
        dataset[2]


def test_streaming_rows_skip_and_count_unreadable_images() -> None:
    stream = _with_bad_row(1, b"\x89PNG broken").to_iterable_dataset()
    items = list(StreamingPreferenceDataset(stream, _processor("pickapic"), seed=0))
    assert len(items) == 3
    assert [item["bad_rows"] for item in items] == [0, 1, 0]
    strict = StreamingPreferenceDataset(stream, _processor("pickapic"), seed=0, skip_bad_images=False)
    with pytest.raises(BadImageError, match="row 1"):
        list(strict)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(lambda a: {"bytes": _png(a), "path": None}, id="dict"),
        pytest.param(lambda a: Image.fromarray(a), id="pil"),
        pytest.param(lambda a: a, id="array"),
    ],
)
def test_load_image_reads_every_cell_form(value) -> None:
    _, winner, _ = preference_images(1)[0]
    image = load_image(value(winner))
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), winner)


def test_transparent_and_grayscale_images_become_rgb() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent except the first column
    rgba[:, 0, 3] = 255
    image = np.asarray(load_image(_png(rgba)))
    assert image.shape == (8, 8, 3)
    assert image[0, 0].tolist() == [255, 0, 0] and image[0, 1].tolist() == [255, 255, 255]
    gray = np.asarray(load_image(Image.new("L", (8, 8), 77)))
    assert gray.shape == (8, 8, 3) and (gray == 77).all()


# -------------------------------------------------------------------------------------- transforms
def test_center_crop_resizes_the_short_side_and_crops_the_middle() -> None:
    array = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    pixels, original, crop = ImageTransform(32)(Image.fromarray(array), random.Random(0), flip=False)
    # Short side 40 -> 32, so the width becomes round(64 * 0.8) = 51 and the 32 px crop starts at (51-32)//2.
    assert original == [40, 64] and crop == [0, 9]
    expected = Image.fromarray(array).resize((51, 32), Image.BILINEAR).crop((9, 0, 41, 32))
    assert torch.equal(pixels, _pixels(expected))
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1


def test_small_images_are_upscaled_to_the_resolution() -> None:
    pixels, original, crop = ImageTransform(32)(Image.new("RGB", (10, 10), (255, 0, 0)), random.Random(0), False)
    assert pixels.shape == (3, 32, 32) and original == [10, 10] and crop == [0, 0]
    assert torch.equal(pixels[0], torch.ones(32, 32)) and torch.equal(pixels[1], -torch.ones(32, 32))


def test_random_crop_stays_inside_and_is_reproducible() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 96, 3), dtype=np.uint8))
    transform = ImageTransform(32, center_crop=False)
    crops = [transform(image, random.Random(seed), False)[2] for seed in range(8)]
    assert all(top == 0 and 0 <= left <= 64 for top, left in crops)
    assert len({left for _, left in crops}) > 1
    first, again = transform(image, random.Random(3), False), transform(image, random.Random(3), False)
    assert torch.equal(first[0], again[0]) and first[2] == again[2]


def test_flip_mirrors_the_width() -> None:
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    plain = ImageTransform(32)(image, random.Random(0), False)[0]
    flipped = ImageTransform(32)(image, random.Random(0), True)[0]
    assert torch.equal(flipped, plain.flip(-1))


def test_flipped_crop_is_reported_in_the_flipped_image() -> None:
    # SDXL's time ids must describe the pixels the model sees: cropping the mirrored resized image at the
    # reported (top, left) gives exactly the flipped training pixels.
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (32, 96, 3), dtype=np.uint8))
    pixels, _, (top, left) = ImageTransform(32, center_crop=False)(image, random.Random(5), True)
    mirrored = image.transpose(Image.FLIP_LEFT_RIGHT)
    assert torch.equal(pixels, _pixels(mirrored.crop((left, top, left + 32, top + 32))))
    unflipped_left = ImageTransform(32, center_crop=False)(image, random.Random(5), False)[2][1]
    assert left == 96 - unflipped_left - 32 and left != unflipped_left


def test_random_flip_flips_both_images_of_a_pair_together(pairs) -> None:
    plain = _processor("preference")(pairs[0], 0)["pixel_values"]
    outcomes = set()
    for seed in range(16):
        pixels = _processor("preference", random_flip=True)(pairs[0], seed)["pixel_values"]
        if torch.equal(pixels, plain):
            outcomes.add("kept")
        else:
            assert torch.equal(pixels, plain.flip(-1))  # both images mirrored, never just one
            outcomes.add("flipped")
    assert outcomes == {"kept", "flipped"}


def test_collate_stacks_rows_winner_first(pairs) -> None:
    processor = _processor("preference")
    items = [processor(pairs[i], i) | {"bad_rows": i % 2} for i in range(3)]
    batch = collate(items)
    assert batch["prompt"] == pairs["prompt"][:3]
    assert batch["pixel_values"].shape == (3, 2, 3, 32, 32)
    assert batch["original_sizes"].shape == (3, 2, 2) and batch["crop_top_lefts"].shape == (3, 2, 2)
    assert int(batch["bad_rows"]) == 1
    assert torch.equal(batch["pixel_values"][1, 0], _pixels(pairs[1]["chosen"]))
    assert torch.equal(batch["pixel_values"][1, 1], _pixels(pairs[1]["rejected"]))


# --------------------------------------------------------------------------- robust rows, every kind
def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "image,expected",
    [
        pytest.param(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0), id="cmyk"),
        pytest.param(Image.new("LA", (8, 8), (50, 0)), (255, 255, 255), id="transparent-gray"),
        pytest.param(Image.new("I;16", (8, 8), 300), (255, 255, 255), id="16-bit"),
        pytest.param(Image.new("F", (8, 8), 0.5), (127, 127, 127), id="float"),
        pytest.param(Image.new("1", (8, 8), 1), (255, 255, 255), id="bilevel"),
    ],
)
def test_every_image_mode_becomes_rgb(image, expected) -> None:
    # 16-bit and float images are scaled by their maximum (floats at most 1 are taken as [0, 1]).
    decoded = np.asarray(load_image(image))
    assert decoded.shape == (8, 8, 3) and (decoded == expected).all()


def test_a_palette_image_with_a_transparent_colour_is_composited_on_white() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    assert np.asarray(load_image(_encoded(palette))).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_decompression_bombs_and_degenerate_shapes_are_skippable_errors(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this many pixels
    with pytest.raises(OSError, match="DecompressionBombError"):
        load_image(_encoded(Image.new("RGB", (50, 50))))
    with pytest.raises(ValueError, match="more than 10 times longer than wide"):
        ImageTransform(32)(Image.new("RGB", (4, 64)), random.Random(0), flip=False)
    pixels, original, _ = ImageTransform(32)(Image.new("RGB", (1, 1), (0, 0, 255)), random.Random(0), flip=False)
    assert original == [1, 1] and torch.equal(pixels[2], torch.ones(32, 32))  # a 1-pixel image is upscaled
    with pytest.raises(TypeError, match="NoneType"):
        load_image(None)


def test_broken_files_in_image_columns_are_skipped_when_streamed() -> None:
    rows = make_preference_dataset(3).to_dict()  # image cells as stored: {"bytes", "path"}
    rows["chosen"][1] = {"bytes": b"\x89PNG not really", "path": None}
    features = datasets.Features(prompt=datasets.Value("string"), chosen=datasets.Image(), rejected=datasets.Image())
    dataset = datasets.Dataset.from_dict(rows, features=features)
    with pytest.raises(OSError):
        list(dataset.to_iterable_dataset())  # datasets decodes while iterating: the stream would end here
    lazy = decode_images_lazily(dataset)
    assert lazy.features["chosen"] == datasets.Image(decode=False) and lazy["prompt"] == dataset["prompt"]
    items = list(
        StreamingPreferenceDataset(decode_images_lazily(dataset.to_iterable_dataset()), _processor("preference"), 0)
    )
    assert [item["bad_rows"] for item in items] == [0, 1]
    assert [item["prompt"] for item in items] == [rows["prompt"][0], rows["prompt"][2]]


def _every_bad_row_kind(monkeypatch) -> datasets.Dataset:
    """Twelve rows: four unusable (1, 3, 5, 9, each followed by a usable row), the rest converted or kept."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # a 70x70 image becomes a decompression bomb
    rows = make_preference_dataset(12).to_dict()
    rows["chosen"] = [cell["bytes"] for cell in rows["chosen"]]
    rows["rejected"] = [cell["bytes"] for cell in rows["rejected"]]
    rows["prompt"][0] = ""  # empty caption
    rows["chosen"][1] = b"not an image"  # unreadable
    rows["rejected"][2] = _encoded(Image.new("L", (32, 32), 90))  # grayscale
    rows["chosen"][3] = rows["chosen"][3][:200]  # truncated
    rows["rejected"][4] = _encoded(Image.new("CMYK", (32, 32), (0, 80, 160, 0)), "JPEG")  # CMYK
    rows["chosen"][5] = _encoded(Image.new("RGB", (4, 64)))  # 16 times longer than wide
    rows["chosen"][6] = _encoded(Image.new("RGBA", (40, 32), (10, 20, 30, 128)))  # transparent
    rows["prompt"][7] = None  # missing caption
    rows["prompt"][8] = "a very long caption " * 40  # far beyond the tokenizer's 77 tokens
    rows["rejected"][9] = _encoded(Image.new("RGB", (70, 70)))  # decompression bomb
    rows["chosen"][10] = _encoded(Image.new("RGB", (1, 1), (200, 0, 0)))  # tiny
    rows["rejected"][11] = _encoded(Image.new("I;16", (48, 32), 1000))  # 16-bit
    return datasets.Dataset.from_dict(rows)


def test_every_bad_row_kind_is_handled_and_counted_in_the_logs(make_config, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="diffusion_pref_trainers")
    args = make_config(per_device_train_batch_size=6, max_steps=2, logging_steps=2)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, _every_bad_row_kind(monkeypatch))
    trainer.train()  # one epoch: every row once, each unusable one replaced by the next row
    counts = {key: trainer.state.log_history[0][f"data/{key}"] for key in ("skipped_rows", "empty_prompts",
                                                                            "truncated_prompts")}  # fmt: skip
    assert counts == {"skipped_rows": 4.0, "empty_prompts": 2.0, "truncated_prompts": 1.0}
    assert (trainer.state.skipped_rows, trainer.state.empty_prompts, trainer.state.truncated_prompts) == (4, 2, 1)
    for row in (1, 3, 5, 9):
        assert f"Skipping row {row}: cannot read its image" in caplog.text  # at DEBUG level
    warned = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    unreadable = [message for message in warned if "unreadable" in message or "Skipping" in message]
    assert len(unreadable) == 1, unreadable  # one warning with the count, not one per row
    assert unreadable[0].startswith("4 row(s) with unreadable images were skipped in training")
    assert "more than 10 times longer than wide" in caplog.text and "DecompressionBombError" in caplog.text


def test_proportion_empty_prompts_blanks_a_seeded_share_of_training_prompts_only(pairs, make_config) -> None:
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(proportion_empty_prompts=0.5), pairs, pairs)
    blanked = []
    for epoch in range(8):
        blanked += [trainer.train_dataset[RowKey(epoch, index)]["prompt"] == "" for index in range(len(pairs))]
    assert 0.3 < sum(blanked) / len(blanked) < 0.7  # 64 seeded draws of probability 0.5
    again = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(proportion_empty_prompts=0.5), pairs)
    assert [again.train_dataset[RowKey(7, i)]["prompt"] == "" for i in range(len(pairs))] == blanked[-len(pairs) :]
    assert [trainer.eval_dataset[i]["prompt"] for i in range(len(pairs))] == pairs["prompt"]
    everything = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(proportion_empty_prompts=1.0), pairs)
    assert all(everything.train_dataset[i]["prompt"] == "" for i in range(len(pairs)))
    with pytest.raises(ValueError, match=r"`proportion_empty_prompts` must be in \[0, 1\], got 1.5"):
        make_config(proportion_empty_prompts=1.5)
