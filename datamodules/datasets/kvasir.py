"""Kvasir-SEG polyps: binary JPEG masks, one instance per connected component, 5:1 split."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from datamodules.datasets.base import (
    InstanceDataset,
    find_files,
    instances_from_id_map,
    interleaved_split,
    read_label,
    require_dir,
    require_pair,
)


class KvasirSEG(InstanceDataset):
    """Image/mask pairs; each connected polyp region is one instance (as the per-polyp boxes count them)."""

    layout = "ROOT/images/*.jpg with ROOT/masks/*.jpg (same stem)"

    def __init__(self, root, split: str = "train"):
        root = require_dir(Path(root), self.layout)
        images = find_files(require_dir(root / "images", self.layout), "*.jpg", self.layout)
        masks = require_dir(root / "masks", self.layout)
        pairs = [(image, require_pair(image, masks / image.name, self.layout)) for image in images]
        super().__init__(interleaved_split(pairs, 5, split))

    def read_label_map(self, item) -> np.ndarray:
        return read_label(item[1], cv2.IMREAD_GRAYSCALE)

    def read_instances(self, item, size: tuple[int, int]) -> np.ndarray:
        """JPEG masks carry compression noise, hence the >127 threshold before labelling components."""
        foreground = (self.read_label_map(item) > 127).astype(np.uint8)
        _, components = cv2.connectedComponents(foreground)
        return instances_from_id_map(components)
