"""CAMO camouflaged objects: its own Train/Test folders, grey GT maps as instances."""

from __future__ import annotations

from pathlib import Path

from datamodules.datasets.base import GreyMapInstanceDataset, find_files, require_dir, require_pair
from datamodules.errors import DatasetLayoutError

FOLDERS = {"train": "Train", "val": "Test", "test": "Test"}


class CAMO(GreyMapInstanceDataset):
    """Images/Train for train, Images/Test for val and test; GT maps shared in one GT/ folder."""

    layout = "ROOT/Images/{Train,Test}/*.jpg with ROOT/GT/*.png (same stem)"

    def __init__(self, root, split: str = "train"):
        if split not in FOLDERS:
            raise DatasetLayoutError(f"unknown split '{split}' for CAMO; expected one of {list(FOLDERS)}")
        root = require_dir(Path(root), self.layout)
        images = find_files(require_dir(root / "Images" / FOLDERS[split], self.layout), "*.jpg", self.layout)
        gts = require_dir(root / "GT", self.layout)
        super().__init__([(image, require_pair(image, gts / f"{image.stem}.png", self.layout)) for image in images])
