"""Reductions across DDP ranks for statistics computed over a batch (prototypes, GMM inputs, counts).

Each is the identity in a single process, so methods call them unconditionally. The summed variant
keeps autograd (``torch.distributed.nn``) so a loss may depend on prototypes pooled over all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; differentiable when ``tensor`` requires grad."""
    if not is_distributed():
        return tensor
    if tensor.requires_grad:
        return differentiable_all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (no grad), e.g. for EMA memories that must stay identical on every rank."""
    if not is_distributed():
        return tensor
    return all_reduce_sum(tensor.detach()) / dist.get_world_size()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate rank-local tensors of different lengths along dim 0 (no grad), same order on every rank."""
    if not is_distributed():
        return tensor
    tensor = tensor.detach().contiguous()
    world = dist.get_world_size()
    lengths = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(length.item() for length in lengths))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(length.item())] for part, length in zip(gathered, lengths)])
