"""A killed run resumes to exactly the uninterrupted run: the training loaders' epoch position, per-item augmentation
seeds and the RNG states in the checkpoint. End to end, `python -m experiments.run` is SIGKILLed once its last.ckpt
is written mid-epoch, resumed with ckpt_path=last, and must end with the uninterrupted run's test metrics and
training-loss curve to the digit (deterministic mode)."""

from __future__ import annotations

import csv
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import Dataset, DistributedSampler

from datamodules.loading import EpochSampler, ResumableLoader, build_training_loader
from datamodules.uda import UDADataModule
from experiments.resume import capture_rng_states, restore_rng_states
from experiments.run import execute
from tests.conftest import compose_config, tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
# The tiny semantic runs have 16 images in batches of 4: four batches per epoch, so step 6 is mid-epoch 1. The
# prompted runs (SAM tasks) add the strong view's photometric draws, WeSAM's per-prompt decoding and dual_lora_sam's
# perturbation dropout and role counts to what must come back.
STEPS, CHECKPOINT_STEP = 12, 6


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


def completed_step(checkpoint: Path) -> int | None:
    """The checkpoint's global step, or None while it is still being written."""
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    except (RuntimeError, EOFError, pickle.UnpicklingError):
        return None


def kill_at_first_checkpoint(arguments: list[str], checkpoint: Path, log: Path, timeout: float = 600) -> int:
    """Run `python -m experiments.run` and SIGKILL it (with its loader workers) once ``checkpoint`` is complete.

    The run is stopped (SIGSTOP) before the file is read, so it cannot start the next write meanwhile.
    Returns the step the killed run had saved.
    """
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "experiments.run", *arguments],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if checkpoint.is_file():
                os.killpg(process.pid, signal.SIGSTOP)
                step = completed_step(checkpoint)
                if step is not None:
                    return step
                os.killpg(process.pid, signal.SIGCONT)
            time.sleep(0.02)
        raise AssertionError(f"no complete {checkpoint} (run exit code {process.poll()}): {log.read_text()[-3000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def training_losses(run_dir: Path, first_step: int) -> dict[int, float]:
    """train/loss per step from the CSV log; a resumed run appends to the killed run's, so its rows come last."""
    with (run_dir / "csv" / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
    return {int(row["step"]): float(row["train/loss"]) for row in rows if int(row["step"]) >= first_step}


@pytest.mark.parametrize(
    ("method", "task", "num_workers"),
    [
        ("source_only", "synth2real", 0),
        ("source_only", "synth2real", 2),
        ("mt_metric", "synth2real", 0),
        ("mt_metric", "synth2real", 2),
        ("sam_finetune", "synth_shapes", 0),
        ("wesam", "synth_polyp", 2),
        ("dual_lora_sam", "synth_shapes", 0),
    ],
)
def test_a_killed_run_resumes_to_the_uninterrupted_result(method, task, num_workers, tmp_path, request):
    # mt_metric with MOCM: its ClassMix draws from the process's torch RNG inside the training step.
    extra = []
    if method == "mt_metric":
        extra = [f"method.source_ckpt={request.getfixturevalue('source_ckpt')}", "method.mocm=true"]
    options = [
        "trainer.deterministic=true",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={CHECKPOINT_STEP}",
        "trainer.log_every_n_steps=1",
        f"data.num_workers={num_workers}",
        *extra,
    ]
    uninterrupted = execute(compose_config(method, task, tmp_path / "uninterrupted", *options))

    run_dir = tmp_path / "killed"
    arguments = tiny_overrides(method, task, run_dir, *options)
    killed_at = kill_at_first_checkpoint(arguments, run_dir / "checkpoints" / "last.ckpt", tmp_path / "killed.log")
    assert killed_at == CHECKPOINT_STEP and not (run_dir / "results.json").exists()
    resumed = execute(compose_config(method, task, run_dir, *options, "ckpt_path=last"))

    assert resumed["global_step"] == uninterrupted["global_step"] == STEPS
    assert resumed["metrics"] == uninterrupted["metrics"], f"resumed {resumed['metrics']} != {uninterrupted['metrics']}"
    if uninterrupted["kind"] == "semantic":
        assert resumed["per_class_iou"] == uninterrupted["per_class_iou"]
    losses = training_losses(tmp_path / "uninterrupted", CHECKPOINT_STEP)
    assert len(losses) == STEPS - CHECKPOINT_STEP and training_losses(run_dir, CHECKPOINT_STEP) == losses
