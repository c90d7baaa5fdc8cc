"""SYNTHIA-RAND-CITYSCAPES: 16-bit label PNGs whose R channel holds the SYNTHIA class id."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.datasets.base import IdMapper, SemanticDataset, find_files, read_label, require_dir, require_pair
from datamodules.datasets.labels import SYNTHIA_ID_TO_TRAINID
from datamodules.errors import DatasetLayoutError

# The official SYNTHIA-RAND-CITYSCAPES archive unpacks into this folder.
ARCHIVE_FOLDER = "RAND_CITYSCAPES"


def unpacked_root(root: Path) -> Path:
    """ROOT itself when it holds RGB/, else ROOT/RAND_CITYSCAPES when that does (the archive unpacked in place)."""
    archive = root / ARCHIVE_FOLDER
    return archive if not (root / "RGB").is_dir() and (archive / "RGB").is_dir() else root


class Synthia(SemanticDataset):
    """All RGB/label pairs (a source dataset: the split name is ignored); ids mapped to the 19 train ids."""

    layout = (
        "ROOT/RGB/NNNNNNN.png with ROOT/GT/LABELS/NNNNNNN.png (16-bit, class id in the R channel), "
        f"or both under ROOT/{ARCHIVE_FOLDER}/ as the official archive unpacks"
    )

    def __init__(self, root, split: str = "train"):
        root = unpacked_root(require_dir(Path(root), self.layout))
        images = find_files(require_dir(root / "RGB", self.layout), "*.png", self.layout)
        labels = require_dir(root / "GT" / "LABELS", self.layout)
        pairs = [(image, require_pair(image, labels / image.name, self.layout)) for image in images]
        super().__init__(pairs, IdMapper(SYNTHIA_ID_TO_TRAINID, size=65536))

    def read_raw_label(self, path: Path) -> np.ndarray:
        """PIL misreads these PNGs; OpenCV returns BGR(A), so the class id (R) is channel 2."""
        label = read_label(path)
        if label.ndim == 2:
            return label
        if label.shape[2] < 3:
            raise DatasetLayoutError(f"{path} has {label.shape[2]} channels; expected 1, or 3+ with the id in R")
        return label[..., 2]
