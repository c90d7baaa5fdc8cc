"""OCID cluttered tabletop sequences: rgb/ frames with label/ instance-id maps, 6:1 split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from datamodules.datasets.base import (
    InstanceDataset,
    find_files,
    instances_from_id_map,
    interleaved_split,
    read_id_map,
    require_dir,
    require_pair,
)

log = logging.getLogger(__name__)


class OCID(InstanceDataset):
    """Every sequence frame under ROOT with at least one object; items are (image, label, background ids).

    Each sequence starts from a scene with no object on it; as WeSAM (``datasets/OCID.py`` ``check_empty``), those
    frames are dropped before the split (every label is read once at discovery) and their number is logged.
    """

    layout = "ROOT/**/*seq*/rgb/*.png with ROOT/**/*seq*/label/*.png (same name)"

    def __init__(self, root, split: str = "train"):
        root = require_dir(Path(root), self.layout)
        images = find_files(root, "**/*seq*/rgb/*.png", self.layout)
        items, empty = [], 0
        for image in images:
            label = require_pair(image, image.parent.parent / "label" / image.name, self.layout)
            # Label 1 is the floor; in table sequences 2 is the table top, also background.
            background = (0, 1, 2) if "table" in str(image.relative_to(root)) else (0, 1)
            if np.isin(read_id_map(label), background).all():
                empty += 1
            else:
                items.append((image, label, background))
        if empty:
            log.warning("OCID: dropped %d of %d frames with no object", empty, len(images))
        super().__init__(interleaved_split(items, 6, split))

    def read_label_map(self, item) -> np.ndarray:
        return read_id_map(item[1])

    def read_instances(self, item, size: tuple[int, int]) -> np.ndarray:
        return instances_from_id_map(self.read_label_map(item), background=item[2])
