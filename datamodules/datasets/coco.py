"""COCO val2017 instances (WeSAM's COCO task): pycocotools masks, 6:1 interleaved split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO as CocoApi

from datamodules.datasets.base import InstanceDataset, interleaved_split, require_dir
from datamodules.errors import DatasetLayoutError

log = logging.getLogger(__name__)


class COCO(InstanceDataset):
    """val2017 only, as WeSAM uses it; items are (image path, non-crowd annotations).

    Images with no non-crowd annotation are dropped at discovery (WeSAM's convention: an image with no
    instance has no prompt to give) and the number dropped is logged; the split is taken afterwards.
    """

    layout = "ROOT/val2017/*.jpg with ROOT/annotations/instances_val2017.json"

    def __init__(self, root, split: str = "train", max_instances: int = 150):
        root = require_dir(Path(root), self.layout)
        images = require_dir(root / "val2017", self.layout)
        self.annotations = annotations = root / "annotations" / "instances_val2017.json"
        if not annotations.is_file():
            raise DatasetLayoutError(f"{annotations} is missing; expected layout: {self.layout}")
        try:
            self.api = CocoApi(str(annotations))
        except ValueError as error:  # json.JSONDecodeError
            raise DatasetLayoutError(
                f"{annotations} is not a valid COCO json ({error}); expected layout: {self.layout}"
            ) from error
        self.max_instances = max_instances
        items, dropped = [], 0
        for image_id in sorted(self.api.getImgIds()):
            path = images / self.api.imgs[image_id]["file_name"]
            if not path.is_file():
                raise DatasetLayoutError(
                    f"{annotations} lists image {path}, which is missing; expected layout: {self.layout}"
                )
            anns = [
                a
                for a in self.api.loadAnns(self.api.getAnnIds(imgIds=image_id, iscrowd=False))
                if a.get("area", 0) > 0 and a.get("segmentation")
            ]
            if anns:
                items.append((path, anns))
            else:
                dropped += 1
        if dropped:
            log.warning("COCO: dropped %d of %d images with no non-crowd instance", dropped, dropped + len(items))
        super().__init__(interleaved_split(items, 6, split))

    def label_source(self, item) -> Path:
        return self.annotations

    def read_instances(self, item, size: tuple[int, int]) -> np.ndarray:
        """Masks in annotation order, empty rasterisations skipped, at most ``max_instances``."""
        masks = [mask for mask in map(self.api.annToMask, item[1]) if mask.any()][: self.max_instances]
        return np.stack(masks) if masks else np.zeros((0, *size), dtype=np.uint8)
