"""The math of the SAM self-training methods: dual_lora_sam (Liu et al., ICML 2025) and WeSAM (Zhang et al.,
CVPR 2024), each loss a small function with its equation in one comment line."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.components.losses import (
    dice_loss,
    iou_prediction_loss,
    joint_dice_loss,
    sam_mask_loss,
    symmetric_focal_loss,
)
from lightning_modules.components.ops import unpadded

# How the mask losses of the SAM self-training methods are scaled (method.loss_scaling):
# "code": as WeSAM's adaptation.py calls losses.py, focal_loss(pred, soft, num_masks) and dice_loss(pred, soft,
#   num_masks), whose third positional argument is the focal loss's alpha and the dice loss's smoothing; with the
#   official batch of one image per GPU, num_masks = that image's instance count N, and the dice runs over all N
#   masks of the image together;
# "paper": SAM's mask loss read literally, the torchvision focal loss (alpha 0.25) and dice per mask, averaged.
LOSS_SCALINGS = ("code", "paper")


def valid_region(logits: torch.Tensor, target: dict) -> torch.Tensor:
    """Mask logits cropped to the image's un-padded input size, [N,h,w]."""
    return unpadded(logits[:, 0], target)


# ---- foreground representation and role assignment (dual_lora_sam, Sec. "Foreground Representations") ----


def foreground_representations(features: torch.Tensor, mask_logits: torch.Tensor, threshold: float):
    """Per instance, f = sum_ij F^ij 1(S^ij > T) / sum_ij 1(S^ij > T); returns (f [N,C], valid [N]).

    features: one image's embedding [C,h,w]; mask_logits [N,1,H,W] (any H,W), scored as S = sigmoid,
    resized to the embedding grid. An instance with no pixel above T is not valid (f = 0).
    """
    scores = F.interpolate(mask_logits.float(), size=features.shape[-2:], mode="bilinear", align_corners=False)
    foreground = (scores[:, 0].sigmoid() > threshold).to(features.dtype)
    count = foreground.flatten(1).sum(1)
    summed = torch.einsum("nhw,chw->nc", foreground, features)
    return summed / count.clamp(min=1)[:, None], count > 0


def background_representations(features: torch.Tensor, mask_logits: torch.Tensor, threshold: float):
    """The complement of ``foreground_representations``: mean of F over pixels with S < T (the triplet negative)."""
    return foreground_representations(features, -mask_logits, 1 - threshold)


def branch_similarity(f_branch: torch.Tensor, f_gamma: torch.Tensor) -> torch.Tensor:
    """sim = f_branch . f_gamma / (||f_branch|| ||f_gamma||), per instance."""
    return F.cosine_similarity(f_branch.float(), f_gamma.float(), dim=-1)


def alpha_is_teacher(sim_alpha: torch.Tensor, sim_beta: torch.Tensor) -> torch.Tensor:
    """(T, S) = (alpha, beta) if sim_alpha > sim_beta else (beta, alpha); elementwise, e.g. per image."""
    return sim_alpha > sim_beta


# ---- dual_lora_sam losses ----


def pseudo_mask_loss(
    logits: torch.Tensor, pseudo: torch.Tensor, focal_weight: float, dice_weight: float, scaling: str
) -> torch.Tensor:
    """One image's N masks against binary pseudo masks, scaled as ``scaling`` (LOSS_SCALINGS).

    code: 20 FL_sym(M, P; alpha=N) + Dice_joint(M, P; smooth=N); paper: mean_n 20 FL_0.25(M_n, P_n) + Dice(M_n, P_n).
    """
    if scaling == "code":
        count = len(logits)
        return focal_weight * symmetric_focal_loss(logits, pseudo, count) + dice_weight * joint_dice_loss(
            logits, pseudo, count
        )
    return sam_mask_loss(logits, pseudo, focal_weight, dice_weight)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid entries; 0 (still attached to the graph) when none is valid."""
    return (values * valid).sum() / valid.sum().clamp(min=1)


def reverse_distillation_loss(f_teacher: torch.Tensor, f_student: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_rd = mean_n cos(f_T, sg(f_S)): minimising it pushes the teacher's representation away from the student's."""
    return masked_mean(F.cosine_similarity(f_teacher, f_student.detach(), dim=-1), valid)


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float, valid: torch.Tensor
) -> torch.Tensor:
    """L_tri = mean_n max(0, d(f_S, sg f_T) - d(f_S, sg b_T) + m), d = 1 - cos.

    The student's foreground moves near the teacher's foreground and away from the teacher's background.
    """

    def distance(x, y):
        return 1 - F.cosine_similarity(x, y, dim=-1)

    return masked_mean(
        F.relu(distance(anchor, positive.detach()) - distance(anchor, negative.detach()) + margin), valid
    )


# ---- WeSAM losses (official code: losses.py, adaptation.py) ----


def self_training_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    iou_prediction: torch.Tensor,
    focal_weight: float,
    dice_weight: float,
    iou_weight: float,
    scaling: str = "paper",
) -> torch.Tensor:
    """L_self = 20 Focal(M_s, 1(M_t > 0)) + Dice(M_s, 1(M_t > 0)) + MSE(IoU_pred, IoU(M_s, 1(M_t > 0)))."""
    pseudo = (teacher_logits.detach() > 0).to(student_logits.dtype)
    return pseudo_mask_loss(student_logits, pseudo, focal_weight, dice_weight, scaling) + iou_weight * (
        iou_prediction_loss(iou_prediction, student_logits, pseudo)
    )


def anchor_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, anchor_logits: torch.Tensor, scaling: str = "paper"
) -> torch.Tensor:
    """L_anc = 0.5 Dice(M_s, 1(M_a > 0)) + 0.5 Dice(M_t, 1(M_a > 0)): both views stay near the frozen anchor.

    code: the dice over all masks of the image together (smoothing 1, adaptation.py's call); paper: per mask, mean.
    """
    pseudo = (anchor_logits.detach() > 0).to(student_logits.dtype)
    if scaling == "code":
        return 0.5 * joint_dice_loss(student_logits, pseudo, 1.0) + 0.5 * joint_dice_loss(teacher_logits, pseudo, 1.0)
    return 0.5 * dice_loss(student_logits, pseudo) + 0.5 * dice_loss(teacher_logits, pseudo)


def wesam_regularisers(
    student_logits: torch.Tensor,
    regularised_logits: torch.Tensor,
    regularised_embedding: torch.Tensor,
    anchor_logits: torch.Tensor,
    anchor_embedding: torch.Tensor,
    target: dict,
    scaling: str,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WeSAM's two regularisers of one image (adaptation.py): L_anc of the student's strong-view and the regularised
    network's weak-view masks to the frozen anchor's, and L_con of the regularised network's instance embeddings
    against the anchor's."""
    anchor = anchor_loss(
        valid_region(student_logits, target),
        valid_region(regularised_logits, target),
        valid_region(anchor_logits, target),
        scaling,
    )
    contrastive = instance_contrastive_loss(
        regularised_embedding, anchor_embedding, regularised_logits, anchor_logits, temperature
    )
    return anchor, contrastive


def instance_contrastive_loss(
    features: torch.Tensor,
    anchor_features: torch.Tensor,
    mask_logits: torch.Tensor,
    anchor_mask_logits: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """L_con = -log( sum_i exp(s_ii / tau) / sum_ij exp(s_ij / tau) ), s_ij = cos(z_i, z^a_j).

    z_i and z^a_j are the embeddings of instance i (trainable) and j (anchor) averaged over the instance's mask,
    binarised at probability 0.5 on the embedding grid (WeSAM losses.py ``ContraLoss``).
    """

    def pooled(embedding, logits):
        grid = F.interpolate(logits.detach().float(), size=embedding.shape[-2:], mode="bilinear", align_corners=False)
        weights = (grid[:, 0] > 0).float()
        normalised = F.normalize(embedding.float(), dim=0)  # per-pixel L2 over channels, as the official code
        return torch.einsum("nhw,chw->nc", weights, normalised) / weights.flatten(1).sum(1).clamp(min=1)[:, None]

    z, z_anchor = pooled(features, mask_logits), pooled(anchor_features.detach(), anchor_mask_logits)
    similarity = F.cosine_similarity(z[:, None], z_anchor[None], dim=-1) / temperature
    return -(similarity.diagonal().logsumexp(0) - similarity.flatten().logsumexp(0))
