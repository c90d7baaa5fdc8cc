"""Pascal VOC 2012 instance masks (SegmentationObject palette PNGs), WeSAM's 6:1 interleaved split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.datasets.base import (
    InstanceDataset,
    find_files,
    instances_from_id_map,
    interleaved_split,
    read_indexed_png,
    require_dir,
    require_pair,
)


class PascalVOC(InstanceDataset):
    """Every SegmentationObject PNG with its JPEG; palette index 0 is background, 255 the boundary band."""

    layout = "ROOT/SegmentationObject/*.png (palette PNG) with ROOT/JPEGImages/*.jpg (same stem)"

    def __init__(self, root, split: str = "train"):
        root = require_dir(Path(root), self.layout)
        labels = find_files(require_dir(root / "SegmentationObject", self.layout), "*.png", self.layout)
        images = require_dir(root / "JPEGImages", self.layout)
        pairs = [(images / f"{label.stem}.jpg", label) for label in labels]
        pairs = [(image, require_pair(image, label, self.layout)) for image, label in pairs]
        super().__init__(interleaved_split(pairs, 6, split))

    def read_label_map(self, item) -> np.ndarray:
        """The palette indices are the instance ids (OpenCV would return colours)."""
        return read_indexed_png(item[1])

    def read_instances(self, item, size: tuple[int, int]) -> np.ndarray:
        """255 marks the boundary band, 0 the background: neither is an instance."""
        return instances_from_id_map(self.read_label_map(item), background=(0, 255))
