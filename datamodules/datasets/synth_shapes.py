"""synth_shapes: procedural foreground objects as instances on a textured background (the SAM test bed).

It mirrors the regime of the SAM adaptation papers (WeSAM, dual-LoRA SAM): a SAM pre-trained on a large,
diverse corpus meets one narrow, shifted target domain.

- ``diverse`` (the source corpus, SA-1B's role): every image draws its own look: background style (blob
  texture of any grain, smooth gradient, stripes), object shapes (ellipses, boxes, triangles, stars, smooth
  blobs), object appearance (an unrelated palette, or the background's palette shifted clearly, by 45-120
  per channel), shading and noise. It never holds the targets' looks: no object closer to its background than
  the 45 offset, and no pink, lit, single-blob scene on vascular tissue.
- ``camouflaged`` (CAMO / COD10K's role): objects carry the background's own texture and palette shifted by at
  most 28 per channel.
- ``polyp`` (Kvasir-SEG's role): one or two smooth, lit, pinkish blobs on reddish tissue crossed by darker
  vessels, under an endoscope's vignette with specular highlights on both.
- ``clear``: objects with an unrelated palette on the background texture (the earlier, narrow source).
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


def gradient_texture(rng: np.random.Generator, shape: tuple[int, int], colours: np.ndarray) -> np.ndarray:
    """A linear blend between two of ``colours`` along a random direction."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32) / max(shape)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xs + np.sin(angle) * ys
    ramp = ((ramp - ramp.min()) / max(np.ptp(ramp), 1e-6))[..., None]
    return (1 - ramp) * colours[0] + ramp * colours[1]


def stripe_texture(rng: np.random.Generator, shape: tuple[int, int], colours: np.ndarray) -> np.ndarray:
    """Stripes of two of ``colours`` at a random orientation and period."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3) * max(shape)
    phase = (np.cos(angle) * xs + np.sin(angle) * ys) / period
    return np.where((np.floor(phase) % 2 == 0)[..., None], colours[0], colours[1]).astype(np.float32)


def random_texture(rng: np.random.Generator, shape: tuple[int, int], colours: np.ndarray) -> np.ndarray:
    style = rng.integers(3)
    if style == 0:
        return blob_texture(rng, shape, colours, scale=max(shape) * rng.uniform(1 / 48, 1 / 10))
    if style == 1:
        return gradient_texture(rng, shape, colours)
    return stripe_texture(rng, shape, colours)


def shape_mask(rng: np.random.Generator, size: int, kinds: int = 3) -> np.ndarray:
    """One filled shape: ellipse, rectangle, triangle (kinds=3), plus star polygon and smooth blob (kinds=5)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = rng.uniform(0.2, 0.8, size=2) * size
    rx, ry = rng.uniform(0.08, 0.22, size=2) * size
    kind = rng.integers(kinds)
    if kind == 0:
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
    if kind == 1:
        return (np.abs(xs - cx) < rx) & (np.abs(ys - cy) < ry)
    if kind == 2:
        triangle = np.array([[cx, cy - ry], [cx - rx, cy + ry], [cx + rx, cy + ry]], dtype=np.int32)
        return cv2.fillPoly(np.zeros((size, size), np.uint8), [triangle], 1).astype(bool)
    if kind == 3:
        corners = int(rng.integers(5, 9))
        angles = np.linspace(0, 2 * np.pi, 2 * corners, endpoint=False) + rng.uniform(0, np.pi)
        radius = np.where(np.arange(2 * corners) % 2 == 0, 1.0, rng.uniform(0.4, 0.7))
        star = np.stack([cx + radius * rx * np.cos(angles), cy + radius * ry * np.sin(angles)], 1).astype(np.int32)
        return cv2.fillPoly(np.zeros((size, size), np.uint8), [star], 1).astype(bool)
    return smooth_blob(rng, size, (cx, cy), (rx, ry), roughness=0.35)


def smooth_blob(rng: np.random.Generator, size: int, centre, radii, roughness: float) -> np.ndarray:
    """An ellipse whose radius is modulated by a few low harmonics: a rounded, irregular blob."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = np.arctan2((ys - centre[1]) / radii[1], (xs - centre[0]) / radii[0])
    modulation = 1 + sum(
        roughness / k * rng.uniform(-1, 1) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)
    )
    distance = np.hypot((xs - centre[0]) / radii[0], (ys - centre[1]) / radii[1])
    return distance < modulation


def visible_masks(shapes: list[np.ndarray], size: int) -> np.ndarray:
    """Visible masks of ``shapes`` painted in order (later ones occlude earlier ones); slivers dropped."""
    canvas = np.zeros((size, size), dtype=np.int64)
    for instance, inside in enumerate(shapes, start=1):
        canvas[inside] = instance
    masks = canvas[None] == np.arange(1, len(shapes) + 1)[:, None, None]
    return masks[masks.sum((1, 2)) >= 0.002 * size * size].astype(np.uint8)


def shape_masks(rng: np.random.Generator, size: int, count: int, kinds: int = 3) -> np.ndarray:
    return visible_masks([shape_mask(rng, size, kinds) for _ in range(count)], size)


def shading(rng: np.random.Generator, shape: tuple[int, int], mask: np.ndarray, strength: float) -> np.ndarray:
    """A multiplicative light falloff from a random point of ``mask``: 1 at the point, 1 - strength far away."""
    ys, xs = np.nonzero(mask)
    pick = rng.integers(len(ys))
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    extent = max(np.ptp(ys), np.ptp(xs), 1)
    distance = np.hypot(yy - ys[pick], xx - xs[pick]) / extent
    return (1 - strength * np.clip(distance, 0, 1))[..., None]


def specular_highlights(rng: np.random.Generator, image: np.ndarray, count: int) -> np.ndarray:
    """Small saturated white spots, the endoscope light's reflections."""
    size = image.shape[0]
    spots = np.zeros(image.shape[:2], np.float32)
    for _ in range(count):
        centre = tuple(int(v) for v in rng.uniform(0, size, 2))
        axes = tuple(int(v) for v in rng.uniform(0.005, 0.02, 2) * size + 1)
        cv2.ellipse(spots, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    spots = cv2.GaussianBlur(spots, (0, 0), 0.6)[..., None]
    return image * (1 - spots) + 250 * spots


class SyntheticShapes(Dataset):
    """Foreground objects as instances; ``domain`` picks the look (module docstring)."""

    domains = ("clear", "camouflaged", "diverse", "polyp")
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
        render = {
            "clear": self.clear_or_camouflaged,
            "camouflaged": self.clear_or_camouflaged,
            "diverse": self.diverse,
            "polyp": self.polyp,
        }[self.domain]
        image, masks = render(rng)
        image = np.clip(image, 0, 255).astype(np.uint8)
        return {
            "image": image,
            "instances": masks,
            "meta": {"path": f"synth_shapes/{self.domain}/{self.split}/{index}"},
        }

    def instances(self, rng: np.random.Generator, count: int, kinds: int = 3) -> np.ndarray:
        masks = shape_masks(rng, self.size, count, kinds)
        while len(masks) == 0:
            masks = shape_masks(rng, self.size, 1, kinds)
        return masks

    def clear_or_camouflaged(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.size, self.size)
        masks = self.instances(rng, int(rng.integers(1, 5)))
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
        return np.where(inside, foreground, background) + rng.normal(0, 10.0, (*shape, 3)), masks

    def diverse(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.size, self.size)
        masks = self.instances(rng, int(rng.integers(1, 5)), kinds=5)
        colours = rng.uniform(0, 255, size=(int(rng.integers(2, 6)), 3))
        image = random_texture(rng, shape, colours)
        for mask in masks.astype(bool):
            if rng.random() < 0.5:
                palette = rng.uniform(0, 255, size=(int(rng.integers(2, 5)), 3))
            else:  # the background's palette, shifted clearly (never as close as the camouflaged target's)
                palette = colours + rng.choice([-1, 1], size=3) * rng.uniform(45, 120, size=3)
            texture = random_texture(rng, shape, np.clip(palette, 0, 255))
            if rng.random() < 0.5:
                texture = texture * shading(rng, shape, mask, rng.uniform(0.1, 0.5))
            image[mask] = texture[mask]
        return image + rng.normal(0, rng.uniform(0, 15), (*shape, 3)), masks

    def polyp(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size, shape = self.size, (self.size, self.size)
        count = 1 if rng.random() < 0.8 else 2
        blobs = [
            smooth_blob(rng, size, rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.1, 0.25, 2) * size, roughness=0.2)
            for _ in range(count)
        ]
        masks = visible_masks(blobs, size)
        if len(masks) == 0:
            masks = visible_masks([smooth_blob(rng, size, (size / 2, size / 2), (size / 5, size / 5), 0.1)], size)
        tissue = np.array([rng.uniform(170, 220), rng.uniform(70, 110), rng.uniform(70, 100)])
        tissue_palette = tissue + rng.uniform(-15, 15, size=(3, 3))
        image = blob_texture(rng, shape, tissue_palette, scale=size / 16)
        vessels = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), size / 20)
        vessel_lines = (np.abs(vessels) < 0.02 * np.abs(vessels).max())[..., None]
        image = np.where(vessel_lines, image * 0.7, image)
        polyp_colour = tissue + np.array([rng.uniform(0, 30), rng.uniform(-10, 30), rng.uniform(0, 30)])
        for mask in masks.astype(bool):
            lit = blob_texture(rng, shape, polyp_colour + rng.uniform(-10, 10, size=(3, 3)), scale=size / 24)
            image[mask] = (lit * shading(rng, shape, mask, rng.uniform(0.2, 0.4)))[mask]
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        image = image * (1 - 0.9 * (xx**2 + yy**2))[..., None]  # the endoscope's vignette
        image = specular_highlights(rng, image, int(rng.integers(3, 9)))
        return image + rng.normal(0, 6.0, (*shape, 3)), masks
