"""Sources: pipelines and datasets from objects, local folders and files; unsupported inputs say what is."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from diffusion_pref_trainers import DiffusionDPOTrainer, DiffusionKTOConfig, DiffusionKTOTrainer
from diffusion_pref_trainers.data import StreamingPreferenceDataset, detect_schema, load_image
from diffusion_pref_trainers.families import get_family, supported_pipelines
from diffusion_pref_trainers.sources import load_pipeline, load_preference_dataset
from diffusion_pref_trainers.testing import tiny_sd_pipeline


def _same_rows(loaded, original: datasets.Dataset) -> None:
    """Same prompts, and images that decode to the same pixels."""
    assert loaded["prompt"] == original["prompt"]
    for column in ("chosen", "rejected"):
        for left, right in zip(loaded[column], original[column], strict=True):
            assert left.tobytes() == right.convert(left.mode).tobytes()


# ---------------------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_pipeline_loads_from_a_save_pretrained_folder(tiny_pipe_dir, as_path) -> None:
    pipe = load_pipeline(Path(tiny_pipe_dir) if as_path else tiny_pipe_dir)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    reference = tiny_sd_pipeline().unet.state_dict()
    loaded = pipe.unet.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[key], reference[key]) for key in reference)


def test_a_pipeline_object_is_used_as_is() -> None:
    pipe = tiny_sd_pipeline()
    assert load_pipeline(pipe) is pipe


def test_an_unsupported_pipeline_names_the_supported_ones(make_config) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError) as error:
        get_family(pipe)
    assert "DDPMPipeline is not supported" in str(error.value)
    assert "StableDiffusionPipeline" in supported_pipelines()
    assert all(name in str(error.value) for name in supported_pipelines())
    with pytest.raises(ValueError, match="DDPMPipeline is not supported"):
        DiffusionDPOTrainer(pipe, make_config())


# ----------------------------------------------------------------------------------------- datasets
def test_dataset_objects_are_used_as_is(pairs) -> None:
    assert load_preference_dataset(pairs) is pairs
    assert load_preference_dataset(datasets.DatasetDict(train=pairs)) is pairs


def test_save_to_disk_folder(pairs, tmp_path) -> None:
    pairs.save_to_disk(tmp_path / "single")
    _same_rows(load_preference_dataset(str(tmp_path / "single")), pairs)


def test_save_to_disk_dataset_dict_picks_the_split(pairs, tmp_path) -> None:
    datasets.DatasetDict(train=pairs, test=pairs.select(range(2))).save_to_disk(tmp_path / "dict")
    assert len(load_preference_dataset(tmp_path / "dict", split="test")) == 2
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['train', 'test'\]"):
        load_preference_dataset(tmp_path / "dict", split="validation")


def test_save_to_disk_folder_streams(pairs, tmp_path) -> None:
    pairs.save_to_disk(tmp_path / "single")
    stream = load_preference_dataset(tmp_path / "single", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert [row["prompt"] for row in stream] == pairs["prompt"]


def test_parquet_file_and_folder(pairs, pickapic_pairs, tmp_path) -> None:
    pairs.to_parquet(tmp_path / "pairs.parquet")
    _same_rows(load_preference_dataset(str(tmp_path / "pairs.parquet")), pairs)
    (tmp_path / "shards").mkdir()
    pickapic_pairs.select(range(5)).to_parquet(tmp_path / "shards" / "a.parquet")
    pickapic_pairs.select(range(5, 10)).to_parquet(tmp_path / "shards" / "b.parquet")
    loaded = load_preference_dataset(tmp_path / "shards")
    assert detect_schema(loaded.column_names) == "pickapic"
    assert loaded["caption"] == pickapic_pairs["caption"] and loaded["jpg_0"] == pickapic_pairs["jpg_0"]


def test_imagefolder_with_metadata(pairs, tmp_path) -> None:
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index, row in enumerate(pairs.select(range(4))):
            row["chosen"].save(folder / f"{index}_w.png")
            row["rejected"].save(folder / f"{index}_l.png")
            entry = {"chosen_file_name": f"{index}_w.png", "rejected_file_name": f"{index}_l.png"}
            metadata.write(json.dumps({**entry, "prompt": row["prompt"]}) + "\n")
    loaded = load_preference_dataset(str(folder))
    assert detect_schema(loaded.column_names) == "preference"
    _same_rows(loaded, pairs.select(range(4)))


def test_a_trainer_takes_a_local_dataset_path(pairs, tmp_path, make_config) -> None:
    pairs.save_to_disk(tmp_path / "data")
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(), str(tmp_path / "data"))
    assert len(trainer.train_dataset) == len(pairs)
    assert trainer.train_dataset[0]["pixel_values"].shape == (2, 3, 32, 32)


def test_a_file_that_is_not_a_dataset_is_an_error(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a parquet file nor a dataset folder"):
        load_preference_dataset(str(tmp_path / "notes.txt"))


def test_an_object_that_is_not_a_dataset_is_an_error() -> None:
    with pytest.raises(TypeError, match="not list"):
        load_preference_dataset([{"prompt": "a"}])


# ------------------------------------------------------------------------- through the trainer's config
def _trainer(make_config, source, eval_dataset=None, **overrides) -> DiffusionDPOTrainer:
    return DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(**overrides), source, eval_dataset=eval_dataset)


def test_a_path_reads_the_configured_train_and_test_splits(pairs, tmp_path, make_config) -> None:
    datasets.DatasetDict(fit=pairs, held=pairs.select(range(4))).save_to_disk(tmp_path / "dict")
    trainer = _trainer(make_config, str(tmp_path / "dict"), dataset_train_split="fit", dataset_test_split="held")
    assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (8, 4)
    assert trainer.eval_dataset.dataset["prompt"] == pairs["prompt"][:4]
    # No test split: no evaluation; an eval path of its own defaults to its 'test' split.
    assert _trainer(make_config, str(tmp_path / "dict"), dataset_train_split="fit").eval_dataset is None
    datasets.DatasetDict(test=pairs.select(range(2))).save_to_disk(tmp_path / "eval")
    trainer = _trainer(make_config, str(tmp_path / "dict"), str(tmp_path / "eval"), dataset_train_split="fit")
    assert len(trainer.eval_dataset) == 2
    with pytest.raises(ValueError, match=r"no split 'train'; its splits are \['fit', 'held'\]"):
        _trainer(make_config, str(tmp_path / "dict"))


def test_a_hub_id_is_loaded_with_the_config_name_splits_and_streaming(pairs, make_config, monkeypatch) -> None:
    calls = []

    def load_dataset(path, name=None, *, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming, kwargs))
        return pairs.to_iterable_dataset() if streaming else pairs

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    trainer = _trainer(
        make_config, "user/prefs", dataset_config="v2", dataset_test_split="validation_unique", dataset_streaming=True
    )
    assert calls == [
        ("user/prefs", "v2", "train", True, {}),
        ("user/prefs", "v2", "validation_unique", True, {}),
    ]  # never trust_remote_code or any other option
    assert isinstance(trainer.train_dataset, StreamingPreferenceDataset)
    assert isinstance(trainer.eval_dataset, StreamingPreferenceDataset)
    assert trainer.model_card("x").data.datasets == ["user/prefs"]


@pytest.mark.parametrize("form", ["save_to_disk", "parquet", "imagefolder"])
def test_every_local_form_streams(pairs, tmp_path, form) -> None:
    subset = pairs.select(range(4))
    if form == "save_to_disk":
        subset.save_to_disk(tmp_path / "data")
        source = tmp_path / "data"
    elif form == "parquet":
        source = tmp_path / "pairs.parquet"
        subset.to_parquet(source)
    else:
        source = _imagefolder(subset, tmp_path / "folder")
    stream = load_preference_dataset(source, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    rows = list(stream)
    assert [row["prompt"] for row in rows] == subset["prompt"]
    for row, original in zip(rows, subset, strict=True):
        assert load_image(row["chosen"]).tobytes() == original["chosen"].convert("RGB").tobytes()


def _imagefolder(rows: datasets.Dataset, folder: Path) -> Path:
    """An imagefolder of preference pairs: PNG files plus a metadata.jsonl naming them."""
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index, row in enumerate(rows):
            row["chosen"].save(folder / f"{index}_w.png")
            row["rejected"].save(folder / f"{index}_l.png")
            entry = {"chosen_file_name": f"{index}_w.png", "rejected_file_name": f"{index}_l.png"}
            metadata.write(json.dumps({**entry, "prompt": row["prompt"]}) + "\n")
    return folder


def test_a_flat_imagefolder_is_its_own_eval_split(pairs, tmp_path, make_config) -> None:
    folder = _imagefolder(pairs.select(range(4)), tmp_path / "eval")
    trainer = _trainer(make_config, pairs, str(folder))
    assert len(trainer.eval_dataset) == 4


def test_unpaired_rows_from_an_imagefolder_train_kto(pairs, tmp_path) -> None:
    folder = tmp_path / "unpaired"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index, row in enumerate(pairs.select(range(4))):
            for side, label in (("chosen", True), ("rejected", False)):
                row[side].save(folder / f"{index}_{side}.png")
                metadata.write(
                    json.dumps({"file_name": f"{index}_{side}.png", "prompt": row["prompt"], "label": label})
                )
                metadata.write("\n")
    args = DiffusionKTOConfig(output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=4,
                              max_steps=1, save_steps=0)  # fmt: skip
    trainer = DiffusionKTOTrainer(tiny_sd_pipeline(), args, str(folder))
    assert len(trainer.train_dataset) == 8 and trainer.train_dataset.processor.schema == "unpaired"
    assert [trainer.train_dataset[i]["label"] for i in range(2)] == [True, False]


def test_column_mapping_in_the_config_renames_before_detection(pairs, make_config) -> None:
    renamed = pairs.rename_columns({"prompt": "text", "chosen": "good", "rejected": "bad"})
    mapping = {"text": "prompt", "good": "chosen", "bad": "rejected"}
    trainer = _trainer(make_config, renamed, column_mapping=mapping)
    assert trainer.train_dataset[0]["prompt"] == pairs[0]["prompt"]
    with pytest.raises(ValueError, match=r"renames to \['winner'\], which no schema reads"):
        _trainer(make_config, renamed, column_mapping={"good": "winner"})
    with pytest.raises(ValueError, match=r"renames onto \['prompt'\], which the dataset already has"):
        _trainer(make_config, pairs.add_column("caption", pairs["prompt"]), column_mapping={"caption": "prompt"})
    with pytest.raises(ValueError, match="maps two columns to the same name"):
        make_config(column_mapping={"good": "chosen", "bad": "chosen"})


def test_a_stream_without_declared_columns_is_resolved_from_its_first_row(pairs) -> None:
    rows = pairs.select(range(2)).to_list()
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    assert stream.column_names is None
    resolved = load_preference_dataset(stream)
    assert detect_schema(resolved.column_names) == "preference"


def test_a_streamed_training_set_shuffles_each_epoch_and_runs_to_max_steps(pairs, tmp_path, make_config) -> None:
    pairs.save_to_disk(tmp_path / "data")
    args = dict(dataset_streaming=True, shuffle_buffer_size=8, max_steps=5)
    trainer = _trainer(make_config, str(tmp_path / "data"), **args)
    orders = []
    for epoch in range(2):
        trainer.train_dataset.epoch = epoch
        orders.append([item["prompt"] for item in trainer.train_dataset])
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(pairs["prompt"])
    assert orders[0] != orders[1] and orders[0] != pairs["prompt"]  # reshuffled, from a buffer
    trainer.train()  # 5 steps of 4 rows from 8 streamed rows: three epochs
    assert trainer.state.global_step == 5 and trainer.state.epoch == 2.0
    unshuffled = _trainer(make_config, str(tmp_path / "data"), **{**args, "shuffle_buffer_size": 0})
    assert [item["prompt"] for item in unshuffled.train_dataset] == pairs["prompt"]


def test_a_stream_too_short_for_one_batch_is_an_error_not_an_endless_loop(pairs, make_config) -> None:
    trainer = _trainer(make_config, pairs.select(range(3)).to_iterable_dataset(), max_steps=2)
    with pytest.raises(ValueError, match="gave no full batch of 4 rows"):
        trainer.train()


def test_streaming_needs_max_steps(make_config) -> None:
    with pytest.raises(ValueError, match="`dataset_streaming=True` set `max_steps`"):
        make_config(dataset_streaming=True, max_steps=-1)


# ---------------------------------------------------------------------------------------- loading failures
LOADERS = {"pipeline": load_pipeline, "dataset": load_preference_dataset}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_a_hub_id_not_found_offline_is_one_short_error_with_the_download_line(kind, monkeypatch) -> None:
    monkeypatch.delenv("DPT_DEBUG", raising=False)
    with pytest.raises(OSError) as raised:
        LOADERS[kind]("someone/not-there")
    message = str(raised.value)
    assert message.startswith(f"Cannot load the {kind} 'someone/not-there'") and "Hugging Face Hub" in message
    assert "`hf download someone/not-there" in message and "local_files_only" not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no chained tracebacks


def test_dpt_debug_keeps_the_libraries_traceback_behind_the_short_error(monkeypatch) -> None:
    monkeypatch.setenv("DPT_DEBUG", "1")
    with pytest.raises(OSError, match="Cannot load the dataset") as raised:
        load_preference_dataset("someone/not-there")
    assert raised.value.__cause__ is not None


def test_a_folder_without_a_pipeline_names_the_folder_and_why(tmp_path) -> None:
    with pytest.raises(OSError, match=rf"local folder {tmp_path} holds no loadable pipeline \(.*model_index\.json"):
        load_pipeline(str(tmp_path))


def test_a_path_that_does_not_exist_is_named_as_such(tmp_path) -> None:
    with pytest.raises(OSError, match="no local path of that name exists"):
        load_pipeline(str(tmp_path / "missing" / "model"))
