"""What every dataset file shares: the error type, image/label reading and the two item contracts.

Semantic datasets return ``{"image": uint8[H,W,3] RGB, "mask": int64[H,W] train ids (255 = ignore),
"meta": {"path": str}}``. Instance datasets (the SAM tasks) return ``{"image": uint8[H,W,3],
"instances": uint8[N,H,W] (one binary mask per instance), "meta": {"path": str}}``.
Prompts and tensors are made later (``datamodules/prompted.py``, ``datamodules/transforms.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from torch.utils.data import Dataset

IGNORE_INDEX = 255


class DatasetLayoutError(RuntimeError):
    """A dataset root, file or label that does not match the expected layout."""


def require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"{path} does not exist or is not a directory; expected layout: {layout}")
    return path


def find_files(directory: Path, pattern: str, layout: str) -> list[Path]:
    files = sorted(directory.glob(pattern))
    if not files:
        raise DatasetLayoutError(f"no files matching '{pattern}' under {directory}; expected layout: {layout}")
    return files


def require_pair(image: Path, label: Path, layout: str) -> Path:
    if not label.is_file():
        raise DatasetLayoutError(f"image {image} has no label file {label}; expected layout: {layout}")
    return label


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetLayoutError(f"{path} cannot be decoded as an image (missing, corrupt or not an image file)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    label = cv2.imread(str(path), flags)
    if label is None:
        raise DatasetLayoutError(f"{path} cannot be decoded as a label image (missing, corrupt or not a PNG)")
    return label


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise DatasetLayoutError(
            f"label {label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
            f"{image.shape[1]}x{image.shape[0]}; expected a label of the image's size"
        )


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """Dense id -> train id table; ids not in ``mapping`` become IGNORE_INDEX."""
    table = np.full(size, IGNORE_INDEX, dtype=np.int64)
    for source_id, train_id in mapping.items():
        table[source_id] = train_id
    return table


def interleaved_split(files: Sequence, train_per_eval: int, split: str) -> list:
    """WeSAM's split of a sorted file list: every (train_per_eval + 1)-th file is held out for evaluation."""
    period = train_per_eval + 1
    if split == "train":
        return [f for i, f in enumerate(files) if i % period != period - 1]
    if split in ("val", "test"):
        return [f for i, f in enumerate(files) if i % period == period - 1]
    raise DatasetLayoutError(f"unknown split '{split}'; expected one of train, val, test")


class SemanticDataset(Dataset):
    """Image/label pairs mapped to train ids by ``to_train_ids``; subclasses only discover files."""

    layout: str = ""

    def __init__(self, pairs: list[tuple[Path, Path]], to_train_ids: Callable[[np.ndarray], np.ndarray]):
        self.pairs = pairs
        self.to_train_ids = to_train_ids

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.pairs[index]
        image = read_rgb(image_path)
        label = self.to_train_ids(self.read_raw_label(label_path))
        check_same_size(image, label, image_path, label_path)
        return {"image": image, "mask": label, "meta": {"path": str(image_path)}}

    def read_raw_label(self, path: Path) -> np.ndarray:
        label = read_label(path)
        if label.ndim != 2:
            raise DatasetLayoutError(f"{path} has {label.shape[2]} channels; expected a single-channel id PNG")
        return label


class InstanceDataset(Dataset):
    """Images with per-instance binary masks; subclasses implement ``read_instances``."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        image_path = self.image_path(item)
        image = read_rgb(image_path)
        instances = self.read_instances(item, image.shape[:2])
        if instances.shape[1:] != image.shape[:2]:
            raise DatasetLayoutError(
                f"instance masks for {image_path} are {instances.shape[2]}x{instances.shape[1]} but the image is "
                f"{image.shape[1]}x{image.shape[0]}; expected masks of the image's size"
            )
        return {"image": image, "instances": instances, "meta": {"path": str(image_path)}}

    def image_path(self, item) -> Path:
        return item[0]

    def read_instances(self, item, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError


def instances_from_id_map(ids: np.ndarray, background: Sequence[int] = (0,)) -> np.ndarray:
    """One binary mask per distinct id of an instance-id map, background ids excluded (vectorised)."""
    values = np.unique(ids)
    values = values[~np.isin(values, background)]
    return (ids[None] == values[:, None, None]).astype(np.uint8)
