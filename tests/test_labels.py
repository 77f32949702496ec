"""Labels and data checked before compute: label spellings, the image probe, and the test split of a Dataset."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from diffusion_pref_trainers import DiffusionDPOTrainer, DiffusionKTOConfig, DiffusionKTOTrainer, DiffusionSFTTrainer
from diffusion_pref_trainers.configs import DiffusionSFTConfig
from diffusion_pref_trainers.data import BadImageError, LabelError, paired_label, unpaired_label, validate_labels

REJECTED_PAIRED = [2, -1, 0.3, math.nan, "yes", None, "", " 1", "1e0", "nan", "-0", "true", "0.25"]
REJECTED_UNPAIRED = ["maybe", 0.5, math.nan, None, 2, -1, "", "yes", "2", " true"]


def _relabelled(dataset: datasets.Dataset, column: str, values: list) -> datasets.Dataset:
    """`dataset` with `column` replaced by `values` (the column's type follows the values)."""
    return dataset.remove_columns(column).add_column(column, values)


def _unpaired(pairs: datasets.Dataset, labels: list) -> datasets.Dataset:
    """One labelled image per row: the winners of `pairs`, labelled `labels`."""
    rows = pairs.select(range(len(labels)))
    return rows.select_columns(["prompt", "chosen"]).rename_column("chosen", "image").add_column("label", labels)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1.0), (0, 0.0), (0.5, 0.5), (1.0, 1.0), (True, 1.0), (False, 0.0), ("1", 1.0), ("0", 0.0), ("0.5", 0.5),
     ("1.0", 1.0), (".5", 0.5), ("0.0", 0.0)],
)  # fmt: skip
def test_paired_label_spellings_are_normalised(value, expected) -> None:
    assert paired_label(value) == expected and type(paired_label(value)) is float


@pytest.mark.parametrize("value", REJECTED_PAIRED, ids=repr)
def test_paired_labels_other_than_0_half_1_are_rejected(value) -> None:
    with pytest.raises(LabelError, match="label_0"):
        paired_label(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), (1.0, True), (0.0, False), ("true", True), ("FALSE", False),
     ("True", True), ("1", True), ("0", False)],
)  # fmt: skip
def test_unpaired_label_spellings_are_normalised(value, expected) -> None:
    assert unpaired_label(value) is expected


@pytest.mark.parametrize("value", REJECTED_UNPAIRED, ids=repr)
def test_unpaired_labels_other_than_booleans_are_rejected(value) -> None:
    with pytest.raises(LabelError, match="label"):
        unpaired_label(value)


@pytest.mark.parametrize("bad", [2.0, -1.0, 0.3, math.nan, None])
def test_a_bad_pickapic_label_fails_at_construction_naming_row_and_value(bad, pickapic_pairs, tiny_pipe_dir,
                                                                         make_config) -> None:  # fmt: skip
    labels = list(pickapic_pairs["label_0"])
    labels[5] = bad
    with pytest.raises(ValueError, match=rf"Row 5: `label_0` is {bad!r}; .* must be 1"):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(), _relabelled(pickapic_pairs, "label_0", labels))


def test_string_pickapic_labels_train_like_numbers_and_ties_are_dropped(pickapic_pairs, tiny_pipe_dir,
                                                                        make_config) -> None:  # fmt: skip
    spelled = [{1.0: "1", 0.0: "0", 0.5: "0.5"}[label] for label in pickapic_pairs["label_0"]]
    numbers = DiffusionDPOTrainer(tiny_pipe_dir, make_config(), pickapic_pairs)
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, make_config(), _relabelled(pickapic_pairs, "label_0", spelled))
    assert trainer.state.dropped_ties == numbers.state.dropped_ties == 2 and len(trainer.train_dataset) == 8
    for row in range(8):  # the same winner first: a string "0" no longer reads as "image 0 wins"
        assert torch.equal(trainer.train_dataset[row]["pixel_values"], numbers.train_dataset[row]["pixel_values"])
    spelled[3] = "yes"
    with pytest.raises(ValueError, match=r"Row 3: `label_0` is 'yes'"):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(), _relabelled(pickapic_pairs, "label_0", spelled))


def test_a_streamed_label_is_checked_as_its_row_is_read(pickapic_pairs) -> None:
    labels = list(pickapic_pairs["label_0"])
    labels[9] = 2.0
    stream = validate_labels(_relabelled(pickapic_pairs, "label_0", labels).to_iterable_dataset(), "pickapic")
    read = []
    with pytest.raises(ValueError, match=r"Streamed row 9: `label_0` is 2.0"):
        read.extend(row["label_0"] for row in stream)
    assert read == labels[:9]  # the rows before it are read, normalised
    strings = validate_labels(_relabelled(pickapic_pairs, "label_0", ["1", "0", "0.5"] * 3 + ["1"]), "pickapic")
    assert strings["label_0"] == ["1", "0", "0.5"] * 3 + ["1"]  # map-style: checked, read through paired_label
    streamed = validate_labels(strings.to_iterable_dataset(), "pickapic")
    assert [row["label_0"] for row in streamed] == [1.0, 0.0, 0.5] * 3 + [1.0]


def test_a_bad_streamed_label_among_the_first_rows_fails_at_construction(pickapic_pairs, tiny_pipe_dir,
                                                                         make_config) -> None:  # fmt: skip
    labels = list(pickapic_pairs["label_0"])
    labels[2] = -1.0
    stream = _relabelled(pickapic_pairs, "label_0", labels).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"Streamed row 2: `label_0` is -1.0"):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(), stream)


@pytest.mark.parametrize(
    "labels", [["true", "FALSE", "0", "1"], [True, False, True, False], [1, 0, 0, 1], [1.0, 0.0, 1.0, 1.0]]
)
def test_kto_reads_every_label_spelling_as_a_bool(labels, pairs, tiny_pipe_dir, tmp_path) -> None:
    args = DiffusionKTOConfig(output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=4)
    trainer = DiffusionKTOTrainer(tiny_pipe_dir, args, _unpaired(pairs, labels))
    read = [trainer.train_dataset[row]["label"] for row in range(len(labels))]
    assert read == [str(label).lower() in ("true", "1", "1.0") for label in labels]
    assert all(type(label) is bool for label in read)


@pytest.mark.parametrize("labels", [["true", "false", "maybe"], [1.0, 0.0, 0.5], [1.0, 0.0, None]])
def test_kto_rejects_other_labels_naming_the_row(labels, pairs, tiny_pipe_dir, tmp_path) -> None:
    args = DiffusionKTOConfig(output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match=rf"Row 2: `label` is {labels[2]!r}; an unpaired `label` must be"):
        DiffusionKTOTrainer(tiny_pipe_dir, args, _unpaired(pairs, labels))


def test_sft_keeps_only_the_rows_labelled_desirable_in_any_spelling(pairs, tiny_pipe_dir, tmp_path) -> None:
    args = DiffusionSFTConfig(output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=2)
    trainer = DiffusionSFTTrainer(tiny_pipe_dir, args, _unpaired(pairs, ["true", "false", "False", "1", "0"]))
    assert [trainer.train_dataset[row]["prompt"] for row in range(len(trainer.train_dataset))] == [
        pairs["prompt"][0], pairs["prompt"][3]
    ]  # fmt: skip


def test_an_image_column_of_numbers_fails_at_construction(pairs, tiny_pipe_dir, make_config) -> None:
    numbers = _relabelled(pairs, "chosen", list(range(len(pairs))))
    with pytest.raises(ValueError, match=r"Column `chosen` holds int64 values, not images"):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(), numbers)


def test_a_dataset_of_unreadable_images_fails_at_construction(pickapic_pairs, tiny_pipe_dir, make_config) -> None:
    broken = _relabelled(pickapic_pairs, "jpg_0", [b"not an image"] * len(pickapic_pairs))
    with pytest.raises(BadImageError, match=r"None of the 8 rows probed .* has a readable image \(row 0: "):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(), broken)
    with pytest.raises(BadImageError, match=r"None of the 8 rows probed \[0, 1, 2"):  # a stream: its first rows
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(max_steps=2), broken.to_iterable_dataset())


def test_without_skipping_one_unreadable_probed_row_fails_at_construction(pickapic_pairs, tiny_pipe_dir,
                                                                         make_config) -> None:  # fmt: skip
    images = list(pickapic_pairs["jpg_1"])
    images[0] = b"not an image"  # the probe reads rows spread over the data, the first and last included
    damaged = _relabelled(pickapic_pairs, "jpg_1", images)
    assert len(DiffusionDPOTrainer(tiny_pipe_dir, make_config(), damaged).train_dataset) == 8  # skipped when read
    with pytest.raises(BadImageError, match=r"Row 0: cannot read its image"):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(skip_bad_images=False), damaged)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_test_split_of_a_plain_dataset_is_an_error(streamed, pairs, tiny_pipe_dir, make_config) -> None:
    source = pairs.to_iterable_dataset() if streamed else pairs
    with pytest.raises(ValueError, match=r"dataset_test_split='test'` .* has no splits: pass eval_dataset="):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(dataset_test_split="test"), source)
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, make_config(dataset_test_split="test"), source, eval_dataset=pairs)
    assert len(trainer.eval_dataset) == len(pairs)  # an eval_dataset given: the split is not read
