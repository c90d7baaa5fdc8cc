"""SeCo's math (Zhao et al., NeurIPS 2024): Pixel Semantic Aggregation and Semantic Connectivity Correction.

Pixel Semantic Aggregation (PSA) turns speckled pixel pseudo-labels into regions with SAM boundaries:
"stuff" classes by semantic alignment of SAM's everything-mode masks (each mask takes the stuff class that
holds the largest share of its labelled pixels, if that share exceeds a threshold), "things" by prompting
SAM with a box + points per connected component of the class. Semantic Connectivity Correction (SCC)
treats every connected component of the aggregated labels as one sample, scores it by the loss of the
prediction against its label, splits clean from noisy on those losses and relabels or drops components.
The scorer is either the official region classifier (SeCo v1 ``SCC/``: a CNN trained on a window around
each component, the component's mask applied to its stem features) or the base segmenter's mask-pooled
logits; the split is either the official loss quantile (v1), the per-class keep ratio of SeCoV2, or the
seed slides' two-component Gaussian mixture.

Connected components come from OpenCV (one call per class present), everything per component is a
scatter / bincount / lexsort over pixels: no Python loop runs over pixels or components.
"""

from __future__ import annotations

import math
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


def region_windows(boxes: np.ndarray, image_size, window_fraction) -> np.ndarray:
    """The official SCC crop (SeCo ``SCC/datasets/Cityscapes.py`` get_patch_region), int64[K,4] (y0, y1, x0, x1):
    a window of ``window_fraction`` of the image's height and width (256 x 512 of 1024 x 2048) centred on each
    component's box, scaled up at constant aspect to hold a larger box, shifted inside the image."""
    height, width = image_size
    x0, y0, x1, y1 = boxes.T.astype(np.float64)
    box_w, box_h = x1 - x0 + 1, y1 - y0 + 1
    base_h, base_w = height * window_fraction[0], width * window_fraction[1]
    scale = np.maximum(1.0, np.maximum(box_h / base_h, box_w / base_w))
    win_h = np.minimum(np.floor(base_h * scale), height).astype(np.int64)
    win_w = np.minimum(np.floor(base_w * scale), width).astype(np.int64)
    top = np.clip(((y0 + box_h / 2).astype(np.int64)) - win_h // 2, 0, height - win_h)
    left = np.clip(((x0 + box_w / 2).astype(np.int64)) - win_w // 2, 0, width - win_w)
    return np.stack([top, top + win_h, left, left + win_w], 1)


def crop_windows(planes: torch.Tensor, windows: torch.Tensor, size, mode: str) -> torch.Tensor:
    """Each window (y0, y1, x0, x1) of ``planes`` [C,H,W] resized to ``size``: [K,C,h,w] in one grid_sample.
    ``mode`` "bilinear" for images, "nearest" for label / index maps (values kept exactly)."""
    channels, height, width = planes.shape
    out_h, out_w = size
    # pixel centres of the output grid inside each window, in align_corners=False normalised coordinates
    ys = windows[:, :1] + (torch.arange(out_h, device=planes.device) + 0.5) / out_h * (windows[:, 1:2] - windows[:, :1])
    xs = windows[:, 2:3] + (torch.arange(out_w, device=planes.device) + 0.5) / out_w * (
        windows[:, 3:4] - windows[:, 2:3]
    )
    grid_y = (2 * ys / height - 1)[:, :, None].expand(-1, out_h, out_w)
    grid_x = (2 * xs / width - 1)[:, None, :].expand(-1, out_h, out_w)
    grid = torch.stack([grid_x, grid_y], -1).to(planes.dtype)
    return F.grid_sample(
        planes[None].expand(len(windows), -1, -1, -1), grid, mode=mode, padding_mode="border", align_corners=False
    )


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """L = -sum_c q_c log p_c with q = (1 - eps) onehot(y) + eps / C (SeCo ``SCC/train_src.py``, SmoothCE)."""
    return F.cross_entropy(logits, targets, label_smoothing=epsilon)


def classifier_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per component l_k = CE(z_k, y_k) (SeCo ``SCC/evaluate.py``: plain CE, no smoothing), argmax and its softmax."""
    confidence, prediction = logits.float().softmax(1).max(1)
    return F.cross_entropy(logits.float(), targets, reduction="none"), prediction, confidence


def quantile_threshold(losses: np.ndarray, ratio: float) -> float:
    """The ceil(n * ratio)-th smallest loss, so that l <= t keeps exactly that share of distinct losses. (SeCo's
    ``SCC/convert_json_2input.py`` determine_threshold takes index int(n * ratio), one more for even n.)"""
    ordered = np.sort(losses)
    return float(ordered[max(math.ceil(len(ordered) * ratio) - 1, 0)])


def quantile_keep(losses: np.ndarray, groups: np.ndarray, ratio: float, scope: str) -> np.ndarray:
    """Kept components under SeCo v1's loss quantile: ``global`` l_k <= t; ``class`` l_k <= t_{g_k}, one threshold per
    group (the classifier's predicted class); ``class_or_global`` either, with the global threshold the mean of the
    per-component class thresholds (vis_json.py "both_loss", the mode of the authors' commands)."""
    if len(losses) == 0:
        return np.zeros(0, dtype=bool)
    global_threshold = quantile_threshold(losses, ratio)
    class_threshold = np.zeros(len(losses))
    for group in np.unique(groups):  # one sort per class present, not per component
        members = groups == group
        class_threshold[members] = quantile_threshold(losses[members], ratio)
    if scope == "global":
        return losses <= global_threshold
    if scope == "class":
        return losses <= class_threshold
    return (losses <= class_threshold) | (losses <= class_threshold.mean())


def class_rank_keep(losses: np.ndarray, classes: np.ndarray, ratio: float) -> np.ndarray:
    """SeCoV2's selection (``SCC_V2/test_id.py`` filter_correct_and_assemble): within each label class, the
    ceil(ratio * n) components of lowest score are kept."""
    order = np.lexsort((losses, classes))  # by class, then by score within the class
    sorted_classes = classes[order]
    first = np.searchsorted(sorted_classes, sorted_classes, side="left")
    count = np.searchsorted(sorted_classes, sorted_classes, side="right") - first
    keep = np.zeros(len(losses), dtype=bool)
    keep[order] = np.arange(len(order)) - first < np.ceil(ratio * count)
    return keep


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


def kept_components(
    classes: np.ndarray, keep: np.ndarray, prediction: np.ndarray, confidence: np.ndarray, relabel_threshold: float
) -> np.ndarray:
    """Final class of each component: dropped (ignore) unless kept; a kept one takes the classifier's prediction
    where its confidence >= the threshold, else keeps its label (v1: threshold 0, always relabelled; V2: 0.95)."""
    relabelled = np.where(confidence >= relabel_threshold, prediction, classes)
    return np.where(keep, relabelled, IGNORE_INDEX).astype(np.int64)


def precision_at_density(histogram: np.ndarray, density: float) -> tuple[float, float]:
    """Precision and density (%) of the most confident ``density`` share of the pixels, from the counts [2, bins] of
    incorrect / correct labels by confidence bin: a confidence threshold's labels at that density (whole bins)."""
    incorrect, correct = histogram[0][::-1], histogram[1][::-1]
    total = histogram.sum()
    from_top = np.cumsum(incorrect + correct)
    bins = min(int(np.searchsorted(from_top, density * total)) + 1, len(from_top))
    kept = from_top[bins - 1] if len(from_top) else 0.0
    return 100 * float(correct[:bins].sum()) / max(kept, 1), 100 * float(kept) / max(total, 1)


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
