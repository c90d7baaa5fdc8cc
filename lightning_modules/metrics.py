"""The evaluation metrics, used by the methods' evaluation, experiments.sam_probe and experiments.report alike.

Semantic tasks are scored from one confusion matrix (summed over DDP ranks) as per-class IoU and mIoU over each
of the task's class subsets (19 / 16 / 13). SAM tasks are scored per prompt kind as WeSAM does: per image the
mean IoU over its instances, then the mean over images (docs/protocols.md).
"""

from __future__ import annotations

import torch


def per_class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU_c = TP_c / (TP_c + FP_c + FN_c) from a [C, C] (true x predicted) matrix; NaN where c never occurs."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_iou(iou: torch.Tensor, classes) -> float:
    """Mean over the evaluated classes that occur in ground truth or prediction."""
    return torch.nanmean(iou[list(classes)]).item()


def instance_iou(mask_logits: torch.Tensor, instances: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of each predicted mask (logits > SAM's mask_threshold) with its ground truth, [N]."""
    predicted = mask_logits > threshold
    truth = instances > 0.5
    intersection = (predicted & truth).flatten(1).sum(1)
    union = (predicted | truth).flatten(1).sum(1)
    return intersection / union.clamp(min=1)


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
