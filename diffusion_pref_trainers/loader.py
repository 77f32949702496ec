"""Data loaders kept for a whole run, so worker processes start once instead of every epoch.

A persistent worker holds its own copy of the dataset, so an attribute set in the training process between epochs
would never reach it: the epoch travels with the indices instead. Each kept loader has one `EpochBatchSampler`,
which the trainer points at the next epoch's batches; it yields `RowKey(epoch, row)` keys, from which the map-style
datasets seed each row's crop, flip and blanked prompt. Rows, order and draws are those of `dataloader_num_workers=0`.

A streamed dataset has no indices to carry its epoch: it gets a fresh loader, and fresh workers, every epoch, its
`epoch` set before they copy it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator

from diffusion_pref_trainers.configs import DiffusionTrainingConfig
from diffusion_pref_trainers.data import RowKey, StreamingPreferenceDataset, collate, row_seed


class EpochBatchSampler(torch.utils.data.Sampler[list[RowKey]]):
    """This process's batches of epoch `epoch` from batch `skip` on, in an order fixed by (seed, epoch)."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int, world: int, *, shuffle: bool) -> None:
        self.length, self.batch_size, self.seed, self.shuffle = length, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch = self.skip = 0

    def __iter__(self) -> Iterator[list[RowKey]]:
        """Listed when iteration starts; shuffled (training) batches drop a last partial one, ordered ones keep it."""
        order = torch.arange(self.length)
        if self.shuffle:
            generator = torch.Generator().manual_seed(row_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.length, generator=generator)
        rows = order[: self.length // self.world * self.world][self.rank :: self.world].tolist()
        batches = [rows[start : start + self.batch_size] for start in self._starts()]
        return iter([[RowKey(self.epoch, row) for row in batch] for batch in batches])

    def __len__(self) -> int:
        """Batches left in this epoch (after `skip`)."""
        return len(self._starts())

    def _starts(self) -> range:
        """Where this epoch's batches start in this process's share of the rows."""
        rows = self.length // self.world
        stop = rows - self.batch_size + 1 if self.shuffle else rows
        return range(self.skip * self.batch_size, stop, self.batch_size)


class Loaders:
    """A trainer's data loaders: one kept per role (shuffled training, ordered evaluation) until `close`.

    A kept loader has one iterator: a new epoch of a role ends the previous one, while evaluation during training
    reads through its own loader.
    """

    def __init__(self, args: DiffusionTrainingConfig, accelerator: Accelerator) -> None:
        self.seed = args.seed if args.data_seed is None else args.data_seed
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.workers = args.dataloader_num_workers
        pin_memory = args.dataloader_pin_memory and accelerator.device.type == "cuda"
        self.options = dict(collate_fn=collate, num_workers=self.workers, pin_memory=pin_memory)
        self.kept: dict[bool, tuple[torch.utils.data.DataLoader, EpochBatchSampler]] = {}

    def batches(
        self, dataset: torch.utils.data.Dataset, batch_size: int, epoch: int, *, shuffle: bool, skip: int = 0
    ) -> Iterator[dict[str, Any]]:
        """This process's batches of one epoch, in an order fixed by (seed, epoch); `skip` resumes mid-epoch."""
        if isinstance(dataset, StreamingPreferenceDataset):  # already this process's share (the trainer splits it)
            dataset.epoch = epoch
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=shuffle, **self.options)
            return itertools.islice(loader, skip, None)
        kept = self.kept.get(shuffle)
        if kept is None or kept[0].dataset is not dataset or kept[1].batch_size != batch_size:
            sampler = EpochBatchSampler(len(dataset), batch_size, self.seed, self.rank, self.world, shuffle=shuffle)
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, persistent_workers=self.workers > 0, **self.options
            )
            kept = self.kept[shuffle] = loader, sampler
        loader, sampler = kept
        sampler.epoch, sampler.skip = epoch, skip
        return iter(loader)

    def close(self) -> None:
        """Drop the kept loaders, which stops their workers."""
        self.kept.clear()
