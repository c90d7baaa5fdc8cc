"""NTHU cross-city (Chen et al., "No More Discrimination: Cross City Adaptation of Road Scene Segmenters", ICCV 2017).

Four cities (Rome, Rio, Tokyo, Taipei), each a target domain of its own for a Cityscapes-trained model. The train
split is released without labels; the test split's ``*_eval.png`` hold Cityscapes labelIds of 13 classes, mapped
here to the 19 train ids (``CROSS_CITY_LABELID_TO_TRAINID``; every other id is ignore).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.datasets.base import (
    IdMapper,
    SemanticDataset,
    find_files,
    read_id_map,
    read_indexed_png,
    require_dir,
    require_pair,
)
from datamodules.datasets.labels import CROSS_CITY_LABELID_TO_TRAINID
from datamodules.errors import DatasetLayoutError, require_choice

CITIES = ("Rome", "Rio", "Tokyo", "Taipei")
SPLIT_FOLDERS = {"train": "Train", "val": "Test", "test": "Test"}
LABEL_SUFFIX = "_eval.png"


class NTHUCrossCity(SemanticDataset):
    """One city's images: ``train`` unlabelled, ``val`` / ``test`` (the same folder) with labels."""

    layout = (
        "ROOT/CITY/Images/Train/*.jpg (unlabelled) and ROOT/CITY/Images/Test/NAME.jpg (or .png) with "
        "ROOT/CITY/Labels/Test/NAME_eval.png (Cityscapes labelIds), CITY one of " + ", ".join(CITIES)
    )

    def __init__(self, root, split: str = "train", city: str = "Rome"):
        require_choice("city", city, CITIES)
        if split not in SPLIT_FOLDERS:
            raise DatasetLayoutError(f"unknown split '{split}'; expected one of {', '.join(SPLIT_FOLDERS)}")
        city_root = require_dir(Path(root) / city, self.layout)
        folder = SPLIT_FOLDERS[split]
        images = release_images(require_dir(city_root / "Images" / folder, self.layout), self.layout)
        if split == "train":
            pairs = [(image, None) for image in images]
        else:
            labels = require_dir(city_root / "Labels" / folder, self.layout)
            pairs = [
                (image, require_pair(image, labels / f"{image.stem}{LABEL_SUFFIX}", self.layout)) for image in images
            ]
        super().__init__(pairs, IdMapper(CROSS_CITY_LABELID_TO_TRAINID))

    def read_raw_label(self, path: Path) -> np.ndarray:
        """An 8/16-bit grey id map, or a palette PNG whose indices are the ids (OpenCV would expand it to colours)."""
        try:
            with Image.open(path) as label:
                palette = label.mode == "P"
        except (OSError, SyntaxError, ValueError):
            palette = False  # read_id_map names what is wrong with the file
        return read_indexed_png(path) if palette else read_id_map(path)


def release_images(folder: Path, layout: str) -> list[Path]:
    """The folder's .jpg images, or .png where a copy of the release has them (Rio's test images in some); one file
    per name, the .jpg where a converter left both (sorted, NAME.jpg comes before NAME.png)."""
    by_stem: dict[str, Path] = {}
    for path in find_files(folder, "*.*", layout):
        if path.suffix in (".jpg", ".png"):
            by_stem.setdefault(path.stem, path)
    if not by_stem:
        raise DatasetLayoutError(f"no .jpg or .png images under {folder}; expected layout: {layout}")
    return sorted(by_stem.values())
