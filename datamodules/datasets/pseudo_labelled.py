"""A dataset whose masks are pseudo-labels written to disk by another run (e.g. seco's stage=pseudo_label).

Wraps any semantic dataset spec; item ``index`` takes its image from the wrapped dataset and its mask from
``label_dir/{index:06d}.png`` (uint8 train ids, 255 = ignore, at the wrapped dataset's own resolution).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from datamodules.datasets.base import read_label
from datamodules.errors import DatasetLayoutError


def pseudo_label_path(label_dir: str | Path, index: int) -> Path:
    return Path(label_dir) / f"{index:06d}.png"


class PseudoLabelled(Dataset):
    layout = "label_dir/NNNNNN.png: one uint8 label map per item of the wrapped dataset, named by its index"

    def __init__(self, dataset: Dataset, label_dir: str | Path):
        self.dataset, self.label_dir = dataset, Path(label_dir)
        missing = [i for i in range(len(dataset)) if not pseudo_label_path(label_dir, i).is_file()]
        if missing:
            raise DatasetLayoutError(
                f"{len(missing)} of {len(dataset)} pseudo-labels are missing under {label_dir} "
                f"(first: {pseudo_label_path(label_dir, missing[0])}); run the method's labelling stage first "
                "(seco: stage=pseudo_label; bicl: stage=static_labels) and point the training run at its label_dir"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        mask = read_label(pseudo_label_path(self.label_dir, index))
        if mask.shape != item["image"].shape[:2]:
            raise DatasetLayoutError(
                f"{pseudo_label_path(self.label_dir, index)} is {mask.shape[0]}x{mask.shape[1]}, "
                f"the image is {item['image'].shape[0]}x{item['image'].shape[1]}"
            )
        return {**item, "mask": mask}
