"""synth_regions: class-agnostic regions of procedural street scenes (a stand-in for SA-1B's region masks)."""

from __future__ import annotations

import cv2
import numpy as np
from torch.utils.data import Dataset

from datamodules.datasets.synth_streets import SyntheticStreets


def class_regions(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Connected components (8-connectivity) of every class of a label map as binary masks uint8[N,H,W].

    One OpenCV call per class present; components smaller than ``min_area`` pixels are dropped.
    """
    offset, region_map = 0, np.zeros(labels.shape, dtype=np.int64)
    for class_id in np.unique(labels):
        count, components = cv2.connectedComponents((labels == class_id).astype(np.uint8), connectivity=8)
        region_map = np.where(components > 0, components + offset, region_map)
        offset += count - 1
    ids, areas = np.unique(region_map[region_map > 0], return_counts=True)
    kept = ids[areas >= min_area]
    return (region_map[None] == kept[:, None, None]).astype(np.uint8)


class SyntheticStreetRegions(Dataset):
    """Class-agnostic regions of synthetic street scenes, for training a SAM on source images only.

    Each connected component of each class of a ``SyntheticStreets`` label map is one instance, so a
    SAM trained on it learns street-scene region boundaries without ever seeing target labels.
    """

    procedural = True

    def __init__(
        self,
        root=None,
        split: str = "train",
        *,
        domain: str = "synthetic",
        length: int = 400,
        size=(64, 128),
        seed: int = 0,
        min_area: int = 16,
    ):
        self.streets = SyntheticStreets(split=split, domain=domain, length=length, size=size, seed=seed)
        self.min_area = min_area

    def __len__(self) -> int:
        return len(self.streets)

    def __getitem__(self, index: int) -> dict:
        item = self.streets[index]
        return {
            "image": item["image"],
            "instances": class_regions(item["mask"], self.min_area),
            "meta": {"path": item["meta"]["path"].replace("synth_streets", "synth_regions")},
        }
