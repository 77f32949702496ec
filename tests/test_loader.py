"""Data loaders kept for a run: workers start once, and batches equal those read in the training process."""

from __future__ import annotations

import os

import pytest
import torch

from diffusion_pref_trainers import DiffusionDPOTrainer
from diffusion_pref_trainers.data import RowKey
from diffusion_pref_trainers.loader import EpochBatchSampler
from diffusion_pref_trainers.testing import tiny_sd_pipeline


class _TaggedWithPid(torch.utils.data.Dataset):
    """The trainer's rows, each tagged with the id of the process that read it."""

    def __init__(self, rows: torch.utils.data.Dataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: RowKey) -> dict:
        return {**self.rows[key], "pid": torch.tensor(os.getpid())}


def _recorded_run(make_config, pairs, workers: int) -> tuple[list[tuple[list[str], torch.Tensor]], set[int]]:
    """Train 3 epochs of 8 rows (6 steps of 4), recording each batch's prompts and pixels and its readers' pids."""
    trainer = DiffusionDPOTrainer(
        tiny_sd_pipeline(),
        make_config(max_steps=6, random_flip=True, dataloader_num_workers=workers, overwrite_output_dir=True),
        pairs,
    )
    trainer.train_dataset = _TaggedWithPid(trainer.train_dataset)
    batches, pids = [], set()
    step = trainer._train_micro_step

    def record(batch: dict, *args) -> None:
        pids.update(batch.pop("pid").tolist())
        batches.append((batch["prompt"], batch["pixel_values"].clone()))
        step(batch, *args)

    trainer._train_micro_step = record
    trainer.train()
    assert trainer.state.epoch == 3.0
    return batches, pids


def test_training_starts_workers_once_and_sees_the_same_rows_and_flips(make_config, pairs) -> None:
    in_process, main_pids = _recorded_run(make_config, pairs, workers=0)
    in_workers, worker_pids = _recorded_run(make_config, pairs, workers=1)
    assert main_pids == {os.getpid()}
    assert len(worker_pids) == 1 and os.getpid() not in worker_pids  # one worker served all three epochs
    with pytest.raises(ProcessLookupError):  # and stopped when the run ended
        os.kill(worker_pids.pop(), 0)
    assert len(in_workers) == len(in_process) == 6
    for (prompts, pixels), (want_prompts, want_pixels) in zip(in_workers, in_process, strict=True):
        assert prompts == want_prompts
        assert torch.equal(pixels, want_pixels)
    # The epoch reached the worker: each epoch has its own order, and some row is flipped in one epoch only.
    orders = [in_process[i][0] + in_process[i + 1][0] for i in (0, 2, 4)]
    assert sorted(orders[0]) == sorted(pairs["prompt"]) and len({tuple(order) for order in orders}) == 3
    views = {}
    for prompts, pixels in in_process:
        for prompt, images in zip(prompts, pixels, strict=True):
            views.setdefault(prompt, []).append(images)
    assert any(not torch.equal(images[0], other) for images in views.values() for other in images[1:])


def _pixels(batches) -> list[tuple[list[str], torch.Tensor]]:
    return [(batch["prompt"], batch["pixel_values"]) for batch in batches]


def test_kept_loaders_resume_mid_epoch_and_keep_training_and_evaluation_apart(make_config, pairs) -> None:
    args = dict(random_flip=True, proportion_empty_prompts=0.5)
    plain = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(**args), pairs)
    kept = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(**args, dataloader_num_workers=2), pairs, pairs)
    training = kept._loaders.batches(kept.train_dataset, 3, 1, shuffle=True)
    first = next(training)
    evaluation = _pixels(kept._loaders.batches(kept.eval_dataset, 3, 0, shuffle=False))  # through the other kept loader
    assert [prompts for prompts, _ in evaluation] == [pairs["prompt"][0:3], pairs["prompt"][3:6], pairs["prompt"][6:]]
    got = _pixels([first, *training])
    for epoch, skip in ((1, 0), (2, 1), (0, 1), (1, 2)):
        if (epoch, skip) != (1, 0):
            got = _pixels(kept._loaders.batches(kept.train_dataset, 3, epoch, shuffle=True, skip=skip))
        want = _pixels(plain._loaders.batches(plain.train_dataset, 3, epoch, shuffle=True))[skip:]
        assert len(got) == len(want) == 2 - skip  # 8 rows in batches of 3: the last partial batch is dropped
        for (prompts, pixels), (want_prompts, want_pixels) in zip(got, want, strict=True):
            assert prompts == want_prompts and torch.equal(pixels, want_pixels)
    kept._loaders.close()


def test_the_sampler_shards_batches_and_skips_from_the_epoch_it_points_at() -> None:
    ordered = EpochBatchSampler(11, 2, seed=0, rank=1, world=2, shuffle=False)  # rows 0-9 split: 1, 3, 5, 7, 9 here
    assert list(ordered) == [[(0, 1), (0, 3)], [(0, 5), (0, 7)], [(0, 9)]]
    ordered.epoch, ordered.skip = 4, 2
    assert list(ordered) == [[RowKey(4, 9)]] and len(ordered) == 1
    shuffled = EpochBatchSampler(11, 2, seed=0, rank=1, world=2, shuffle=True)
    rows = []
    for epoch in (0, 1):
        shuffled.epoch = epoch
        batches = list(shuffled)
        assert len(batches) == len(shuffled) == 2  # 5 rows here: the partial batch is dropped
        assert {key.epoch for batch in batches for key in batch} == {epoch}
        rows.append([key.row for batch in batches for key in batch])
    assert rows[0] != rows[1] and len(set(rows[0])) == 4
