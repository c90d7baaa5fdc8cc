"""Rare class sampling (RCS; DAFormer, Hoyer et al., CVPR 2022, Sec. 3.2, mmseg/datasets/uda_dataset.py).

A source training item is drawn class first: class c with P(c) = softmax_c((1 - f_c) / T), f_c the share of
the source label pixels of class c (classes that occur); then, uniformly, an image holding more than
``min_pixels`` pixels of c; then its random crop, redrawn up to 10 times until the crop holds more than
``min_crop_ratio x min_pixels`` of them. ``min_pixels`` was set for GTA5's 1914 x 1052 label files, so it is
scaled by each label file's area against that reference.

The per-image class counts come from one pass over the source labels, cached as DAFormer caches its
``sample_class_stats.json``: under ``cache_directory(data_root)`` (datamodules/verify.py), keyed by the label
files' paths, sizes and times, so an edited dataset is counted again. Procedural datasets are counted in memory.
Every draw is a pure function of (seed, epoch, position), like every other training item, so a resumed or a
DDP run draws what an uninterrupted one does.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from datamodules.errors import ConfigError
from datamodules.files import write_atomically
from datamodules.loading import TrainingKey
from datamodules.verify import cache_directory, digest, stat_line

log = logging.getLogger(__name__)

# GTA5's label files, on which DAFormer's min_pixels = 3000 was set.
REFERENCE_AREA = 1914 * 1052
CROP_ATTEMPTS = 10


def image_class_counts(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class of one train-id map (ignore and ids >= num_classes not counted)."""
    ids = mask.ravel()
    return np.bincount(ids[ids < num_classes], minlength=num_classes)[:num_classes]


def class_statistics(dataset: Dataset, num_classes: int, data_root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(counts [N, C], label areas [N]) of a dataset's train-id maps, cached for file-backed datasets."""

    def count(index: int) -> np.ndarray:
        mask = dataset.train_ids(index)
        return np.append(image_class_counts(mask, num_classes), mask.size)

    def counted() -> np.ndarray:
        with ThreadPoolExecutor() as pool:
            return np.stack(list(pool.map(count, range(len(dataset)))))

    if getattr(dataset, "procedural", False):
        table = counted()
    else:
        labels = sorted(str(label) for _, label in dataset.file_pairs() if label is not None)
        signature = digest([f"classes {num_classes}", *map(stat_line, map(Path, labels))])
        cache_file = cache_directory(data_root) / f"rcs-{type(dataset).__name__}-{signature[:16]}.npy"
        try:
            table = np.load(cache_file)
            log.info("rare class sampling: class counts read from %s", cache_file)
        except (OSError, ValueError):
            table = counted()
            try:
                write_atomically(cache_file, lambda temporary: np.save(temporary, table))
            except OSError as error:
                log.warning("could not cache the class counts in %s (%s); the next run counts again", cache_file, error)
    return table[:, :num_classes], table[:, num_classes]


def class_probabilities(counts: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(classes that occur, P(c) = softmax((1 - f_c) / T)) from per-image counts [N, C]."""
    totals = counts.sum(0)
    classes = np.flatnonzero(totals)
    frequency = totals[classes] / totals.sum()
    logits = (1 - frequency) / temperature
    probabilities = np.exp(logits - logits.max())
    return classes, probabilities / probabilities.sum()


class RareClassSampled(Dataset):
    """A labelled training set addressed by ``(epoch, position)`` keys whose items are drawn by RCS; the
    position only seeds the draw. ``transform(item, seeds)`` is the stream's training transform."""

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable,
        seed: int,
        num_classes: int,
        settings: dict,
        data_root: str | None = None,
    ):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        counts, areas = class_statistics(dataset, num_classes, data_root)
        # Per image, the pixels of a class that make it an example of that class.
        self.min_pixels = settings["min_pixels"] * areas / REFERENCE_AREA
        self.min_crop_ratio = settings["min_crop_ratio"]
        classes, probabilities = class_probabilities(counts, settings["class_temp"])
        qualifies = counts > self.min_pixels[:, None]  # [N, C]
        keep = qualifies[:, classes].any(0)
        if not keep.any():
            raise ConfigError(
                f"rare class sampling: no source image holds more than min_pixels={settings['min_pixels']} "
                "(scaled to its size) of any class; expected labelled source images"
            )
        if not keep.all():
            log.warning(
                "rare class sampling: no image holds enough pixels of classes %s; they are not drawn",
                classes[~keep].tolist(),
            )
        self.classes, self.probabilities = classes[keep], probabilities[keep] / probabilities[keep].sum()
        self.examples = {c: np.flatnonzero(qualifies[:, c]) for c in self.classes}
        log.info(
            "rare class sampling: P(class) %s",
            ", ".join(f"{c}: {p:.3f}" for c, p in zip(self.classes, self.probabilities)),
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: TrainingKey) -> dict:
        epoch, position = key
        draws = np.random.SeedSequence([self.seed, epoch, position])
        choice_seeds, *crop_seeds = draws.spawn(1 + CROP_ATTEMPTS)
        rng = np.random.default_rng(choice_seeds)
        chosen = rng.choice(self.classes, p=self.probabilities)
        index = int(rng.choice(self.examples[chosen]))
        item = self.dataset[index]
        for seeds in crop_seeds:
            sample = self.transform(item, seeds)
            if (sample["mask"] == chosen).sum() > self.min_crop_ratio * self.min_pixels[index]:
                break
        return sample
