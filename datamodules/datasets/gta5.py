"""GTA5: rendered frames labelled in Cityscapes labelIds; a source dataset, so every split uses all pairs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from datamodules.datasets.base import (
    IdMapper,
    SemanticDataset,
    find_files,
    read_indexed_png,
    require_dir,
    require_pair,
)
from datamodules.datasets.labels import CITYSCAPES_LABELID_TO_TRAINID

log = logging.getLogger(__name__)

# The release quotes 24,966 frames but ships 24,941 pairs: these ids have no label.
KNOWN_MISSING = frozenset(
    [*range(2154, 2159), *range(4634, 4638), *range(7115, 7120), *range(9683, 9689), *range(12050, 12055)]
)


class GTA5(SemanticDataset):
    """All image/label pairs found (the split name is ignored); ids known to lack a label can be skipped."""

    layout = "ROOT/images/NNNNN.png with ROOT/labels/NNNNN.png (palette PNG of Cityscapes labelIds)"
    # Most frames are 1914x1052, but in some pairs the image and its label differ by a few pixels; the usual
    # pipelines resize each to one scale (DAFormer: mmseg Resize to 1280x720) and never notice. Up to 2% a side, the
    # label is resized to its image.
    label_size_tolerance = 0.02

    def __init__(self, root, split: str = "train", skip_known_missing: bool = True):
        root = require_dir(Path(root), self.layout)
        images = find_files(require_dir(root / "images", self.layout), "*.png", self.layout)
        labels = require_dir(root / "labels", self.layout)
        pairs, skipped = [], 0
        for image in images:
            label = labels / image.name
            if skip_known_missing and not label.is_file() and image.stem.isdigit() and int(image.stem) in KNOWN_MISSING:
                skipped += 1
                continue
            pairs.append((image, require_pair(image, label, self.layout)))
        if skipped:
            log.warning("GTA5: skipped %d images whose ids are known to have no label", skipped)
        super().__init__(pairs, IdMapper(CITYSCAPES_LABELID_TO_TRAINID))

    def read_raw_label(self, path: Path) -> np.ndarray:
        """The labels ship as palette PNGs whose indices are the labelIds; a grey re-save is accepted too."""
        return read_indexed_png(path, ("P", "L"))
