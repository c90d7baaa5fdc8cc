"""Kvasir-SEG polyps: one instance per annotated polyp box (WeSAM's protocol), 5:1 split."""

from __future__ import annotations

import json
import logging
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
from datamodules.errors import DatasetLayoutError

log = logging.getLogger(__name__)

BOXES_FILE = "kavsir_bboxes.json"  # the release's spelling


class KvasirSEG(InstanceDataset):
    """Image/mask pairs; items are (image, mask, polyp boxes or None).

    With the release's ``kavsir_bboxes.json`` (WeSAM ``datasets/Polyp.py``): the images in the json's order, split
    5:1 in that order; every pixel above 0 of the JPEG mask is foreground, each box takes the foreground inside it (a
    later box over an earlier one), foreground outside every box is dropped, and each box is one instance. Without
    the json (a copy that lost it): the sorted images, the mask above 127 (JPEG noise), one instance per connected
    region, said in one warning.
    """

    layout = f"ROOT/images/*.jpg with ROOT/masks/*.jpg (same stem) and ROOT/{BOXES_FILE}"

    def __init__(self, root, split: str = "train"):
        root = require_dir(Path(root), self.layout)
        image_dir = require_dir(root / "images", self.layout)
        boxes_file = root / BOXES_FILE
        if boxes_file.is_file():
            boxes = read_boxes(boxes_file, self.layout)
            images = [image_dir / f"{stem}.jpg" for stem in boxes]
            for image in images:
                if not image.is_file():
                    raise DatasetLayoutError(f"{boxes_file} lists {image}, which is missing; expected: {self.layout}")
        else:
            log.warning("Kvasir-SEG: no %s; one instance per connected mask region, sorted images", boxes_file)
            images = find_files(image_dir, "*.jpg", self.layout)
            boxes = {}
        masks = require_dir(root / "masks", self.layout)
        items = [
            (image, require_pair(image, masks / image.name, self.layout), boxes.get(image.stem)) for image in images
        ]
        super().__init__(interleaved_split(items, 5, split))

    def read_label_map(self, item) -> np.ndarray:
        return read_label(item[1], cv2.IMREAD_GRAYSCALE)

    def read_instances(self, item, size: tuple[int, int]) -> np.ndarray:
        mask, boxes = self.read_label_map(item), item[2]
        if boxes is None:
            _, components = cv2.connectedComponents((mask > 127).astype(np.uint8))
            return instances_from_id_map(components)
        ids = np.zeros(mask.shape, np.uint8)
        for number, (x_min, y_min, x_max, y_max) in enumerate(boxes, start=1):
            ids[y_min:y_max, x_min:x_max] = number
        return instances_from_id_map(np.where(mask > 0, ids, 0))


def read_boxes(path: Path, layout: str) -> dict[str, list[tuple[int, int, int, int]]]:
    """{image stem: [(x_min, y_min, x_max, y_max), ...]} in the file's order."""
    try:
        entries = json.loads(path.read_text())
        return {
            stem: [tuple(max(0, int(b[side])) for side in ("xmin", "ymin", "xmax", "ymax")) for b in entry["bbox"]]
            for stem, entry in entries.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DatasetLayoutError(
            f"{path} is not a Kvasir-SEG box file ({error!r}); expected {{stem: {{'bbox': [{{'xmin', 'ymin', 'xmax', "
            f"'ymax', ...}}]}}}} as the release ships it; layout: {layout}"
        ) from error
