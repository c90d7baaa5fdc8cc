"""TMT (Zhang et al., arXiv 2504.05774): Adaptive Cluster-based Transferability Estimator (ACTE) and
the Transferable Masked Attention (TMA) bias.

ACTE groups pixels into regions by iterative soft clustering: the feature grid is cut into c x c cells
whose means are the initial centres; each pixel is softly assigned to the centres of the 3 x 3 cells
around its own (the structural, spatial constraint) with weight exp(kappa * cosine) of its descriptor
and the centre (semantic similarity), and centres are re-estimated as assignment-weighted means, L
times. A region's transferability is then estimated from its pooled feature; the region values are
spread back to pixels through the soft assignment, giving a dense map in [0, 1].

Each function computes one equation of the paper (or, where the public text could not be read, of this
implementation's reading of it; see configs/method/tmt.yaml) and is vectorised over batch, regions and
pixels (one matmul with a neighbourhood mask, no loop over regions or heads).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_modules.components.losses import entropy_map


def cell_grid(height: int, width: int, cell_size: int) -> tuple[int, int]:
    return math.ceil(height / cell_size), math.ceil(width / cell_size)


def neighbourhood_mask(height: int, width: int, cell_size: int, device=None) -> torch.Tensor:
    """[R, N] True where region r's cell is within the 3 x 3 cells around pixel p's cell (ACTE's local window)."""
    cells_y, cells_x = cell_grid(height, width, cell_size)
    pixel_y = torch.arange(height, device=device).repeat_interleave(width) // cell_size
    pixel_x = torch.arange(width, device=device).repeat(height) // cell_size
    region_y = torch.arange(cells_y, device=device).repeat_interleave(cells_x)
    region_x = torch.arange(cells_x, device=device).repeat(cells_y)
    return ((region_y[:, None] - pixel_y[None]).abs() <= 1) & ((region_x[:, None] - pixel_x[None]).abs() <= 1)


def initial_assignment(height: int, width: int, cell_size: int, device=None) -> torch.Tensor:
    """[R, N] hard assignment of each pixel to its own c x c cell (ACTE's initial clustering centres)."""
    cells_y, cells_x = cell_grid(height, width, cell_size)
    own = (torch.arange(height, device=device).repeat_interleave(width) // cell_size) * cells_x + torch.arange(
        width, device=device
    ).repeat(height) // cell_size
    return F.one_hot(own, cells_y * cells_x).T.float()


def region_means(assignment: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
    """f(r) = sum_p a(p, r) chi(p) / sum_p a(p, r); assignment [B, R, N], descriptors [B, C, N] -> [B, R, C]."""
    weights = assignment / assignment.sum(-1, keepdim=True).clamp(min=1e-6)
    return weights @ descriptors.transpose(1, 2)


def soft_assignment(centres: torch.Tensor, descriptors: torch.Tensor, window: torch.Tensor, kappa: float):
    """a(p, r) = s(p, r) / sum_r' s(p, r'), s = exp(kappa cos(f(r), chi(p))) inside the 3 x 3 window, else 0."""
    cosine = F.normalize(centres, dim=-1) @ F.normalize(descriptors, dim=1)  # [B, R, N]
    logits = (kappa * cosine).masked_fill(~window, float("-inf"))
    return logits.softmax(dim=1)


def region_partition(descriptors: torch.Tensor, cell_size: int, iterations: int, kappa: float) -> torch.Tensor:
    """ACTE's iterative grouping: soft assignment [B, R, H*W] of pixels to regions after L iterations."""
    batch, _, height, width = descriptors.shape
    flat = descriptors.flatten(2).float()
    window = neighbourhood_mask(height, width, cell_size, flat.device)
    assignment = initial_assignment(height, width, cell_size, flat.device).expand(batch, -1, -1)
    for _ in range(iterations):
        assignment = soft_assignment(region_means(assignment, flat), flat, window, kappa)
    return assignment


def partition_descriptors(features: torch.Tensor, images: torch.Tensor, structure_weight: float) -> torch.Tensor:
    """chi(p): unit-norm semantic (decoder) feature with the pixel's colour (structure) weighted alongside."""
    colour = F.adaptive_avg_pool2d(images.float(), features.shape[-2:])
    return torch.cat([F.normalize(features.float(), dim=1), structure_weight * colour], 1)


def region_domain_loss(domain_logits: torch.Tensor, is_source: torch.Tensor, region_mass: torch.Tensor):
    """Region-level domain classification, BCE(D(f(r)), d), each region weighted by its pixel mass."""
    target = is_source.float()[:, None].expand_as(domain_logits)
    loss = F.binary_cross_entropy_with_logits(domain_logits.float(), target, reduction="none")
    return (loss * region_mass).sum() / region_mass.sum().clamp(min=1e-6)


def region_transferability(domain_logits: torch.Tensor) -> torch.Tensor:
    """T(r) = H(D(f(r))) / log 2: 1 where the domains are indistinguishable, 0 where D is certain."""
    p = domain_logits.float().sigmoid().clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log()) / math.log(2)


def transferability_map(assignment: torch.Tensor, transferability: torch.Tensor, height: int, width: int):
    """T(p) = sum_r a(p, r) T(r): the region values spread to pixels, [B, 1, H, W]."""
    dense = (transferability.unsqueeze(1) @ assignment).squeeze(1)
    return dense.reshape(-1, 1, height, width)


def semantic_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """U(p) = H(softmax(z_p)) / log K, [B, 1, H, W] in [0, 1]: 1 where the prediction is uniform, 0 where certain."""
    return entropy_map(logits).unsqueeze(1) / math.log(logits.shape[1])


def region_averaged(assignment: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """v(p) = sum_r a(p, r) v(r), v(r) the region mean of the pixel map ``values`` [B, 1, H, W]."""
    region_values = region_means(assignment, values.flatten(2)).squeeze(-1)
    return transferability_map(assignment, region_values, *values.shape[-2:])


def guidance_map(transferability: torch.Tensor, uncertainty: torch.Tensor, uncertainty_weight: float):
    """G = T - mu U: low where a region transfers badly or its prediction is uncertain, the regions TMA attends."""
    return transferability - uncertainty_weight * uncertainty


def transferability_attention_bias(guidance: torch.Tensor, strength: float) -> torch.Tensor:
    """TMA: M = -lambda * G (G = T when mu = 0), added to QK^T / sqrt(d) for each key, so keys of low
    transferability (and high uncertainty) gain attention."""
    return -strength * guidance


def region_correctness(assignment: torch.Tensor, prediction: torch.Tensor, label: torch.Tensor, ignore_index: int):
    """Per region (hard argmax assignment): (has labelled pixels [B, R], majority of them correct [B, R])."""
    regions = assignment.shape[1]
    owner = assignment.argmax(1)  # [B, N]
    valid = (label != ignore_index).float()
    correct = (prediction == label).float() * valid
    labelled = torch.zeros(owner.shape[0], regions, device=owner.device).scatter_add_(1, owner, valid)
    right = torch.zeros_like(labelled).scatter_add_(1, owner, correct)
    return labelled > 0, right >= 0.5 * labelled
