"""Cityscapes fine annotations: labelIds mapped to the 19 train ids (255 = ignore), or to the 13 classes of the
cross-city protocol (``label_set="cross_city"``: the 6 classes NTHU does not annotate become ignore)."""

from __future__ import annotations

from pathlib import Path

from datamodules.datasets.base import IdMapper, SemanticDataset, find_files, require_dir, require_pair
from datamodules.datasets.labels import CITYSCAPES_LABELID_TO_TRAINID, CROSS_CITY_LABELID_TO_TRAINID
from datamodules.errors import require_choice

IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"
LABEL_SETS = {"all": CITYSCAPES_LABELID_TO_TRAINID, "cross_city": CROSS_CITY_LABELID_TO_TRAINID}


class Cityscapes(SemanticDataset):
    """Fine-annotated frames of one split, sorted by city and frame. The test split's released gtFine files are
    placeholders (the benchmark server keeps the labels), so its frames are unlabelled images."""

    layout = "ROOT/leftImg8bit/{split}/CITY/*_leftImg8bit.png with ROOT/gtFine/{split}/CITY/*_gtFine_labelIds.png"

    def __init__(self, root, split: str = "train", label_set: str = "all"):
        require_choice("label_set", label_set, tuple(LABEL_SETS))
        root = require_dir(Path(root), self.layout)
        images = find_files(require_dir(root / "leftImg8bit" / split, self.layout), f"*/*{IMAGE_SUFFIX}", self.layout)
        pairs = []
        for image in images:
            label = root / "gtFine" / split / image.parent.name / image.name.replace(IMAGE_SUFFIX, LABEL_SUFFIX)
            pairs.append((image, None if split == "test" else require_pair(image, label, self.layout)))
        super().__init__(pairs, IdMapper(LABEL_SETS[label_set]))
