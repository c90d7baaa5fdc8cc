"""Loader pieces shared by the semantic and the SAM datamodules: the rank's share of a split, training keys that
make augmentation a pure function of (seed, epoch, index), a training loader that resumes mid-epoch, and the
training and evaluation DataLoader recipes."""

from __future__ import annotations

import ctypes
import itertools
import signal
import sys
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

PR_SET_PDEATHSIG = 1  # linux/prctl.h

# A training item's address: (epoch, dataset index). Its randomness is ``item_seeds(seed, epoch, index)``, so
# worker count, worker scheduling and restarts cannot change what a training step sees.
TrainingKey = tuple[int, int]


def item_seeds(seed: int, epoch: int, index: int) -> np.random.SeedSequence:
    """All randomness of one training item (spawn children for its independent draws)."""
    return np.random.SeedSequence([seed, epoch, index])


class TransformedDataset(Dataset):
    """``transform(dataset[index])`` for evaluation; with a ``seed``, a training set addressed by
    ``(epoch, index)`` keys whose transform draws from ``item_seeds(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset, transform: Callable, seed: int | None = None):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | TrainingKey) -> dict:
        if self.seed is None:
            return self.transform(self.dataset[key])
        epoch, index = key
        return self.transform(self.dataset[index], item_seeds(self.seed, epoch, index))


def rank_and_world(datamodule: L.LightningDataModule) -> tuple[int, int]:
    trainer = datamodule.trainer
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


class EpochSampler(Sampler[TrainingKey]):
    """The rank's share of one epoch of a training set as ``(epoch, index)`` keys, from position ``start``.

    The order is DistributedSampler's (shuffled with seed + epoch, tail dropped, every ``world``-th index for
    this rank); ``epoch`` and ``start`` are set by the ResumableLoader that owns the sampler before each pass.
    """

    def __init__(self, dataset: Dataset, rank: int, world: int, seed: int):
        self.share = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return len(self.share)

    def __iter__(self) -> Iterator[TrainingKey]:
        epoch = self.epoch
        self.share.set_epoch(epoch)
        for index in itertools.islice(iter(self.share), self.start, None):
            yield epoch, index


def training_sampler(dataset: Dataset, datamodule: L.LightningDataModule, seed: int) -> EpochSampler:
    """The rank's shuffled share of a training set (epochs reshuffle with the seed; the tail is dropped)."""
    rank, world = rank_and_world(datamodule)
    return EpochSampler(dataset, rank, world, seed)


def evaluation_indices(dataset: Dataset, datamodule: L.LightningDataModule) -> list[int]:
    """A disjoint strided share per rank without padding: summed over ranks, every image is scored exactly once
    (DistributedSampler would repeat images to even out the shares)."""
    rank, world = rank_and_world(datamodule)
    return list(range(rank, len(dataset), world))


def die_with_parent(worker_id: int) -> None:
    """Ask Linux to kill a loader worker when its parent dies: a killed run's workers would otherwise live on
    (holding their memory) until they next poll for it. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def loader_options(num_workers: int, collate_fn: Callable | None) -> dict:
    """What every loader shares. Its own torch generator: a new loader iterator draws its workers' base seed
    from it, so restarting a loader (a resume, a new epoch without persistent workers) leaves the process's
    global RNG, which the training steps draw from, untouched; workers draw nothing from their seeds."""
    return {
        "num_workers": num_workers,
        "collate_fn": collate_fn,
        "persistent_workers": num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
        "generator": torch.Generator().manual_seed(0),
        "worker_init_fn": die_with_parent,
    }


class ResumableLoader(DataLoader):
    """A training loader that resumes mid-epoch where it stopped.

    Lightning checkpoints ``state_dict()`` of a stateful training loader and hands it back to
    ``load_state_dict()`` on resume. The state is the epoch (this loader's pass, so a shorter stream that
    Lightning restarts within its epoch gets a new order) and the batches already handed to the training loop
    in it, counted here in the main process (workers and the sampler run ahead). A restored loader's next pass
    skips those batches' keys in the sampler, so they are neither loaded nor repeated; ``len`` stays the full
    epoch, as Lightning counts the restored batches itself.
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, batch_size: int, **options):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **options)
        self.epoch, self.batches, self.started = 0, 0, False

    def __iter__(self) -> Iterator:
        return self.pass_batches()

    def pass_batches(self) -> Iterator:
        """One pass: the next epoch after a started one, or the rest of the restored / current one."""
        if self.started:
            self.epoch, self.batches = self.epoch + 1, 0
        self.started = True
        self.sampler.epoch, self.sampler.start = self.epoch, self.batches * self.batch_size
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        """A finished pass is saved as the start of the next, so a resume never replays an empty remainder."""
        if self.batches == len(self):
            return {"epoch": self.epoch + 1, "batches": 0}
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches, self.started = state["epoch"], state["batches"], False


def build_training_loader(
    dataset: Dataset, sampler: EpochSampler, batch_size: int, num_workers: int, collate_fn: Callable | None = None
) -> ResumableLoader:
    return ResumableLoader(dataset, sampler, batch_size, **loader_options(num_workers, collate_fn))


def build_evaluation_loader(
    dataset: Dataset, indices: list[int], batch_size: int, num_workers: int, collate_fn: Callable | None = None
) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, **loader_options(num_workers, collate_fn))
