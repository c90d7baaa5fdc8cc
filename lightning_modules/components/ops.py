"""Tensor helpers every method uses: pixel flattening, label and logit resizing, padding crops, class sums."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixels(tensor: torch.Tensor) -> torch.Tensor:
    """[B, D, H, W] -> [B*H*W, D]."""
    return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])


def labels_at(mask: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of a label map [B, H, W] to the feature grid, flattened to [B*h*w]."""
    return F.interpolate(mask.unsqueeze(1).float(), size=tuple(size), mode="nearest").long().flatten()


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of [B, C, h, w] logits to ``size`` (the segmentation papers' convention)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def unpadded(tensor: torch.Tensor, target: dict) -> torch.Tensor:
    """``tensor`` [..., S, S] cropped to the image's un-padded input size (the SAM transform pads bottom-right)."""
    height, width = target["input_size"]
    return tensor[..., :height, :width]


def class_sums(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the sum of ``values`` [B, ...] over the pixels of each class of ``labels`` and the pixel count:
    two [B, C] tensors."""
    flat_labels = labels.flatten(1)
    sums = torch.zeros(labels.shape[0], num_classes, device=values.device).scatter_add_(
        1, flat_labels, values.flatten(1).float()
    )
    counts = torch.zeros_like(sums).scatter_add_(1, flat_labels, torch.ones_like(flat_labels, dtype=sums.dtype))
    return sums, counts


def class_means(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per image, the mean of ``values`` [B, H, W] over the pixels of each class of ``labels``: [B, C] (0 if absent)."""
    sums, counts = class_sums(values, labels, num_classes)
    return sums / counts.clamp(min=1)
