"""DAFormer-style self-training pieces (Hoyer et al., CVPR 2022; DACS, Tranheden et al., WACV 2021),
reusable by any mean-teacher method: EMA momentum schedule, confidence-weighted pseudo-labels,
ClassMix masks and the batched photometric augmentation applied to mixed images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from datamodules.constants import IMAGENET_MEAN, IMAGENET_STD
from lightning_modules.components.ops import upsample


def ema_momentum(step: int, alpha: float) -> float:
    """DAFormer's mean teacher: alpha_t = min(1 - 1 / (t + 1), alpha), so the teacher follows early on."""
    return min(1 - 1 / (step + 1), alpha)


def pseudo_labels_with_quality(teacher_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y_T = argmax p; q_T = |{p : max_c p_c > tau}| / |P| over the batch (DAFormer Eq. 5), every pixel's weight."""
    confidence, labels = teacher_logits.float().softmax(1).max(1)
    quality = (confidence > threshold).float().mean()
    return labels, quality


# Where ClassMix draws each image's classes from (method.class_mix_classes): "image", the classes of that image
# (ClassMix / DACS as their papers describe it); "batch", the classes of the whole batch, ignore included
# (DAFormer's dacs_transforms.py get_class_masks calls torch.unique on the batch inside its per-image loop).
CLASS_MIX_CLASSES = ("image", "batch")


def class_mix_masks(
    labels: torch.Tensor,
    ignore_index: int = 255,
    class_preference: torch.Tensor | None = None,
    classes_from: str = "image",
) -> torch.Tensor:
    """ClassMix (DACS): per image, half (rounded up) of the candidate classes, chosen at random; returns the
    [B, H, W] float mask of the image's pixels of those classes. The candidates are the image's own classes, or with
    ``classes_from="batch"`` every class of the batch and ignore (DAFormer's code), so a chosen class may be absent
    from the image. ``class_preference`` [B, >= C] (positive) draws the classes with probability proportional to it
    instead of uniformly (Gumbel top-k); image candidates only."""
    if classes_from not in CLASS_MIX_CLASSES:
        raise ValueError(f"classes_from={classes_from!r}; expected one of {CLASS_MIX_CLASSES}")
    batch = labels.shape[0]
    num_classes = int(labels[labels != ignore_index].max().item()) + 1 if (labels != ignore_index).any() else 1
    flat = labels.flatten(1)
    valid = flat != ignore_index
    column = torch.where(valid, flat, num_classes)  # ignore is the last column
    present = torch.zeros(batch, num_classes + 1, device=labels.device)
    present.scatter_add_(1, column, torch.ones_like(flat, dtype=present.dtype))
    present = present > 0
    if classes_from == "batch":
        if class_preference is not None:
            raise ValueError("class_preference draws among an image's own classes; use classes_from='image'")
        candidates = present.any(0, keepdim=True).expand(batch, -1)
        scores = torch.rand(batch, num_classes + 1, device=labels.device)
    else:
        candidates = torch.cat([present[:, :num_classes], present.new_zeros(batch, 1)], 1)
        scores = torch.rand(batch, num_classes, device=labels.device)
        if class_preference is not None:
            gumbel = -torch.log(-torch.log(scores.clamp(1e-12, 1 - 1e-7)))
            scores = gumbel + class_preference[:, :num_classes].float().clamp(min=1e-12).log()
        scores = torch.cat([scores, scores.new_zeros(batch, 1)], 1)
    scores = scores.masked_fill(~candidates, float("-inf"))
    rank = scores.argsort(1, descending=True).argsort(1)
    chosen = candidates & (rank < (candidates.sum(1, keepdim=True) + 1) // 2)
    return chosen.gather(1, column).reshape(labels.shape).float()


def mix(mask: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """x_M = M * x_S + (1 - M) * x_T, the mask broadcast over channels (mask [B, H, W])."""
    mask = mask.unsqueeze(1) if inside.dim() == 4 else mask
    return mask * inside + (1 - mask) * outside


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size] normalised 1-D Gaussian kernels, one sigma per image."""
    offsets = torch.arange(size, device=sigma.device, dtype=torch.float32) - (size - 1) / 2
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    return kernels / kernels.sum(1, keepdim=True)


def rotate_hue(rgb: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Hue shift by ``turns`` [B, 1, 1, 1] of the colour circle: a rotation of the chroma plane of YIQ."""
    to_yiq = rgb.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, rgb)
    cos, sin = torch.cos(2 * torch.pi * turns), torch.sin(2 * torch.pi * turns)
    i, q = yiq[:, 1:2] * cos - yiq[:, 2:3] * sin, yiq[:, 1:2] * sin + yiq[:, 2:3] * cos
    rotated = torch.cat([yiq[:, :1], i, q], 1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), rotated).clamp(0, 1)


def strong_photometric(
    images: torch.Tensor,
    jitter_p: float,
    jitter_strength: float,
    blur_p: float,
    blur_sigma: tuple[float, float],
    hue_strength: float = 0.0,
    jitter_together: bool = False,
) -> torch.Tensor:
    """DACS/DAFormer strong transform on normalised images, drawn per image: colour jitter (brightness, contrast,
    saturation by up to +-strength, hue by up to +-``hue_strength`` of the circle) and Gaussian blur with
    probability ``blur_p``. ``jitter_together``: the factors are applied together with probability ``jitter_p``,
    as DACS's code does; otherwise each factor on its own with that probability."""
    batch, channels, height, width = images.shape
    mean = images.new_tensor(IMAGENET_MEAN)[None, :, None, None]
    std = images.new_tensor(IMAGENET_STD)[None, :, None, None]
    rgb = images * std + mean
    jitter_all = torch.rand(batch, 1, 1, 1, device=images.device) < jitter_p if jitter_together else None

    def factor(strength: float = jitter_strength, centre: float = 1.0):
        apply = jitter_all if jitter_together else torch.rand(batch, 1, 1, 1, device=images.device) < jitter_p
        drawn = centre + (2 * torch.rand(batch, 1, 1, 1, device=images.device) - 1) * strength
        return torch.where(apply, drawn, torch.full_like(drawn, centre))

    rgb = (rgb * factor()).clamp(0, 1)
    grey = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    contrast = factor()
    rgb = (grey.mean((2, 3), keepdim=True) * (1 - contrast) + rgb * contrast).clamp(0, 1)
    saturation = factor()
    grey = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    rgb = (grey * (1 - saturation) + rgb * saturation).clamp(0, 1)
    if hue_strength > 0:
        rgb = rotate_hue(rgb, factor(hue_strength, centre=0.0))

    # Kernel size from the image size as DACS does (about 10% of the side, odd).
    size = max(3, int(0.1 * min(height, width)) | 1)
    sigma = torch.empty(batch, device=images.device).uniform_(*blur_sigma)
    kernels = gaussian_kernels(sigma, size).repeat_interleave(channels, 0)  # [B*C, size]
    flat = rgb.reshape(1, batch * channels, height, width)
    blurred = F.conv2d(
        F.pad(flat, (size // 2, size // 2, 0, 0), mode="reflect"), kernels[:, None, None, :], groups=batch * channels
    )
    blurred = F.conv2d(
        F.pad(blurred, (0, 0, size // 2, size // 2), mode="reflect"), kernels[:, None, :, None], groups=batch * channels
    ).reshape_as(rgb)
    apply_blur = torch.rand(batch, 1, 1, 1, device=images.device) < blur_p
    rgb = torch.where(apply_blur, blurred, rgb)
    return (rgb - mean) / std


def ignore_border_rows(weight: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    """DAFormer's pseudo-label crop: weight 0 on the ``top`` first and ``bottom`` last rows of [B, H, W], where
    Cityscapes' rectification borders and ego-vehicle make the teacher's labels unreliable."""
    rows = torch.arange(weight.shape[-2], device=weight.device)[:, None]
    return weight * ((rows >= top) & (rows < weight.shape[-2] - bottom))


def downscale_labels(labels: torch.Tensor, factor: int, min_ratio: float, num_classes: int, ignore_index: int = 255):
    """[B, H, W] -> [B, H/f, W/f]: each cell's majority class, ignore where that class covers less than
    ``min_ratio`` of the cell (DAFormer's downscale_label_ratio, ignore counted as a class of its own)."""
    one_hot = F.one_hot(torch.where(labels == ignore_index, num_classes, labels), num_classes + 1)
    shares = F.avg_pool2d(one_hot.permute(0, 3, 1, 2).float(), factor)
    share, label = shares.max(1)
    return torch.where((label == num_classes) | (share < min_ratio), ignore_index, label)


def masked_feature_distance(features: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d_FD = mean over masked cells of ||F_theta(x) - F_ImageNet(x)||_2 (DAFormer Eq. 7-8); 0 for an empty mask."""
    distance = (features.float() - reference.float()).norm(dim=1)
    return (distance * mask).sum() / mask.sum().clamp(min=1)


def cutmix_boxes(
    batch: int,
    height: int,
    width: int,
    p: float,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    device=None,
) -> torch.Tensor:
    """UniMatch's CutMix box (Yang et al. CVPR 2023, ``obtain_cutmix_box``), bool [B, H, W]: with probability p a
    box of U(area) of the image and aspect U(aspect) at a uniform position, else empty."""
    size = torch.empty(batch, device=device).uniform_(*area) * height * width
    ratio = torch.empty(batch, device=device).uniform_(*aspect)
    box_w = (size / ratio).sqrt().clamp(1, width).long()
    box_h = (size * ratio).sqrt().clamp(1, height).long()
    left = (torch.rand(batch, device=device) * (width - box_w + 1)).long()
    top = (torch.rand(batch, device=device) * (height - box_h + 1)).long()
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    inside = (rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
    inside = inside & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None])
    return inside & (torch.rand(batch, device=device) < p)[:, None, None]


def consistency_loss(logits: torch.Tensor, pseudo_label: torch.Tensor, confident: torch.Tensor, region: torch.Tensor):
    """FixMatch / UniMatch unlabelled loss: sum over ``region`` of CE(z, y_w) * 1[max p_w >= tau] / |region|."""
    per_pixel = F.cross_entropy(upsample(logits, pseudo_label.shape[-2:]), pseudo_label, reduction="none")
    return (per_pixel * (confident & region)).sum() / region.sum().clamp(min=1)
