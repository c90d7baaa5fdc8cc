"""Albumentations pipelines for the semantic tasks.

Geometry (resize, crop, flip) is applied once to image and mask; the weak view is that result, the
strong view (for self-training methods) adds photometric noise to the *same* crop, so a teacher's
prediction on the weak view is a pixel-aligned label for the strong view.
"""

from __future__ import annotations

import random
from typing import Sequence

import albumentations as A
import numpy as np
import torch

from datamodules.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

# mmseg's RandomCrop with cat_max_ratio redraws a crop at most this many times.
CROP_REDRAWS = 10


def geometric_transform(resize: Sequence[int] | None, crop: Sequence[int] | None, train: bool) -> A.Compose:
    """Resize to (h, w) as the papers' protocols do, then random crop and flip for training."""
    steps = []
    if resize is not None:
        steps.append(A.Resize(height=int(resize[0]), width=int(resize[1])))
    if train and crop is not None:
        steps.append(A.PadIfNeeded(min_height=int(crop[0]), min_width=int(crop[1]), fill=0, fill_mask=255))
        steps.append(A.RandomCrop(height=int(crop[0]), width=int(crop[1])))
    if train:
        steps.append(A.HorizontalFlip(p=0.5))
    return A.Compose(steps)


def strong_photometric_transform() -> A.Compose:
    """DAFormer/mean-teacher style strong view: colour jitter, grey, blur (no geometry)."""
    return A.Compose(
        [
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
            A.ToGray(p=0.2),
            A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, 2.0), p=0.5),
        ]
    )


def seed_pipeline(pipeline: A.Compose, seeds: np.random.SeedSequence) -> None:
    """Every step of ``pipeline`` draws from one numpy and one python stream made from ``seeds``.

    Not ``Compose.set_random_seed``: it gives each step its own generator with the *same* seed, so the steps'
    first draws would be equal (ToGray, p=0.2, would then only ever follow ColorJitter, p=0.8).
    """
    numpy_generator = np.random.default_rng(seeds)
    pipeline.set_random_state(numpy_generator, random.Random(int(numpy_generator.integers(2**63))))


PIXEL_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1) * 255
PIXEL_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1) * 255


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW normalised with ImageNet statistics (timm backbones' convention)."""
    # The uint8 planes are transposed before the float conversion: a quarter of the bytes moved, the same values.
    planes = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    return (planes - PIXEL_MEAN) / PIXEL_STD


def crop_is_balanced(mask: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg RandomCrop's test: the crop holds more than one class and none covers ``cat_max_ratio`` of its
    labelled pixels."""
    counts = np.bincount(mask[mask != IGNORE_INDEX].ravel())
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


class SemanticTransform:
    """Item dict -> tensors: ``img`` (weak view), optional ``img_strong``, and ``mask`` when labelled.

    Training transforms draw only from the item's ``seeds`` (``datamodules.loading.item_seeds``): geometry and
    strong view each from their own child stream, so changing one pipeline leaves the other's draws as they were.
    ``cat_max_ratio`` (labelled training crops only; DAFormer's source pipeline, 0.75): a crop that fails
    ``crop_is_balanced`` is redrawn, at most ``CROP_REDRAWS`` times, and the last draw is kept, as mmseg's RandomCrop.
    """

    def __init__(
        self,
        resize=None,
        crop=None,
        train: bool = True,
        strong_view: bool = False,
        labelled: bool = True,
        cat_max_ratio: float | None = None,
    ):
        self.geometry = geometric_transform(resize, crop, train)
        self.strong = strong_photometric_transform() if strong_view else None
        self.train, self.labelled = train, labelled
        self.balances_crops = bool(train and crop is not None and labelled and cat_max_ratio is not None)
        self.cat_max_ratio = cat_max_ratio

    def __call__(self, item: dict, seeds: np.random.SeedSequence | None = None) -> dict:
        if self.train:
            if seeds is None:
                raise ValueError("a training transform needs the item's seeds, item_seeds(seed, epoch, index)")
            geometry_seeds, strong_seeds = seeds.spawn(2)
            seed_pipeline(self.geometry, geometry_seeds)
            if self.strong is not None:
                seed_pipeline(self.strong, strong_seeds)
        # An unlabelled stream's dataset reads no label; the geometry draws the same crop and flip either way.
        labelled = self.labelled and "mask" in item
        out = self.geometry(image=item["image"], **({"mask": item["mask"]} if labelled else {}))
        if self.balances_crops and labelled:
            for redraw_seeds in geometry_seeds.spawn(CROP_REDRAWS):
                if crop_is_balanced(out["mask"], self.cat_max_ratio):
                    break
                seed_pipeline(self.geometry, redraw_seeds)
                out = self.geometry(image=item["image"], mask=item["mask"])
        sample = {"img": to_tensor(out["image"])}
        if self.strong is not None:
            sample["img_strong"] = to_tensor(self.strong(image=out["image"])["image"])
        if labelled:
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(out["mask"])).long()
        return sample
