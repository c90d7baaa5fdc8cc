"""The loader-speed script writes each dataset in its official layout at its real size and times both paths."""

from pathlib import Path

import numpy as np
import torch

from datamodules.constants import IMAGENET_MEAN, IMAGENET_STD
from datamodules.datasets.base import IdMapper
from datamodules.transforms import to_tensor
from experiments.loader_speed import measure


def test_measures_every_dataset_and_stream_on_real_sized_files():
    rows = measure(frames=1, repeats=1)
    assert [(row["dataset"], row["stream"]) for row in rows] == [
        ("gta5", "labelled"),
        ("gta5", "unlabelled"),
        ("cityscapes", "labelled"),
        ("cityscapes", "unlabelled"),
        ("synthia", "labelled"),
        ("synthia", "unlabelled"),
        ("kvasir", "instances"),
    ]
    assert all(row["raw"] > 0 and row["loader"] > 0 for row in rows)


def test_fast_paths_give_the_values_of_the_plain_formulas():
    """The loader's speed-ups (cv2.LUT for 8-bit ids, uint8 planes transposed before normalising) change no value."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32) * 255
    std = np.asarray(IMAGENET_STD, dtype=np.float32) * 255
    plain = torch.from_numpy(((image.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())
    assert torch.equal(to_tensor(image), plain)

    mapper = IdMapper({7: 0, 8: 1, 26: 13})
    label = rng.integers(0, 34, (40, 60), dtype=np.uint8)
    assert np.array_equal(mapper(label, Path("label.png")), mapper.table[label])
    wide = IdMapper({7: 0, 300: 1}, size=65536)
    label16 = rng.choice(np.array([7, 300, 5], np.uint16), (40, 60))
    assert np.array_equal(wide(label16, Path("label.png")), wide.table[label16])
