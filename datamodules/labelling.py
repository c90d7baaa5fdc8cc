"""The target train split as an offline labelling stage reads it (seco's ``stage=pseudo_label``).

Each item is one image at the task's working resolution, unaugmented: the uint8 image (for SAM), the normalised
tensor (for the segmenter) and the ground-truth mask, read for measuring the labels only (all-ignore where the
dataset has none). Labels written by the stage are named by ``index`` and stored at ``original_size``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.constants import IGNORE_INDEX
from datamodules.datasets import build_from_spec
from datamodules.errors import ConfigError
from datamodules.files import save_json
from datamodules.transforms import geometric_transform, to_tensor

PRODUCER_FILE = "producer.json"


def claim_label_dir(label_dir: Path, producer: dict, trainer) -> None:
    """Labels are reused only by the producer that made them: a label_dir written from another model or setting
    (``producer``: what the labels depend on) is refused, since none of its files would be recomputed."""
    path = Path(label_dir) / PRODUCER_FILE
    producer = json.loads(json.dumps(producer))  # as JSON holds it: tuples become lists
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = sorted(key for key in producer.keys() | recorded.keys() if producer.get(key) != recorded.get(key))
        if changed:
            raise ConfigError(
                f"method.label_dir={label_dir} holds labels made with a different {', '.join(changed)}; "
                "set a new method.label_dir (or delete that folder) to make labels for this model and setting"
            )
    elif trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_json(path, producer)
    trainer.strategy.barrier()


class TargetTrainImages(Dataset):
    def __init__(self, spec: dict):
        self.dataset = build_from_spec(spec, "train")
        self.geometry = geometric_transform(spec.get("resize"), None, train=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        mask = item.get("mask")
        mask = np.full(item["image"].shape[:2], IGNORE_INDEX, np.int64) if mask is None else mask.astype(np.int64)
        out = self.geometry(image=item["image"], mask=mask)
        return {
            "index": index,
            "image": out["image"],
            "img": to_tensor(out["image"]),
            "mask": torch.from_numpy(np.ascontiguousarray(out["mask"])),
            "original_size": torch.tensor(item["image"].shape[:2]),
        }


def collate_images(items: list) -> dict:
    """Tensors stacked; the uint8 images for SAM stay a list of HWC arrays."""
    return {
        "index": [item["index"] for item in items],
        "image": [item["image"] for item in items],
        "img": torch.stack([item["img"] for item in items]),
        "mask": torch.stack([item["mask"] for item in items]),
        "original_size": torch.stack([item["original_size"] for item in items]),
    }
