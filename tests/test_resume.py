"""What a resumed run needs: the training loaders' epoch position, per-item augmentation seeds, and the RNG states
in the checkpoint."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import Dataset, DistributedSampler

from datamodules.loading import EpochSampler, ResumableLoader, build_training_loader
from datamodules.uda import UDADataModule
from experiments.resume import capture_rng_states, restore_rng_states


class KeyDataset(Dataset):
    """Items are their own training keys; ``loaded`` records what was read (in this process)."""

    def __init__(self, length: int):
        self.length, self.loaded = length, []

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key) -> torch.Tensor:
        self.loaded.append(key)
        return torch.tensor(key)


def key_loader(dataset: Dataset, num_workers: int) -> ResumableLoader:
    return build_training_loader(dataset, EpochSampler(dataset, rank=0, world=1, seed=3), 4, num_workers)


def keys(batches) -> list[list[int]]:
    return [batch.tolist() for batch in batches]


def test_epoch_sampler_keeps_distributed_sampler_shares():
    dataset = KeyDataset(23)
    for rank in range(3):
        sampler, reference = (
            EpochSampler(dataset, rank, 3, seed=5),
            DistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=True, seed=5, drop_last=True),
        )
        for epoch in (0, 1):
            sampler.epoch = epoch
            reference.set_epoch(epoch)
            assert list(sampler) == [(epoch, index) for index in reference]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_loader_yields_exactly_the_rest_of_its_epoch(num_workers):
    uninterrupted = key_loader(KeyDataset(22), num_workers)
    first_epoch, second_epoch = keys(uninterrupted), keys(uninterrupted)
    interrupted = key_loader(KeyDataset(22), num_workers)
    iterator = iter(interrupted)
    handed_out = keys(next(iterator) for _ in range(2))  # the workers have prefetched further
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "batches": 2}

    dataset = KeyDataset(22)
    restored = key_loader(dataset, num_workers)
    restored.load_state_dict(state)
    rest = keys(restored)
    assert handed_out + rest == first_epoch and len(restored) == len(first_epoch) == 5
    if num_workers == 0:  # the skipped batches are not even loaded
        assert dataset.loaded == [tuple(key) for batch in rest for key in batch]
    assert keys(restored) == second_epoch
    assert first_epoch != second_epoch and {key[0] for batch in second_epoch for key in batch} == {1}


def test_a_finished_epoch_is_saved_as_the_start_of_the_next():
    loader = key_loader(KeyDataset(8), 0)
    keys(loader)
    assert loader.state_dict() == {"epoch": 1, "batches": 0}


def test_a_shorter_stream_restarts_with_its_next_epoch():
    short, long = key_loader(KeyDataset(8), 0), key_loader(KeyDataset(16), 0)
    combined = CombinedLoader({"short": short, "long": long}, "max_size_cycle")
    assert [{key[0] for key in batch["short"].tolist()} for batch, _, _ in combined] == [{0}, {0}, {1}, {1}]


def test_training_batches_do_not_depend_on_the_worker_count():
    spec = {"name": "synth_streets", "split": "train", "options": {"domain": "real", "length": 12, "size": [32, 64]}}

    def two_epochs(num_workers: int) -> list[torch.Tensor]:
        val = {**spec, "split": "val"}
        datamodule = UDADataModule(None, spec, val, ["tgt"], strong_view=True, batch_size=3, num_workers=num_workers)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()["tgt"]
        return [batch[view] for _ in range(2) for batch in loader for view in ("img", "img_strong")]

    serial, parallel = two_epochs(0), two_epochs(2)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
    assert not torch.equal(serial[0], serial[8])  # the epochs differ: a new order and new draws


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    saved = capture_rng_states()
    expected = (np.random.rand(), torch.rand(1).item(), random.random())
    torch.save(saved, tmp_path / "states.pt")
    restore_rng_states(torch.load(tmp_path / "states.pt", weights_only=True))
    assert (np.random.rand(), torch.rand(1).item(), random.random()) == expected
