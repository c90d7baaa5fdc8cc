"""Procedural domain shifts that need no files: the embedded default task and the CI smoke path.

``SyntheticStreets`` draws street scenes in the 19 Cityscapes train ids: the "synthetic" domain paints
each class a flat colour (a renderer's look), the "real" domain re-colours the classes, adds texture,
an illumination gradient and blur (a camera's look) over the same layout statistics. The "diverse"
domain draws a new palette and grain per image: neither source nor target, it stands in for the broad
natural-image data SAM is trained on (seco's region SAM learns on it).
``SyntheticShapes`` draws foreground objects as instances on a textured background: "clear" objects
carry a texture of their own palette, "camouflaged" ones the background's palette with a small colour
offset. Only the palette contrast shifts, as for SAM moving from natural images to camouflaged ones,
so a model trained on clear objects keeps part of its skill on camouflaged ones.

Every item is a pure function of (seed, domain, split, index), so any worker, rank or rerun sees the
same image; nothing is cached or written.
"""
from __future__ import annotations

import cv2
import numpy as np
from torch.utils.data import Dataset

from datamodules.datasets.base import DatasetLayoutError

ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 7, 8, 10, 11, 13
STREET_CLASSES = (ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR)

# The synthetic domain renders Cityscapes' own colour table, one flat colour per class.
SYNTHETIC_PALETTE = {
    ROAD: (128, 64, 128), SIDEWALK: (244, 35, 232), BUILDING: (70, 70, 70), POLE: (153, 153, 153),
    SIGN: (220, 220, 0), VEGETATION: (107, 142, 35), SKY: (70, 130, 180), PERSON: (220, 20, 60),
    CAR: (0, 0, 142),
}
# The real domain's colours: the same hues desaturated 55% towards grey with a warm cast, as a camera
# sees paint under daylight.
REAL_PALETTE = {
    ROAD: (131, 92, 101), SIDEWALK: (218, 114, 183), BUILDING: (85, 75, 55), POLE: (168, 158, 138),
    SIGN: (195, 185, 66), VEGETATION: (115, 121, 53), SKY: (116, 133, 136), PERSON: (169, 69, 67),
    CAR: (41, 31, 75),
}
# Per-class texture strength in the real domain (standard deviation of a grain field, 0-255 scale).
REAL_TEXTURE = {
    ROAD: 18, SIDEWALK: 22, BUILDING: 30, POLE: 10, SIGN: 10, VEGETATION: 35, SKY: 8, PERSON: 20, CAR: 15,
}
DOMAINS = ("synthetic", "real", "diverse")
SPLITS = {"train": 0, "val": 1, "test": 2}


def item_rng(seed: int, domain: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise DatasetLayoutError(f"unknown split '{split}' for a procedural dataset; expected one of {list(SPLITS)}")
    return np.random.default_rng([seed, domain, SPLITS[split], index])


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


def paint(labels: np.ndarray, palette: dict, rng: np.random.Generator, texture: dict | None,
          noise: float) -> np.ndarray:
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

    def __init__(self, domain: str, split: str = "train", length: int = 400, size=(64, 128), seed: int = 0):
        if domain not in DOMAINS:
            raise DatasetLayoutError(f"unknown synth_streets domain '{domain}'; expected one of {DOMAINS}")
        self.domain, self.split, self.length, self.size, self.seed = domain, split, length, tuple(size), seed
        item_rng(seed, 0, split, 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = item_rng(self.seed, DOMAINS.index(self.domain), self.split, index)
        labels = street_layout(rng, *self.size)
        if self.domain == "synthetic":
            image = paint(labels, SYNTHETIC_PALETTE, rng, texture=None, noise=4.0)
        elif self.domain == "real":
            image = camera(paint(labels, REAL_PALETTE, rng, texture=REAL_TEXTURE, noise=8.0), rng, blur=0.7)
        else:
            palette = {c: tuple(rng.uniform(0, 255, size=3)) for c in STREET_CLASSES}
            grain = {c: float(rng.uniform(0, 40)) for c in STREET_CLASSES}
            image = camera(paint(labels, palette, rng, texture=grain, noise=rng.uniform(2, 10)), rng,
                           blur=rng.uniform(0.3, 1.2))
        image = np.clip(image, 0, 255).astype(np.uint8)
        return {"image": image, "mask": labels, "meta": {"path": f"synth_streets/{self.domain}/{self.split}/{index}"}}


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

    def __init__(self, domain: str, split: str = "train", length: int = 300, size: int = 128, seed: int = 0):
        if domain not in self.domains:
            raise DatasetLayoutError(f"unknown synth_shapes domain '{domain}'; expected one of {self.domains}")
        self.domain, self.split, self.length, self.size, self.seed = domain, split, length, size, seed
        item_rng(seed, 0, split, 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = item_rng(self.seed, 10 + self.domains.index(self.domain), self.split, index)
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
        return {"image": image, "instances": masks,
                "meta": {"path": f"synth_shapes/{self.domain}/{self.split}/{index}"}}


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

    def __init__(self, domain: str = "synthetic", split: str = "train", length: int = 400, size=(64, 128),
                 seed: int = 0, min_area: int = 16):
        self.streets = SyntheticStreets(domain=domain, split=split, length=length, size=size, seed=seed)
        self.min_area = min_area

    def __len__(self) -> int:
        return len(self.streets)

    def __getitem__(self, index: int) -> dict:
        item = self.streets[index]
        return {"image": item["image"], "instances": class_regions(item["mask"], self.min_area),
                "meta": {"path": item["meta"]["path"].replace("synth_streets", "synth_regions")}}
