"""Loader pieces shared by the semantic and the SAM datamodules: per-worker augmentation seeds, the rank's
share of a split, and one DataLoader recipe."""

from __future__ import annotations

import ctypes
import signal
import sys
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class TransformedDataset(Dataset):
    """``transform(dataset[index])``; the transform is reachable as ``.transform`` for ``seed_worker_transforms``."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.dataset[index])


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies: a killed run's loader workers would otherwise live on
    (holding their memory) until they next poll for it. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def init_worker(worker_id: int) -> None:
    die_with_parent()
    seed_worker_transforms(worker_id)


def seed_worker_transforms(worker_id: int) -> None:
    """Give each loader worker its own, reproducible augmentation stream.

    Albumentations keeps its own generator; torch derives ``initial_seed`` of a worker from the
    (seeded) main process, so this is deterministic and differs between workers.
    """
    dataset = torch.utils.data.get_worker_info().dataset
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**31)


def rank_and_world(datamodule: L.LightningDataModule) -> tuple[int, int]:
    trainer = datamodule.trainer
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def training_sampler(dataset: Dataset, datamodule: L.LightningDataModule, seed: int) -> DistributedSampler:
    """The rank's shuffled share of a training set (epochs reshuffle with the seed; the tail is dropped)."""
    rank, world = rank_and_world(datamodule)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)


def evaluation_indices(dataset: Dataset, datamodule: L.LightningDataModule) -> list[int]:
    """A disjoint strided share per rank without padding: summed over ranks, every image is scored exactly once
    (DistributedSampler would repeat images to even out the shares)."""
    rank, world = rank_and_world(datamodule)
    return list(range(rank, len(dataset), world))


def build_loader(
    dataset: Dataset, sampler, batch_size: int, num_workers: int, drop_last: bool, collate_fn: Callable | None = None
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_fn,
        worker_init_fn=init_worker,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
