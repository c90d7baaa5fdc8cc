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
    """val2017 only, as WeSAM uses it (``datasets/COCO.py``); items are (image path, annotations).

    As WeSAM: the 6:1 split is taken over all sorted image ids, then the images with no annotation are dropped (their
    number is logged); every annotation is an instance, crowd regions included, up to 151 per image (its
    ``len(masks) > 150`` stop). Unlike WeSAM, an annotation without area or segmentation is skipped at discovery, so an
    image left with none is dropped too instead of failing when read.
    """

    layout = "ROOT/val2017/*.jpg with ROOT/annotations/instances_val2017.json"

    def __init__(self, root, split: str = "train", max_instances: int = 151):
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
        split_ids = interleaved_split(sorted(self.api.getImgIds()), 6, split)
        for image_id in split_ids:
            path = images / self.api.imgs[image_id]["file_name"]
            if not path.is_file():
                raise DatasetLayoutError(
                    f"{annotations} lists image {path}, which is missing; expected layout: {self.layout}"
                )
            anns = [
                a
                for a in self.api.loadAnns(self.api.getAnnIds(imgIds=image_id))
                if a.get("area", 0) > 0 and a.get("segmentation")
            ]
            if anns:
                items.append((path, anns))
            else:
                dropped += 1
        if dropped:
            log.warning("COCO %s: dropped %d of %d images with no annotation", split, dropped, len(split_ids))
        super().__init__(items)

    def label_source(self, item) -> Path:
        return self.annotations

    def read_instances(self, item, size: tuple[int, int]) -> np.ndarray:
        """Masks in annotation order, empty rasterisations skipped, at most ``max_instances``."""
        masks = [mask for mask in map(self.api.annToMask, item[1]) if mask.any()][: self.max_instances]
        return np.stack(masks) if masks else np.zeros((0, *size), dtype=np.uint8)
