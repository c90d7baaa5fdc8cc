"""Prediction panels: what a model sees and predicts on a few target images, drawn so a researcher can look at it.

A method names the views of a batch in ``panel_columns(batch)`` (the base classes give image, ground truth and
prediction; self-training methods add what they learn from); ``PredictionPanels`` calls it at each validation on
the first images of the first val batch and ``grid`` lays the views out, one row per image, one named column per
view. Labels are drawn in the Cityscapes palette (ignore black), maps in grey (white = 1), and SAM masks as
coloured overlays with their prompts (box, points: positive filled, negative hollow; polygon outline).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw, ImageFont

from datamodules.constants import CITYSCAPES_PALETTE

HEADER = 14  # pixels above the first row, for the column names
GAP = 2  # white pixels between tiles
MAX_TILE_WIDTH = 512  # wider images (Cityscapes' 1024) are shown at an integer fraction of their size
OVERLAY_ALPHA = 0.5
# Distinct bright colours for SAM instances (instance ids carry no class, so not the Cityscapes palette).
INSTANCE_COLOURS = np.array(
    [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)],
    dtype=np.uint8,
)
# Every label value to a colour: train ids in the Cityscapes palette, ignore (255) and anything else black.
LABEL_COLOURS = np.zeros((256, 3), dtype=np.uint8)
LABEL_COLOURS[: len(CITYSCAPES_PALETTE)] = CITYSCAPES_PALETTE


def colourised(labels: torch.Tensor) -> np.ndarray:
    """Label maps [B, H, W] as RGB [B, H, W, 3]."""
    return LABEL_COLOURS[labels.clamp(0, 255).cpu().numpy()]


def grey(values: torch.Tensor) -> np.ndarray:
    """Maps [B, H, W] with values in [0, 1] as RGB [B, H, W, 3], white = 1."""
    levels = (values.float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    return np.repeat(levels[..., None], 3, axis=-1)


def relative_grey(values: torch.Tensor) -> np.ndarray:
    """Non-negative maps [B, H, W] as RGB, white = the largest value among them (e.g. pixel weights)."""
    return grey(values / values.max().clamp(min=1e-12))


def denormalised(images: torch.Tensor, mean, std, peak: float = 1.0) -> np.ndarray:
    """Normalised images [B, 3, H, W] back to RGB [B, H, W, 3]; ``mean`` / ``std`` on a 0..``peak`` scale."""
    mean = images.new_tensor(mean)[:, None, None]
    std = images.new_tensor(std)[:, None, None]
    rgb = ((images.float() * std + mean) / peak).clamp(0, 1)
    return (rgb * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def instance_overlay(image: np.ndarray, masks: torch.Tensor) -> np.ndarray:
    """The masks [N, H, W] (bool) over an RGB image, each in its instance colour, half transparent."""
    out = image.astype(np.float32)
    for index, mask in enumerate(masks.cpu().numpy()):
        colour = INSTANCE_COLOURS[index % len(INSTANCE_COLOURS)]
        out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * colour
    return out.round().astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a bool mask with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def with_prompts(image: np.ndarray, target: dict, kind: str) -> np.ndarray:
    """The image with each instance's ``kind`` prompt (box, point or poly) drawn in the instance's colour."""
    if kind == "poly":
        out = image.copy()
        for index, poly in enumerate(target["polys"].cpu().numpy() > 0.5):
            out[outline(poly)] = INSTANCE_COLOURS[index % len(INSTANCE_COLOURS)]
        return out
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    for index in range(len(target["boxes"])):
        colour = tuple(int(c) for c in INSTANCE_COLOURS[index % len(INSTANCE_COLOURS)])
        if kind == "box":
            draw.rectangle(target["boxes"][index].tolist(), outline=colour)
        elif kind == "point":
            for (x, y), label in zip(target["points"][index].tolist(), target["point_labels"][index].tolist()):
                if label >= 0:
                    draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour if label == 1 else None, outline=colour)
    return np.asarray(picture)


def prompted_views(images: np.ndarray, targets: list, masks: list, kind: str) -> np.ndarray:
    """Per image: its masks (bool [N, H, W]) as overlays with the ``kind`` prompts that produced them."""
    return np.stack([with_prompts(instance_overlay(image, m), t, kind) for image, m, t in zip(images, masks, targets)])


def panel_size(columns: int, rows: int, tile_height: int, tile_width: int) -> tuple[int, int]:
    """(width, height) in pixels of a panel of ``rows`` x ``columns`` tiles under a header strip."""
    return columns * (tile_width + GAP) - GAP, HEADER + rows * (tile_height + GAP) - GAP


def grid(columns: dict[str, np.ndarray]) -> np.ndarray:
    """One row per image, one column per named view (RGB [B, H, W, 3] each), the names in a header strip. Every
    view is shown at the size of the first (nearest neighbour), so views at feature resolution line up."""
    views = list(columns.values())
    rows, height, width = views[0].shape[:3]
    stride = math.ceil(width / MAX_TILE_WIDTH)
    height, width = height // stride, width // stride
    canvas = Image.new("RGB", panel_size(len(views), rows, height, width), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for column, (name, view) in enumerate(columns.items()):
        left = column * (width + GAP)
        draw.text((left + 2, 1), name, fill="black", font=font)
        for row in range(rows):
            tile = Image.fromarray(view[row]).resize((width, height), Image.NEAREST)
            canvas.paste(tile, (left, HEADER + row * (height + GAP)))
    return np.asarray(canvas)


def first_items(batch, count: int):
    """The first ``count`` images of a batch, with everything that belongs to them."""
    if isinstance(batch, dict):
        return {key: first_items(value, count) for key, value in batch.items()}
    if isinstance(batch, (torch.Tensor, list)):
        return batch[:count]
    return batch


def publish(trainer, key: str, picture: np.ndarray, path: Path) -> None:
    """The panel as a PNG at ``path`` and, with a W&B logger, as an image under ``key`` at the current step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(picture)
    image.save(path)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [image], step=trainer.global_step)


class PredictionPanels(Callback):
    """At each validation, on rank 0: the panel of the first ``images`` images of the first val batch (a fixed
    handful, since evaluation order is fixed), as ``out_dir/step_NNNNNN.png`` and W&B ``val/predictions``."""

    def __init__(self, out_dir: Path, images: int):
        self.out_dir, self.images = Path(out_dir), images

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        with torch.no_grad():
            columns = pl_module.panel_columns(first_items(batch, self.images))
        publish(trainer, "val/predictions", grid(columns), self.out_dir / f"step_{trainer.global_step:06d}.png")
