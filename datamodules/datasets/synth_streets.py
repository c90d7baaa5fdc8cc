"""synth_streets: procedural street scenes in the 19 Cityscapes train ids (the embedded default task).

The "synthetic" domain paints each class a flat colour (a renderer's look), the "real" domain re-colours the
classes, adds texture, an illumination gradient and blur (a camera's look) over the same layout statistics.
The "diverse" domain draws a new palette and grain per image: neither source nor target, it stands in for the
broad natural-image data SAM is trained on (seco's region SAM learns on it, see ``synth_regions``).
"""

from __future__ import annotations

import cv2
import numpy as np
from torch.utils.data import Dataset

from datamodules.datasets.base import procedural_item_rng
from datamodules.errors import DatasetLayoutError

ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 7, 8, 10, 11, 13
STREET_CLASSES = (ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR)

# The synthetic domain renders Cityscapes' own colour table, one flat colour per class.
SYNTHETIC_PALETTE = {
    ROAD: (128, 64, 128),
    SIDEWALK: (244, 35, 232),
    BUILDING: (70, 70, 70),
    POLE: (153, 153, 153),
    SIGN: (220, 220, 0),
    VEGETATION: (107, 142, 35),
    SKY: (70, 130, 180),
    PERSON: (220, 20, 60),
    CAR: (0, 0, 142),
}
# The real domain's colours: the same hues desaturated 55% towards grey with a warm cast, as a camera
# sees paint under daylight.
REAL_PALETTE = {
    ROAD: (131, 92, 101),
    SIDEWALK: (218, 114, 183),
    BUILDING: (85, 75, 55),
    POLE: (168, 158, 138),
    SIGN: (195, 185, 66),
    VEGETATION: (115, 121, 53),
    SKY: (116, 133, 136),
    PERSON: (169, 69, 67),
    CAR: (41, 31, 75),
}
# Per-class texture strength in the real domain (standard deviation of a grain field, 0-255 scale).
REAL_TEXTURE = {
    ROAD: 18,
    SIDEWALK: 22,
    BUILDING: 30,
    POLE: 10,
    SIGN: 10,
    VEGETATION: 35,
    SKY: 8,
    PERSON: 20,
    CAR: 15,
}
DOMAINS = ("synthetic", "real", "diverse")


def street_layout(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One street scene's train-id map: sky, skyline of buildings and trees, road, sidewalks, objects."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    labels = np.full((height, width), SKY, dtype=np.int64)

    horizon = rng.uniform(0.38, 0.52) * height
    edges = np.sort(rng.uniform(0, width, size=rng.integers(3, 7)))
    block = np.searchsorted(edges, xs[0])
    block_top = rng.uniform(0.05, 0.35, size=len(edges) + 1) * height
    block_is_tree = rng.random(len(edges) + 1) < 0.35
    tree_bumps = 0.04 * height * np.sin(xs[0] / rng.uniform(2, 5))
    skyline = block_top[block] + np.where(block_is_tree[block], tree_bumps, 0)
    above_horizon = (ys >= skyline[None]) & (ys < horizon)
    labels[above_horizon] = np.where(block_is_tree[block], VEGETATION, BUILDING)[None].repeat(height, 0)[above_horizon]

    depth = np.clip((ys - horizon) / (height - horizon), 0, 1)
    vanishing_x = rng.uniform(0.4, 0.6) * width
    road_half = (0.05 + rng.uniform(0.3, 0.45) * depth) * width
    ground = ys >= horizon
    labels[ground] = SIDEWALK
    labels[ground & (np.abs(xs - vanishing_x) < road_half)] = ROAD

    for _ in range(rng.integers(1, 4)):
        y_base = rng.uniform(horizon + 0.15 * (height - horizon), height)
        scale = (y_base - horizon) / (height - horizon)
        car_w, car_h = (0.12 + 0.2 * scale) * width, (0.06 + 0.15 * scale) * height
        x0 = vanishing_x + rng.uniform(-0.8, 0.8) * (0.05 + 0.35 * scale) * width - car_w / 2
        labels[(ys > y_base - car_h) & (ys <= y_base) & (xs > x0) & (xs < x0 + car_w)] = CAR
    for _ in range(rng.integers(1, 4)):
        side = rng.choice([-1, 1])
        y_base = rng.uniform(horizon + 0.1 * (height - horizon), height)
        scale = (y_base - horizon) / (height - horizon)
        x_pole = vanishing_x + side * (0.1 + 0.4 * scale + 0.05) * width
        pole_h = (0.15 + 0.45 * scale) * height
        pole_w = max(1.0, 0.006 * width * (1 + 2 * scale))
        labels[(np.abs(xs - x_pole) < pole_w) & (ys > y_base - pole_h) & (ys <= y_base)] = POLE
        if rng.random() < 0.7:
            sign = 0.03 * width * (1 + scale)
            top = y_base - pole_h
            labels[(np.abs(xs - x_pole) < sign) & (ys > top) & (ys < top + 1.6 * sign)] = SIGN
    for _ in range(rng.integers(0, 4)):
        side = rng.choice([-1, 1])
        y_base = rng.uniform(horizon + 0.1 * (height - horizon), height)
        scale = (y_base - horizon) / (height - horizon)
        x_person = vanishing_x + side * (0.12 + 0.35 * scale + rng.uniform(0, 0.1)) * width
        person_h, person_w = (0.1 + 0.3 * scale) * height, (0.015 + 0.03 * scale) * width
        centre_y = y_base - person_h / 2
        labels[((xs - x_person) / person_w) ** 2 + ((ys - centre_y) / (person_h / 2)) ** 2 < 1] = PERSON
    return labels


def paint(
    labels: np.ndarray, palette: dict, rng: np.random.Generator, texture: dict | None, noise: float
) -> np.ndarray:
    """Colour a train-id map: palette lookup, optional per-class grain, pixel noise."""
    table = np.zeros((256, 3), dtype=np.float32)
    for class_id, colour in palette.items():
        table[class_id] = colour
    image = table[labels]
    if texture:
        grain_table = np.zeros(256, dtype=np.float32)
        for class_id, strength in texture.items():
            grain_table[class_id] = strength
        grain = cv2.GaussianBlur(rng.standard_normal(labels.shape).astype(np.float32), (0, 0), 0.8)
        image += (grain / grain.std().clip(1e-6) * grain_table[labels])[..., None]
    return image + rng.normal(0, noise, image.shape).astype(np.float32)


def camera(image: np.ndarray, rng: np.random.Generator, blur: float) -> np.ndarray:
    """A camera's look: a vertical illumination gradient, a colour cast and optical blur."""
    light = np.linspace(rng.uniform(0.75, 1.0), rng.uniform(1.0, 1.25), image.shape[0], dtype=np.float32)
    image = image * light[:, None, None] + rng.uniform(-20, 20, size=3).astype(np.float32)
    return cv2.GaussianBlur(image, (0, 0), blur)


class SyntheticStreets(Dataset):
    """Street scenes in the "synthetic" (flat render), "real" (textured camera) or "diverse" domain."""

    procedural = True

    def __init__(
        self, root=None, split: str = "train", *, domain: str, length: int = 400, size=(64, 128), seed: int = 0
    ):
        if domain not in DOMAINS:
            raise DatasetLayoutError(f"unknown synth_streets domain '{domain}'; expected one of {DOMAINS}")
        self.domain, self.split, self.length, self.size, self.seed = domain, split, length, tuple(size), seed
        procedural_item_rng(seed, 0, split, 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = procedural_item_rng(self.seed, DOMAINS.index(self.domain), self.split, index)
        labels = street_layout(rng, *self.size)
        if self.domain == "synthetic":
            image = paint(labels, SYNTHETIC_PALETTE, rng, texture=None, noise=4.0)
        elif self.domain == "real":
            image = camera(paint(labels, REAL_PALETTE, rng, texture=REAL_TEXTURE, noise=8.0), rng, blur=0.7)
        else:
            palette = {c: tuple(rng.uniform(0, 255, size=3)) for c in STREET_CLASSES}
            grain = {c: float(rng.uniform(0, 40)) for c in STREET_CLASSES}
            image = camera(
                paint(labels, palette, rng, texture=grain, noise=rng.uniform(2, 10)), rng, blur=rng.uniform(0.3, 1.2)
            )
        image = np.clip(image, 0, 255).astype(np.uint8)
        return {"image": image, "mask": labels, "meta": {"path": f"synth_streets/{self.domain}/{self.split}/{index}"}}

    def train_ids(self, index: int) -> np.ndarray:
        return self[index]["mask"]
