"""COD10K camouflaged objects: the Test folder split 4:1 (WeSAM), grey GT maps as instances."""

from __future__ import annotations

from pathlib import Path

from datamodules.datasets.base import GreyMapInstanceDataset, find_files, interleaved_split, require_dir, require_pair


class COD10K(GreyMapInstanceDataset):
    """The Test folder only (as WeSAM uses it), every 5th sorted image held out for evaluation."""

    layout = "ROOT/Test/Image/*.jpg with ROOT/Test/GT_Object/*.png (same stem)"

    def __init__(self, root, split: str = "train"):
        root = require_dir(Path(root), self.layout)
        images = find_files(require_dir(root / "Test" / "Image", self.layout), "*.jpg", self.layout)
        gts = require_dir(root / "Test" / "GT_Object", self.layout)
        pairs = [(image, require_pair(image, gts / f"{image.stem}.png", self.layout)) for image in images]
        super().__init__(interleaved_split(pairs, 4, split))
