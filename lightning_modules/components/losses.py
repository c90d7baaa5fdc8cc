"""Loss functions shared by methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


def dice_per_mask(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - 2|P∩G| / (|P| + |G|) on sigmoid probabilities (Milletari et al. 2016), one value per [..., H, W] mask."""
    probs = mask_logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    return 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return dice_per_mask(mask_logits, targets).mean()


def symmetric_focal_loss(mask_logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float = 2.0):
    """FL = alpha (1 - e^{-BCE})^gamma BCE, the mean over every pixel of every mask at once (WeSAM losses.py
    ``FocalLoss``: no class balance, alpha a plain scale)."""
    bce = F.binary_cross_entropy_with_logits(mask_logits.float(), targets.float(), reduction="none")
    return alpha * ((1 - torch.exp(-bce)) ** gamma * bce).mean()


def joint_dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor, smooth: float) -> torch.Tensor:
    """1 - (2 sum P G + s) / (sum P + sum G + s) over all masks of an image together (WeSAM losses.py ``DiceLoss``)."""
    probs = mask_logits.float().sigmoid()
    return 1 - (2 * (probs * targets).sum() + smooth) / (probs.sum() + targets.sum() + smooth)


def sam_mask_loss_per_mask(
    mask_logits: torch.Tensor, targets: torch.Tensor, focal_weight: float, dice_weight: float, focal_alpha: float = 0.25
) -> torch.Tensor:
    """SAM's mask loss, a linear combination of focal and dice loss (20:1 in the paper), per [..., H, W] mask.
    ``focal_alpha`` weighs object pixels by alpha and background pixels by 1 - alpha; a negative value weighs both
    by 1 (torchvision's convention)."""
    targets = targets.expand_as(mask_logits)
    focal = sigmoid_focal_loss(mask_logits, targets, alpha=focal_alpha, reduction="none").flatten(-2).mean(-1)
    return focal_weight * focal + dice_weight * dice_per_mask(mask_logits, targets)


def sam_mask_loss(
    mask_logits: torch.Tensor, targets: torch.Tensor, focal_weight: float, dice_weight: float, focal_alpha: float = 0.25
) -> torch.Tensor:
    return sam_mask_loss_per_mask(mask_logits, targets, focal_weight, dice_weight, focal_alpha).mean()


def iou_prediction_loss(iou_predictions: torch.Tensor, mask_logits: torch.Tensor, targets: torch.Tensor):
    """SAM's IoU head loss: MSE between the predicted IoU and the binarised mask's IoU with the ground truth
    (``iou_predictions`` [...] for masks [..., H, W])."""
    predicted = (mask_logits.detach() > 0).flatten(-2).float()
    targets = targets.flatten(-2)
    intersection = (predicted * targets).sum(-1)
    actual = intersection / (predicted.sum(-1) + targets.sum(-1) - intersection).clamp(min=1)
    return F.mse_loss(iou_predictions.float(), actual)


def entropy_map(logits: torch.Tensor, reading: str = "shannon") -> torch.Tensor:
    """The prediction entropy of ``logits`` [B, C, h, w] per pixel, [B, h, w]. ``reading="code"`` is what BiCL's
    public code computes (DASS trainer/damnet_trainer.py ``entropy_loss``): log_softmax applied to the already
    softmaxed probabilities, a confidence term that is not the Shannon entropy."""
    # H(p) = -Σ_c p_c log p_c;  code: -Σ_c p_c log softmax(p)_c, p = softmax(logits)
    if reading == "code":
        probabilities = logits.float().softmax(1)
        return -(probabilities * probabilities.log_softmax(1)).sum(1)
    log_probabilities = logits.float().log_softmax(1)
    return -(log_probabilities.exp() * log_probabilities).sum(1)


def pixel_entropy(logits: torch.Tensor, reading: str = "shannon") -> torch.Tensor:
    """Mean over pixels of ``entropy_map``."""
    return entropy_map(logits, reading).mean()
