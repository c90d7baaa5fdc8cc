"""SeCo's math (Zhao et al., NeurIPS 2024): Pixel Semantic Aggregation and Semantic Connectivity Correction.

Pixel Semantic Aggregation (PSA) turns speckled pixel pseudo-labels into regions with SAM boundaries:
"stuff" classes by semantic alignment of SAM's everything-mode masks (each mask takes the stuff class that
holds the largest share of its labelled pixels, if that share exceeds a threshold), "things" by prompting
SAM with a box + points per connected component of the class. Semantic Connectivity Correction (SCC)
treats every connected component of the aggregated labels as one sample, scores it by the loss of the
mask-pooled prediction against its label, splits clean from noisy with a two-component Gaussian mixture on
those losses, and relabels (confident) or ignores (otherwise) the noisy ones.

Connected components come from OpenCV (one call per class present), everything per component is a
scatter / bincount / lexsort over pixels: no Python loop runs over pixels or components.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture

from datamodules.constants import IGNORE_INDEX


@dataclass
class Components:
    """Connected components of a label map: ``index`` int64[H,W] (0 = no component, k = component k-1),
    and per component its class, area and xyxy bounding box (inclusive max)."""

    index: np.ndarray
    classes: np.ndarray
    areas: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.classes)


def pixel_pseudo_labels(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """y_i = argmax_c p_i(c) where max_c p_i(c) > threshold, else ignore (the pixel-level PL PSA starts from)."""
    confidence, labels = probs.max(1)
    return torch.where(confidence > threshold, labels, torch.full_like(labels, IGNORE_INDEX))


def connected_components(labels: np.ndarray, classes=None, min_area: int = 1) -> Components:
    """8-connected components of each class of ``labels`` (OpenCV, one call per class present).

    ``classes`` restricts the search to those class ids; components below ``min_area`` pixels are left out.
    """
    present = [c for c in np.unique(labels) if c != IGNORE_INDEX and (classes is None or c in set(classes))]
    index = np.zeros(labels.shape, dtype=np.int64)
    component_classes, stats = [], []
    for class_id in present:
        count, class_index, class_stats, _ = cv2.connectedComponentsWithStats(
            (labels == class_id).astype(np.uint8), connectivity=8
        )
        keep = np.flatnonzero(class_stats[1:, cv2.CC_STAT_AREA] >= min_area) + 1
        renumber = np.zeros(count, dtype=np.int64)
        renumber[keep] = len(component_classes) + 1 + np.arange(len(keep))
        index = np.where(renumber[class_index] > 0, renumber[class_index], index)
        component_classes.extend([class_id] * len(keep))
        stats.append(class_stats[keep])
    stats = np.concatenate(stats) if stats else np.zeros((0, 5), dtype=np.int64)
    x, y, w, h = (stats[:, i] for i in range(4))
    return Components(
        index=index,
        classes=np.asarray(component_classes, dtype=np.int64),
        areas=stats[:, cv2.CC_STAT_AREA].astype(np.int64),
        boxes=np.stack([x, y, x + w - 1, y + h - 1], 1).astype(np.float32),
    )


def spatial_purity(labels: np.ndarray, num_classes: int, radius: int) -> np.ndarray:
    """Entropy of the label distribution in the (2r+1)^2 window around each pixel (ignore counted as a class).

    Low purity entropy = a pixel deep inside one class: the official PSA picks its point prompts there.
    """
    one_hot = F.one_hot(torch.from_numpy(np.minimum(labels, num_classes)).long(), num_classes + 1)
    counts = F.avg_pool2d(
        one_hot.permute(2, 0, 1)[None].float(), 2 * radius + 1, stride=1, padding=radius, count_include_pad=False
    )[0]
    share = counts / counts.sum(0, keepdim=True).clamp(min=1e-12)
    return (-(share * torch.log(share + 1e-6)).sum(0)).numpy()


def unclipped_boxes(components: Components, unclip_ratio: float, height: int, width: int) -> np.ndarray:
    """Box prompts: each component's box grown by d = A * r / L (the polygon offset of the official PSA's
    ``unclip``, with A and L the box's area and perimeter), clipped to the image."""
    x0, y0, x1, y1 = components.boxes.T
    w, h = x1 - x0 + 1, y1 - y0 + 1
    grow = unclip_ratio * w * h / (2 * (w + h))
    return np.stack(
        [
            np.clip(x0 - grow, 0, width - 1),
            np.clip(y0 - grow, 0, height - 1),
            np.clip(x1 + grow, 0, width - 1),
            np.clip(y1 + grow, 0, height - 1),
        ],
        1,
    ).astype(np.float32)


def purest_points(components: Components, purity: np.ndarray, points_per_component: int) -> np.ndarray:
    """Point prompts xy float[K,P,2]: each component's pixels, in raster order, are cut into P equal runs and
    the pixel of lowest purity entropy of each run is taken (the official PSA's ``top_points_nums`` rule)."""
    flat = components.index.ravel()
    pixels = np.flatnonzero(flat)
    component = flat[pixels] - 1
    order = np.argsort(component, kind="stable")
    pixels, component = pixels[order], component[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(component, minlength=len(components)))[:-1]])
    rank = np.arange(len(pixels)) - starts[component]
    run = np.minimum(rank * points_per_component // components.areas[component], points_per_component - 1)
    key = component * points_per_component + run
    best = np.lexsort((purity.ravel()[pixels], key))
    first = best[np.r_[True, key[best][1:] != key[best][:-1]]]
    chosen = np.zeros(len(components) * points_per_component, dtype=np.int64)
    chosen[key[first]] = pixels[first]
    width = components.index.shape[1]
    return (
        np.stack([chosen % width, chosen // width], -1)
        .reshape(len(components), points_per_component, 2)
        .astype(np.float32)
    )


def semantic_alignment(masks: np.ndarray, labels: np.ndarray, stuff_classes, threshold: float) -> np.ndarray:
    """Class per SAM everything-mode mask: c_m = argmax_c |m ∩ {y=c}| / |m ∩ {y≠ignore}| over stuff c, if > threshold.

    ``masks`` bool[M,H,W]; returns int64[M] (ignore where no stuff class clears the threshold).
    """
    stuff = np.asarray(sorted(stuff_classes), dtype=np.int64)
    if len(stuff) == 0 or len(masks) == 0:
        return np.full(len(masks), IGNORE_INDEX, dtype=np.int64)
    lookup = np.full(IGNORE_INDEX + 1, len(stuff), dtype=np.int64)
    lookup[stuff] = np.arange(len(stuff))
    slot = lookup[np.where(labels == IGNORE_INDEX, IGNORE_INDEX, labels)]
    labelled = (labels != IGNORE_INDEX).ravel()
    one_hot = np.eye(len(stuff) + 1, dtype=np.float32)[slot.ravel()][:, : len(stuff)]
    flat_masks = masks.reshape(len(masks), -1).astype(np.float32)
    share = (flat_masks @ one_hot) / np.maximum(flat_masks @ labelled.astype(np.float32), 1)[:, None]
    best = share.argmax(1)
    return np.where(share[np.arange(len(masks)), best] > threshold, stuff[best], IGNORE_INDEX)


def paint_in_order(masks: np.ndarray, classes: np.ndarray, canvas: np.ndarray) -> np.ndarray:
    """Paint masks onto ``canvas`` in order (a later mask wins where masks overlap); ignore-class masks skipped."""
    covering = masks & (classes != IGNORE_INDEX)[:, None, None]
    if len(covering) == 0:
        return canvas
    last = len(covering) - 1 - covering[::-1].argmax(0)
    return np.where(covering.any(0), classes[last], canvas)


def component_losses(logits: torch.Tensor, components: Components) -> tuple[torch.Tensor, ...]:
    """Per-component loss l_k = CE(mean_{i in k} z_i, y_k), with its prediction and confidence.

    The mask-pooled logits are the segmenter's classifier applied to the component's mask-averaged
    feature (the connectivity classification of SCC). ``logits`` float[C,H,W] at label resolution.
    """
    num_classes = logits.shape[0]
    index = torch.from_numpy(components.index.ravel()).to(logits.device)
    pooled = torch.zeros(len(components) + 1, num_classes, device=logits.device, dtype=torch.float32)
    pooled.index_add_(0, index, logits.reshape(num_classes, -1).T.float())
    pooled = pooled[1:] / torch.from_numpy(components.areas).to(pooled)[:, None]
    targets = torch.from_numpy(components.classes).to(logits.device)
    losses = F.cross_entropy(pooled, targets, reduction="none")
    confidence, prediction = pooled.softmax(1).max(1)
    return losses, prediction, confidence


def fit_noise_gmm(losses: np.ndarray, max_iter: int, tol: float, reg_covar: float, seed: int = 0) -> np.ndarray:
    """w_k = p(noisy | l_k) under a two-component 1-D GMM fit on min-max normalised losses (noisy = larger mean)."""
    losses = np.asarray(losses, dtype=np.float64).reshape(-1, 1)
    if len(losses) < 2 or np.ptp(losses) == 0:
        return np.zeros(len(losses))
    normalised = (losses - losses.min()) / np.ptp(losses)
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    gmm.fit(normalised)
    return gmm.predict_proba(normalised)[:, int(gmm.means_.argmax())]


def correct_components(
    classes: np.ndarray,
    noisy_probability: np.ndarray,
    prediction: np.ndarray,
    confidence: np.ndarray,
    noise_threshold: float,
    correction_threshold: float,
) -> np.ndarray:
    """y'_k = y_k if w_k <= tau_ns; else argmax if its confidence > tau_cr; else ignore."""
    noisy = noisy_probability > noise_threshold
    corrected = np.where(confidence > correction_threshold, prediction, IGNORE_INDEX)
    return np.where(noisy, corrected, classes).astype(np.int64)


def relabel(component_index: np.ndarray, new_classes: np.ndarray) -> np.ndarray:
    """Label map with every component (``Components.index``) painted in its new class; the rest ignored."""
    lookup = np.concatenate([[IGNORE_INDEX], new_classes]).astype(np.uint8)
    return lookup[component_index]


def label_confusion(labels: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion [C,C] (true x label) over pixels where both the label and the truth are set."""
    valid = (labels != IGNORE_INDEX) & (truth != IGNORE_INDEX) & (truth < num_classes)
    return np.bincount(
        truth[valid].astype(np.int64) * num_classes + labels[valid].astype(np.int64),
        minlength=num_classes * num_classes,
    ).reshape(num_classes, num_classes)
