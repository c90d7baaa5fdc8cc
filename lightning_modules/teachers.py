"""Teachers and labellers: the mode a network labels in, and the mean-teacher update."""

from __future__ import annotations

import torch
from torch import nn


def labelling_mode(module: nn.Module) -> nn.Module:
    """A teacher labels as DAFormer's mean teacher does (mmseg/models/uda/dacs.py): dropout and drop-path
    off, BatchNorm normalising with the statistics of the batch being labelled, in training and in the
    validation-time measurements of its labels alike. Networks that freeze BN (the papers' DeepLabV2)
    label in plain eval mode."""
    module.eval()
    if getattr(module, "freeze_bn", False):
        return module
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            # Batch statistics without touching the running averages (those come from the student).
            layer.track_running_stats = False
            layer.train()
    return module


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Mean teacher (Tarvainen & Valpola 2017): theta_t <- m theta_t + (1 - m) theta_s; buffers copied.

    Under DDP every rank holds the same student after the gradient all-reduce (and DDP broadcasts
    buffers from rank 0), so the teachers stay identical across ranks without communication.
    """
    # One foreach kernel per list instead of one per tensor: the same lerp, elementwise.
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1 - momentum)
    teacher_buffers = list(teacher.buffers())
    if teacher_buffers:  # LoRA branches have none, and a foreach op refuses an empty list
        torch._foreach_copy_(teacher_buffers, list(student.buffers()))
