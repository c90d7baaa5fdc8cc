"""synth_shapes: procedural foreground objects as instances on a textured background (the SAM smoke task).

"clear" objects carry a texture of their own palette, "camouflaged" ones the background's palette with a small
colour offset. Only the palette contrast shifts, as for SAM moving from natural images to camouflaged ones, so a
model trained on clear objects keeps part of its skill on camouflaged ones.
"""

from __future__ import annotations

import cv2
import numpy as np
from torch.utils.data import Dataset

from datamodules.datasets.base import procedural_item_rng
from datamodules.errors import DatasetLayoutError


def blob_texture(rng: np.random.Generator, shape: tuple[int, int], colours: np.ndarray, scale: float) -> np.ndarray:
    """A camouflage-like texture: smooth random fields choosing among a few colours."""
    fields = cv2.GaussianBlur(rng.standard_normal((*shape, len(colours))).astype(np.float32), (0, 0), scale)
    return colours[fields.argmax(-1)].astype(np.float32)


def shape_masks(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """Visible masks of ``count`` ellipses / rectangles / triangles, later ones occluding earlier ones."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    canvas = np.zeros((size, size), dtype=np.int64)
    for instance in range(1, count + 1):
        cx, cy = rng.uniform(0.2, 0.8, size=2) * size
        rx, ry = rng.uniform(0.08, 0.22, size=2) * size
        kind = rng.integers(3)
        if kind == 0:
            inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
        elif kind == 1:
            inside = (np.abs(xs - cx) < rx) & (np.abs(ys - cy) < ry)
        else:
            triangle = np.array([[cx, cy - ry], [cx - rx, cy + ry], [cx + rx, cy + ry]], dtype=np.int32)
            inside = cv2.fillPoly(np.zeros((size, size), np.uint8), [triangle], 1).astype(bool)
        canvas[inside] = instance
    masks = canvas[None] == np.arange(1, count + 1)[:, None, None]
    return masks[masks.sum((1, 2)) >= 0.002 * size * size].astype(np.uint8)


class SyntheticShapes(Dataset):
    """Foreground objects as instances, "clear" (source) or "camouflaged" (target)."""

    domains = ("clear", "camouflaged")
    procedural = True

    def __init__(
        self, root=None, split: str = "train", *, domain: str, length: int = 300, size: int = 128, seed: int = 0
    ):
        if domain not in self.domains:
            raise DatasetLayoutError(f"unknown synth_shapes domain '{domain}'; expected one of {self.domains}")
        self.domain, self.split, self.length, self.size, self.seed = domain, split, length, size, seed
        procedural_item_rng(seed, 0, split, 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = procedural_item_rng(self.seed, 10 + self.domains.index(self.domain), self.split, index)
        shape = (self.size, self.size)
        masks = shape_masks(rng, self.size, int(rng.integers(1, 5)))
        while len(masks) == 0:
            masks = shape_masks(rng, self.size, 1)
        grain_scale = self.size / 24  # blob size of every texture, background and objects alike
        colours = rng.uniform(40, 200, size=(4, 3))
        background = blob_texture(rng, shape, colours, scale=grain_scale)
        if self.domain == "clear":
            foreground = np.zeros_like(background)
            for mask in masks.astype(bool):
                palette = rng.uniform(0, 255, size=(4, 3))
                foreground[mask] = blob_texture(rng, shape, palette, scale=grain_scale)[mask]
        else:
            offset = rng.uniform(-28, 28, size=3)
            foreground = blob_texture(rng, shape, colours + offset, scale=grain_scale)
        inside = masks.any(0)[..., None]
        image = np.where(inside, foreground, background) + rng.normal(0, 10.0, (*shape, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
        return {
            "image": image,
            "instances": masks,
            "meta": {"path": f"synth_shapes/{self.domain}/{self.split}/{index}"},
        }
