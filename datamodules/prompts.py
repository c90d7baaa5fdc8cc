"""Ground-truth prompts of the SAM tasks (WeSAM's protocol, docs/protocols.md#sam-adaptation).

Per instance: its tight box, 5 positive + 5 negative points, and a coarse polygon (``cv2.approxPolyDP`` with
epsilon = max(0.05 x arc length, 3 px), WeSAM datasets/CAMO.py ``CAMODatasetwithCoarse``), all derived on the
*resized* masks so they live in SAM's input frame. WeSAM's "coarse" prompt is the polygon's bounding box, i.e. the
box of the filled polygon (``model.poly_as: box``); ``poly_as: mask`` gives the polygon as SAM's mask prompt.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

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
        inside = flat[start : start + POINT_CHUNK].astype(bool)
        scores = np.where(inside, rng.random(inside.shape, dtype=np.float32), -1.0)
        top = np.argpartition(-scores, count - 1, axis=1)[:, :count]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
        available = np.maximum(inside.sum(1), 1)
        chosen[start : start + POINT_CHUNK] = np.take_along_axis(top, np.arange(count)[None] % available[:, None], 1)
    valid = np.take_along_axis(flat, chosen, 1).astype(bool)
    points = np.stack([chosen % width, chosen // width], -1).astype(np.float32)
    return points, valid


def polygon_masks(instances: np.ndarray, poly_epsilon: float, min_epsilon: float = 3.0) -> np.ndarray:
    """Each instance's outer contours simplified by approxPolyDP (epsilon = max(poly_epsilon x arc length,
    min_epsilon) pixels), filled.

    Every external contour is kept, so an instance split by occlusion keeps all of its parts (WeSAM's code takes
    the first contour only, which for a one-piece instance is the same polygon).
    """
    polys = np.zeros_like(instances, dtype=np.uint8)
    for poly, mask in zip(polys, instances):
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        simplified = [
            cv2.approxPolyDP(c, max(poly_epsilon * cv2.arcLength(c, True), min_epsilon), True) for c in contours
        ]
        cv2.fillPoly(poly, simplified, 1)
    return polys


def derive_prompts(
    instances: np.ndarray,
    rng: np.random.Generator,
    num_positive: int = 5,
    num_negative: int = 5,
    poly_epsilon: float = 0.05,
    poly_min_epsilon: float = 3.0,
) -> dict:
    """WeSAM's ground-truth prompts for every instance of one image (all in the masks' pixel frame)."""
    instances = instances.astype(np.uint8)
    positives, _ = sample_points(instances, rng, num_positive)
    negatives, negative_valid = sample_points(1 - instances, rng, num_negative)
    n = len(instances)
    labels = np.concatenate(
        [np.ones((n, num_positive), np.int64), np.where(negative_valid, 0, PADDING_POINT).astype(np.int64)], 1
    )
    return {
        "boxes": masks_to_boxes(torch.from_numpy(instances)).numpy(),
        "points": np.concatenate([positives, negatives], 1),
        "point_labels": labels,
        "polys": polygon_masks(instances, poly_epsilon, poly_min_epsilon),
    }
