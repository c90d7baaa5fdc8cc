"""Optimiser and learning-rate schedule shared by every method: SGD, Adam or AdamW, head at a multiple of the base rate,
linear warm-up then poly decay, stepped per iteration."""

from __future__ import annotations

import torch

from datamodules.errors import require_choice

OPTIMIZERS = ("sgd", "adam", "adamw")


def poly_lr_lambda(max_steps: int, power: float, warmup_steps: int):
    """Linear warm-up, then DeepLab's poly decay (1 - t/T)^power."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1 - step / max(1, max_steps)) ** power

    return factor


def build_optimizer(backbone_params, head_params, optim: dict, max_steps: int):
    """SGD (DeepLabV2 papers), Adam (WeSAM; L2 weight decay added to the gradient) or AdamW (DAFormer family,
    decoupled weight decay); the head runs at ``head_lr_mult`` x lr."""
    groups = [
        {"params": [p for p in backbone_params if p.requires_grad], "lr": optim["lr"]},
        {"params": [p for p in head_params if p.requires_grad], "lr": optim["lr"] * optim["head_lr_mult"]},
    ]
    groups = [g for g in groups if g["params"]]
    require_choice("optim.name", optim["name"], OPTIMIZERS)
    if optim["name"] == "sgd":
        optimizer = torch.optim.SGD(
            groups, lr=optim["lr"], momentum=optim["momentum"], weight_decay=optim["weight_decay"]
        )
    else:
        adam = torch.optim.Adam if optim["name"] == "adam" else torch.optim.AdamW
        optimizer = adam(
            groups, lr=optim["lr"], weight_decay=optim["weight_decay"], betas=tuple(optim.get("betas", (0.9, 0.999)))
        )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lr_lambda(max_steps, optim["poly_power"], optim["warmup_steps"])
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
