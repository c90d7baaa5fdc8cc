"""Loss functions shared by methods."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - 2|P∩G| / (|P| + |G|) per mask on sigmoid probabilities (Milletari et al. 2016), mean over masks."""
    probs = mask_logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    return (1 - (2 * (probs * targets).sum(1) + 1) / (probs.sum(1) + targets.sum(1) + 1)).mean()


def sam_mask_loss(mask_logits: torch.Tensor, targets: torch.Tensor, focal_weight: float, dice_weight: float):
    """SAM's mask loss: a linear combination of focal and dice loss, 20:1 in the paper."""
    focal = sigmoid_focal_loss(mask_logits, targets, reduction="mean")
    return focal_weight * focal + dice_weight * dice_loss(mask_logits, targets)


def iou_prediction_loss(iou_predictions: torch.Tensor, mask_logits: torch.Tensor, targets: torch.Tensor):
    """SAM's IoU head loss: MSE between the predicted IoU and the binarised mask's IoU with the ground truth."""
    predicted = (mask_logits.detach() > 0).flatten(1).float()
    targets = targets.flatten(1)
    intersection = (predicted * targets).sum(1)
    actual = intersection / (predicted.sum(1) + targets.sum(1) - intersection).clamp(min=1)
    return F.mse_loss(iou_predictions.float(), actual)
