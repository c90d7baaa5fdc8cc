"""BiCL's pixel-prototype math (Lee et al., ECCV 2022, Sec. 3): batch prototypes, forward / backward
contrast, prototype memories with calibration, and static / dynamic / hybrid pseudo-labels.

Pixels are flattened: features ``[N, D]`` (L2-normalised projections), labels ``[N]`` with
``IGNORE_INDEX`` for unlabelled pixels. Similarities and softmaxes run in float32 even under
bf16 autocast: cosine similarities divided by tau = 0.1 lose their ranking in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from datamodules.constants import IGNORE_INDEX
from lightning_modules.distributed import all_reduce_sum


def float32(device: torch.device):
    """A region where autocast is off, so matmuls and softmaxes stay in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def class_feature_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class sum of features and pixel count in one matmul: sums [C, D], counts [C]."""
    one_hot = F.one_hot(torch.where(labels == IGNORE_INDEX, num_classes, labels), num_classes + 1)
    one_hot = one_hot[:, :num_classes].to(features.dtype)
    return one_hot.t() @ features, one_hot.sum(0)


def batch_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """rho(c) = sum_p f(p) y(p,c) / sum_p y(p,c), pooled over DDP ranks; returns (prototypes [C, D], present [C])."""
    with float32(features.device):
        sums, counts = class_feature_sums(features.float(), labels, num_classes)
        sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
        present = counts > 0
        return sums / counts.clamp(min=1).unsqueeze(1), present


def prototype_contrast_loss(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor, tau: float
) -> torch.Tensor:
    """L = -sum_c sum_p y(p,c) log softmax_c(s(f(p), rho(c)) / tau) (Eqs. 3-4), mean over labelled pixels.

    The softmax runs over the classes that have a prototype in the other domain's batch; a pixel
    whose class has none has no positive pair and is left out.
    """
    with float32(features.device):
        logits = F.normalize(features.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).t() / tau
        logits = logits.masked_fill(~present, float("-inf"))
        has_positive = (labels != IGNORE_INDEX) & present[labels.clamp(max=len(present) - 1)]
        if not has_positive.any():
            return features.sum() * 0.0
        return F.cross_entropy(logits[has_positive], labels[has_positive])


def image_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, images: int):
    """rho_b(c) of each image b alone (the authors' pairing), rank-local; features / labels image-major [B*N, D] /
    [B*N]; returns (prototypes [B, C, D], present [B, C])."""
    image = torch.arange(images, device=labels.device).repeat_interleave(labels.numel() // images)
    ids = torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, image * num_classes + labels)
    with float32(features.device):
        sums, counts = class_feature_sums(features.float(), ids, images * num_classes)
        prototypes = sums / counts.clamp(min=1).unsqueeze(1)
        return prototypes.view(images, num_classes, -1), (counts > 0).view(images, num_classes)


def paired_prototype_contrast_loss(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor, tau: float
) -> torch.Tensor:
    """Eqs. 3-4 within each image pair: the pixels of image b against the other domain's prototypes of image b
    ([B, C, D], present [B, C]), each pair's loss a mean over its pixels with a positive, the pairs averaged
    (the authors' code: metric_loss per source / target pair, the two pairs' losses averaged)."""
    images, num_classes, dim = prototypes.shape
    with float32(features.device):
        pixels_per_image = F.normalize(features.float(), dim=1).view(images, -1, dim)
        logits = torch.bmm(pixels_per_image, F.normalize(prototypes.float(), dim=2).transpose(1, 2)) / tau
        logits = logits.masked_fill(~present.unsqueeze(1), float("-inf"))
        labels = labels.view(images, -1)
        has_positive = (labels != IGNORE_INDEX) & present.gather(1, labels.clamp(max=num_classes - 1))
        if not has_positive.any():
            return features.sum() * 0.0
        pixel_loss = F.cross_entropy(logits[has_positive], labels[has_positive], reduction="none")
        image = torch.arange(images, device=labels.device).unsqueeze(1).expand_as(labels)[has_positive]
        per_image = torch.zeros(images, device=labels.device).index_add_(0, image, pixel_loss)
        counts = has_positive.sum(1)
        paired = counts > 0
        return (per_image[paired] / counts[paired]).mean()


@torch.no_grad()
def ema_prototype_memory(
    memory: torch.Tensor, initialised: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor, momentum: float
):
    """mu(c) <- lambda mu(c) + (1 - lambda) rho(c) for classes in the batch; a class seen first is copied."""
    prototypes = prototypes.detach().to(memory.dtype)
    updated = torch.where(initialised.unsqueeze(1), momentum * memory + (1 - momentum) * prototypes, prototypes)
    return torch.where(present.unsqueeze(1), updated, memory), initialised | present


def calibration(
    memory_target: torch.Tensor, memory_source: torch.Tensor, target_seen: torch.Tensor, source_seen: torch.Tensor
) -> torch.Tensor:
    """xi(c) = mu_T(c) - mu_S(c); zero for a class not yet in both memories."""
    both = (target_seen & source_seen).unsqueeze(1)
    return torch.where(both, memory_target - memory_source, torch.zeros_like(memory_target))


def calibrated_source_prototypes(source_prototypes: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """rho_{S->T}(c) = rho_S(c) + xi(c)."""
    return source_prototypes + xi


@torch.no_grad()
def dynamic_pseudo_labels(
    features: torch.Tensor, prototypes: torch.Tensor, available: torch.Tensor, threshold: float
) -> torch.Tensor:
    """y_D(p) = c' = argmax_c s(f_T(p), rho_{S->T}(c)) where that similarity > T, else ignore."""
    with float32(features.device):
        similarity = F.normalize(features.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).t()
        best, label = similarity.masked_fill(~available, float("-inf")).max(1)
        return torch.where(best > threshold, label, torch.full_like(label, IGNORE_INDEX))


def hybrid_pseudo_labels(dynamic: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
    """y_T = y_D where the pixel has a dynamic label, else y_F (ignore where neither has one)."""
    return torch.where(dynamic != IGNORE_INDEX, dynamic, static)


@torch.no_grad()
def confidence_histogram(probabilities: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts [C, bins] of each pixel's max probability, by predicted class (pixels along dim 0, classes dim 1)."""
    confidence, label = probabilities.float().max(1)
    num_classes = probabilities.shape[1]
    bin_index = (confidence * bins).long().clamp(max=bins - 1)
    flat = torch.bincount(label * bins + bin_index, minlength=num_classes * bins)
    return flat.view(num_classes, bins)


def class_balanced_thresholds(histogram: torch.Tensor, proportion: float) -> torch.Tensor:
    """CBST (Zou et al. 2018): k_c = the confidence reached by the top ``proportion`` of pixels predicted c.

    Read from a [C, bins] confidence histogram as the lower edge of the bin where the count from the
    top first reaches proportion x total; inf for a class never predicted (it gets no static label).
    """
    bins = histogram.shape[1]
    from_top = histogram.flip(1).cumsum(1)
    needed = (proportion * histogram.sum(1, keepdim=True)).clamp(min=1)
    first_bin_from_top = (from_top < needed).sum(1)
    thresholds = (bins - 1 - first_bin_from_top).clamp(min=0).double() / bins
    return torch.where(histogram.sum(1) > 0, thresholds, torch.full_like(thresholds, float("inf")))


@torch.no_grad()
def class_top_fraction_thresholds(
    confidence: torch.Tensor, label: torch.Tensor, num_classes: int, proportion: float
) -> torch.Tensor:
    """CBST's k_c from sampled pixels: the k-th highest confidence among the pixels predicted c, k = int(proportion x
    their count) (at least 1), as DASS gene_thres reads it off the sorted list; inf for a class never predicted."""
    order = torch.argsort(label.double() * 2 + confidence.double())  # by class, then confidence
    counts = torch.bincount(label, minlength=num_classes)
    ends = counts.cumsum(0)
    thresholds = torch.full((num_classes,), math.inf, dtype=torch.float64)
    present = counts > 0
    kth = ends[present] - (proportion * counts[present]).long().clamp(min=1)
    thresholds[present] = confidence[order[kth]].double().cpu()
    return thresholds


@torch.no_grad()
def static_pseudo_labels(probabilities: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """y_F(p) = argmax_c P(c|p) where max_c P(c|p) >= k_c (class-balanced threshold), else ignore."""
    confidence, label = probabilities.float().max(1)
    keep = confidence >= thresholds.to(confidence.dtype)[label]
    return torch.where(keep, label, torch.full_like(label, IGNORE_INDEX))


def image_top_fraction(confidence: torch.Tensor, proportion: float) -> torch.Tensor:
    """Each image's own most confident pixels: those above its k-th highest confidence, k = int(proportion x
    pixels) (strictly above, as DASS utils/func.py gene_plabel_prop). ``confidence`` [B, H, W] -> bool [B, H, W]."""
    flat = confidence.flatten(1)
    k = max(int(proportion * flat.shape[1]), 1)
    kth_highest = flat.topk(k, dim=1).values[:, -1:]
    return (flat > kth_highest).view_as(confidence)


@torch.no_grad()
def union_static_labels(
    probabilities: torch.Tensor, thresholds: torch.Tensor, proportion: float, class_test: str = "any_class"
) -> torch.Tensor:
    """y_F = argmax where a class-wise CBST threshold is met OR the pixel is in its image's top ``proportion``
    (DASS mask_fusion of thres_cb_plabel and gene_plabel_prop). ``probabilities`` [B, C, H, W] -> [B, H, W].

    class_test ``argmax``: the argmax class's probability reaches its threshold (CBST); ``any_class``: any
    class's probability reaches its own threshold (thres_cb_plabel compares every channel, torch.ge(P, k)).
    """
    probabilities = probabilities.float()
    confidence, label = probabilities.max(1)
    thresholds = thresholds.to(probabilities.device, probabilities.dtype)
    if class_test == "argmax":
        class_wise = confidence >= thresholds[label]
    else:
        class_wise = (probabilities >= thresholds.view(1, -1, 1, 1)).any(1)
    keep = class_wise | image_top_fraction(confidence, proportion)
    return torch.where(keep, label, torch.full_like(label, IGNORE_INDEX))
