"""SAM-task data: images resized and padded as SAM expects, instance masks, and ground-truth prompts.

WeSAM's protocol (../shared/DATASETS.md): the longest side is resized to ``image_size`` and the image
padded to a square; per instance, the prompts are its tight box, 5 positive + 5 negative points and a
coarse polygon (``cv2.approxPolyDP`` with epsilon = 0.05 x arc length), all derived on the *resized*
masks so they live in SAM's input frame. Evaluation prompts are a pure function of (seed, index), so
every run and rank scores the same prompts.

Items: ``{"img": float[3,S,S] (SAM-normalised, zero-padded), ("img_strong"), ("instances": float[N,S,S]),
"boxes": float[N,4] xyxy, "points": float[N,P+Q,2] xy, "point_labels": long[N,P+Q] (1 / 0 / -1 padding),
"polys": float[N,S,S], "input_size": (h, w), "original_size": (H, W), "meta"}``.
Batches: ``{"img": [B,3,S,S], ("img_strong"), "targets": [per-image dict without the images]}``.
"""
from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.datasets import build_dataset
from datamodules.datasets.base import DatasetLayoutError
from datamodules.transforms import strong_photometric_transform
from datamodules.uda import rank_and_world, seed_worker_transforms

# Sam.pixel_mean / Sam.pixel_std (segment_anything/build_sam.py), on the 0-255 scale.
SAM_PIXEL_MEAN = np.asarray((123.675, 116.28, 103.53), dtype=np.float32)
SAM_PIXEL_STD = np.asarray((58.395, 57.12, 57.375), dtype=np.float32)
# Points are scored per instance in chunks so that N x H x W score arrays stay small at 1024 x 1024.
POINT_CHUNK = 8
PADDING_POINT = -1  # SAM's prompt encoder label for "not a point" (embedded as not_a_point_embed)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes of bool/float[N,H,W] masks with inclusive max pixel indices (as SAM's amg).

    Vectorised over instances (torchvision's version loops over them); an empty mask gives a box
    whose min lies past its max.
    """
    rows, cols = masks.any(2), masks.any(1)
    height, width = masks.shape[1:]
    y0, x0 = rows.int().argmax(1), cols.int().argmax(1)
    y1 = height - 1 - rows.flip(1).int().argmax(1)
    x1 = width - 1 - cols.flip(1).int().argmax(1)
    return torch.stack([x0, y0, x1, y1], 1).float()


def sample_points(regions: np.ndarray, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pixels per region, uniformly without replacement while the region has enough pixels.

    Each pixel gets a random score, pixels outside the region a score below every inside one; the top
    ``count`` scores (argpartition) are the sample. A region with fewer pixels repeats its pixels; an
    empty region (e.g. negatives of an instance covering the image) yields SAM padding points.
    Returns xy float32[N,count,2] and a bool[N,count] validity flag.
    """
    n, height, width = regions.shape
    flat = regions.reshape(n, -1)
    chosen = np.zeros((n, count), dtype=np.int64)
    for start in range(0, n, POINT_CHUNK):
        inside = flat[start:start + POINT_CHUNK].astype(bool)
        scores = np.where(inside, rng.random(inside.shape, dtype=np.float32), -1.0)
        top = np.argpartition(-scores, count - 1, axis=1)[:, :count]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
        available = np.maximum(inside.sum(1), 1)
        chosen[start:start + POINT_CHUNK] = np.take_along_axis(top, np.arange(count)[None] % available[:, None], 1)
    valid = np.take_along_axis(flat, chosen, 1).astype(bool)
    points = np.stack([chosen % width, chosen // width], -1).astype(np.float32)
    return points, valid


def polygon_masks(instances: np.ndarray, poly_epsilon: float) -> np.ndarray:
    """Each instance's outer contours simplified by approxPolyDP (epsilon relative to arc length), filled.

    Every external contour is kept, so an instance split by occlusion keeps all of its parts.
    """
    polys = np.zeros_like(instances, dtype=np.uint8)
    for poly, mask in zip(polys, instances):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        simplified = [cv2.approxPolyDP(c, poly_epsilon * cv2.arcLength(c, True), True) for c in contours]
        cv2.fillPoly(poly, simplified, 1)
    return polys


def derive_prompts(instances: np.ndarray, rng: np.random.Generator, num_positive: int = 5,
                   num_negative: int = 5, poly_epsilon: float = 0.05) -> dict:
    """WeSAM's ground-truth prompts for every instance of one image (all in the masks' pixel frame)."""
    instances = instances.astype(np.uint8)
    positives, _ = sample_points(instances, rng, num_positive)
    negatives, negative_valid = sample_points(1 - instances, rng, num_negative)
    n = len(instances)
    labels = np.concatenate([np.ones((n, num_positive), np.int64),
                             np.where(negative_valid, 0, PADDING_POINT).astype(np.int64)], 1)
    return {"boxes": masks_to_boxes(torch.from_numpy(instances)).numpy(),
            "points": np.concatenate([positives, negatives], 1), "point_labels": labels,
            "polys": polygon_masks(instances, poly_epsilon)}


def weak_photometric_transform() -> A.Compose:
    """Mild colour jitter for supervised fine-tuning; geometry stays fixed so prompts stay exact."""
    return A.Compose([A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5)])


class PromptedTransform:
    """Train-time randomness of one worker: photometric views and the instance/point sampling rng.

    Exposes ``set_random_seed`` so ``seed_worker_transforms`` gives every loader worker its own stream.
    """

    def __init__(self, train: bool, strong_view: bool, seed: int):
        self.weak = weak_photometric_transform() if train else None
        self.strong = strong_photometric_transform() if strong_view else None
        self.set_random_seed(seed)

    def set_random_seed(self, seed: int) -> None:
        for offset, transform in enumerate((self.weak, self.strong)):
            if transform is not None:
                transform.set_random_seed(seed + offset)
        self.rng = np.random.default_rng(seed)

    def views(self, image: np.ndarray) -> dict:
        out = {"img": self.weak(image=image)["image"] if self.weak is not None else image}
        if self.strong is not None:
            out["img_strong"] = self.strong(image=image)["image"]
        return out


def pad_to_square(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the last two axes at the bottom/right to size x size (Sam.preprocess's padding)."""
    pad = [(0, 0)] * (array.ndim - 2) + [(0, size - array.shape[-2]), (0, size - array.shape[-1])]
    return np.pad(array, pad)


def sam_normalise(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 HWC RGB (already resized) -> float[3,size,size] exactly as Sam.preprocess computes it."""
    chw = ((image.astype(np.float32) - SAM_PIXEL_MEAN) / SAM_PIXEL_STD).transpose(2, 0, 1)
    return torch.from_numpy(pad_to_square(chw, size))


def resize_masks(instances: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour (pixel-centre aligned) resize of uint8[N,H,W] to size (h, w) by index lookup.

    Index lookup instead of cv2.resize: cv2 caps the channel count (128 in OpenCV 5), COCO has ~150.
    """
    def source_indices(new: int, old: int) -> np.ndarray:
        return np.minimum(((np.arange(new) + 0.5) * old / new).astype(np.int64), old - 1)

    rows = source_indices(size[0], instances.shape[1])
    cols = source_indices(size[1], instances.shape[2])
    return instances[:, rows[:, None], cols[None]]


class PromptedDataset(Dataset):
    """An InstanceDataset as SAM tensors with ground-truth prompts (see the module docstring).

    ``labelled=False`` drops the instance masks from the item (an unlabelled target stream still gets
    the prompts, which WeSAM treats as weak supervision).
    """

    def __init__(self, dataset: Dataset, image_size: int = 1024, train: bool = True, max_instances: int = 40,
                 strong_view: bool = False, seed: int = 0, labelled: bool = True):
        self.dataset, self.image_size, self.train = dataset, image_size, train
        self.max_instances, self.seed, self.labelled = max_instances, seed, labelled
        self.resizer = ResizeLongestSide(image_size)
        self.transform = PromptedTransform(train, strong_view, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def item_rng(self, index: int) -> np.random.Generator:
        """Eval prompts depend only on (seed, index); training draws from the worker's own stream."""
        return self.transform.rng if self.train else np.random.default_rng([self.seed, index])

    def select_instances(self, instances: np.ndarray, rng: np.random.Generator, path: str) -> np.ndarray:
        """Drop instances lost in resizing; in training keep a random subset of at most max_instances."""
        instances = instances[instances.any((1, 2))]
        if len(instances) == 0:
            raise DatasetLayoutError(f"{path} has no instance masks (after resizing to {self.image_size}); "
                                     "every image of a SAM task needs at least one instance")
        if self.train and len(instances) > self.max_instances:
            instances = instances[np.sort(rng.choice(len(instances), self.max_instances, replace=False))]
        return instances

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        path = item["meta"]["path"]
        original_size = tuple(item["image"].shape[:2])
        image = self.resizer.apply_image(item["image"])
        input_size = tuple(image.shape[:2])
        rng = self.item_rng(index)
        instances = self.select_instances(resize_masks(item["instances"], input_size), rng, path)
        prompts = derive_prompts(instances, rng)
        size = self.image_size
        sample = {name: sam_normalise(view, size) for name, view in self.transform.views(image).items()}
        if self.labelled:
            sample["instances"] = torch.from_numpy(pad_to_square(instances, size)).float()
        sample.update({
            "boxes": torch.from_numpy(prompts["boxes"]), "points": torch.from_numpy(prompts["points"]),
            "point_labels": torch.from_numpy(prompts["point_labels"]),
            "polys": torch.from_numpy(pad_to_square(prompts["polys"], size)).float(),
            "input_size": input_size, "original_size": original_size, "meta": item["meta"],
        })
        return sample


def collate_prompted(items: Sequence[dict]) -> dict:
    """Stack the images; everything per instance stays a per-image dict since N differs between images."""
    batch = {"img": torch.stack([item["img"] for item in items])}
    if "img_strong" in items[0]:
        batch["img_strong"] = torch.stack([item["img_strong"] for item in items])
    batch["targets"] = [{k: v for k, v in item.items() if k not in ("img", "img_strong")} for item in items]
    return batch


class PromptedDataModule(L.LightningDataModule):
    """One training stream (labelled or unlabelled-with-prompts) and the labelled val/test split."""

    def __init__(self, train_dataset: Dataset, val_dataset: Dataset, image_size: int = 1024, batch_size: int = 2,
                 num_workers: int = 2, max_instances: int = 40, strong_view: bool = False, seed: int = 0,
                 train_labelled: bool = True):
        super().__init__()
        self.train_set = PromptedDataset(train_dataset, image_size, train=True, max_instances=max_instances,
                                         strong_view=strong_view, seed=seed, labelled=train_labelled)
        self.val_set = PromptedDataset(val_dataset, image_size, train=False, seed=seed)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def loader(self, dataset: Dataset, sampler, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=drop_last, collate_fn=collate_prompted, worker_init_fn=seed_worker_transforms,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        rank, world = rank_and_world(self)
        sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                                     drop_last=True)
        return self.loader(self.train_set, sampler, drop_last=True)

    def eval_loader(self) -> DataLoader:
        # A disjoint strided share per rank without padding: every val image is scored exactly once.
        rank, world = rank_and_world(self)
        return self.loader(self.val_set, list(range(rank, len(self.val_set), world)), drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader()


def build_spec(spec: dict, default_split: str) -> Dataset:
    return build_dataset(spec["name"], spec.get("root"), spec.get("split", default_split), **(spec.get("options") or {}))


def build_prompted_datamodule(cfg: dict) -> PromptedDataModule:
    """``method.streams``: ["src"] trains on the labelled domain's train split, ["tgt"] on target train images."""
    data, streams = cfg["data"], list(cfg["method"]["streams"])
    if streams == ["src"]:
        labelled_domain = data["labelled_domain"]
        if labelled_domain not in ("source", "target"):
            raise ValueError(f"data.labelled_domain must be 'source' or 'target', got '{labelled_domain}'")
        if data.get(labelled_domain) is None:
            raise ValueError("this task has no source dataset, so methods that need labelled source data cannot run on it")
        train_spec, labelled = data[labelled_domain], True
    elif streams == ["tgt"]:
        train_spec, labelled = data["target"], False
    else:
        raise ValueError(f"SAM tasks train on one stream, ['src'] or ['tgt']; got {streams}")
    return PromptedDataModule(build_spec(train_spec, "train"), build_spec(data["val"], "val"),
                              image_size=cfg["model"]["image_size"], batch_size=data["batch_size"],
                              num_workers=data["num_workers"], max_instances=data["max_instances"],
                              strong_view=data["strong_view"], seed=cfg["seed"], train_labelled=labelled)
