"""NTHU cross-city (Chen et al., "No More Discrimination: Cross City Adaptation of Road Scene Segmenters", ICCV 2017).

Four cities (Rome, Rio, Tokyo, Taipei), each a target domain of its own for a Cityscapes-trained model. The train
split is released without labels; the test split's ``*_eval.png`` hold Cityscapes labelIds of 13 classes, mapped
here to the 19 train ids (``CROSS_CITY_LABELID_TO_TRAINID``; every other id is ignore).
"""

from __future__ import annotations

from pathlib import Path

from datamodules.datasets.base import IdMapper, SemanticDataset, find_files, require_dir, require_pair
from datamodules.datasets.labels import CROSS_CITY_LABELID_TO_TRAINID
from datamodules.errors import DatasetLayoutError, require_choice

CITIES = ("Rome", "Rio", "Tokyo", "Taipei")
SPLIT_FOLDERS = {"train": "Train", "val": "Test", "test": "Test"}
LABEL_SUFFIX = "_eval.png"


class NTHUCrossCity(SemanticDataset):
    """One city's images: ``train`` unlabelled, ``val`` / ``test`` (the same folder) with labels."""

    layout = (
        "ROOT/CITY/Images/Train/*.jpg (unlabelled) and ROOT/CITY/Images/Test/NAME.jpg with "
        "ROOT/CITY/Labels/Test/NAME_eval.png (Cityscapes labelIds), CITY one of " + ", ".join(CITIES)
    )

    def __init__(self, root, split: str = "train", city: str = "Rome"):
        require_choice("city", city, CITIES)
        if split not in SPLIT_FOLDERS:
            raise DatasetLayoutError(f"unknown split '{split}'; expected one of {', '.join(SPLIT_FOLDERS)}")
        city_root = require_dir(Path(root) / city, self.layout)
        folder = SPLIT_FOLDERS[split]
        images = find_files(require_dir(city_root / "Images" / folder, self.layout), "*.jpg", self.layout)
        if split == "train":
            pairs = [(image, None) for image in images]
        else:
            labels = require_dir(city_root / "Labels" / folder, self.layout)
            pairs = [
                (image, require_pair(image, labels / f"{image.stem}{LABEL_SUFFIX}", self.layout)) for image in images
            ]
        super().__init__(pairs, IdMapper(CROSS_CITY_LABELID_TO_TRAINID))
