"""Optimiser and learning-rate schedule shared by every method: SGD, Adam or AdamW, head at a multiple of the base rate,
linear warm-up then poly decay, stepped per iteration."""

from __future__ import annotations

import torch

from datamodules.errors import require_choice

OPTIMIZERS = ("sgd", "adam", "adamw")


def poly_lr_lambda(
    max_steps: int,
    power: float,
    warmup_steps: int,
    warmup_ratio: float | None = None,
    round_steps: int | None = None,
    round_decay: float = 0.5,
    round_poly_length: float = 1.2,
    first_round: int = 0,
):
    """Linear warm-up, then DeepLab's poly decay (1 - t/T)^power.

    ``warmup_ratio`` None: the rate climbs as (t + 1) / W and the decay starts after it. A ratio r: mmcv's linear
    warm-up (DAFormer), the poly rate scaled by 1 - (1 - t/W)(1 - r), so it starts at r x the rate.
    ``round_steps`` R: self-training rounds (BiCL's code): round k = t // R restarts the poly over
    ``round_poly_length`` x R steps at ``round_decay``^k x the rate; ``first_round``: the round step 0 belongs to,
    for rounds run as separate runs (bicl's offline static labels).
    """

    def poly(step: int) -> float:
        if round_steps:
            completed, within = divmod(step + first_round * round_steps, round_steps)
            return round_decay**completed * max(0.0, 1 - within / (round_poly_length * round_steps)) ** power
        return max(0.0, 1 - step / max(1, max_steps)) ** power

    def factor(step: int) -> float:
        if step >= warmup_steps:
            return poly(step)
        if warmup_ratio is None:
            return (step + 1) / warmup_steps
        return poly(step) * (1 - (1 - step / warmup_steps) * (1 - warmup_ratio))

    return factor


def build_optimizer(backbone_params, head_params, optim: dict, max_steps: int, undecayed_params=()):
    """SGD (DeepLabV2 papers), Adam (WeSAM; L2 weight decay added to the gradient) or AdamW (DAFormer family,
    decoupled weight decay); the head runs at ``head_lr_mult`` x lr; ``undecayed_params`` (backbone parameters
    exempt from weight decay, DAFormer's norm layers) at lr without decay. ``foreach``: one kernel per operation for
    all parameters (the default on GPUs, not on CPU); the same values as the per-parameter loop."""
    groups = [
        {"params": [p for p in backbone_params if p.requires_grad], "lr": optim["lr"]},
        {"params": [p for p in undecayed_params if p.requires_grad], "lr": optim["lr"], "weight_decay": 0.0},
        {"params": [p for p in head_params if p.requires_grad], "lr": optim["lr"] * optim["head_lr_mult"]},
    ]
    groups = [g for g in groups if g["params"]]
    require_choice("optim.name", optim["name"], OPTIMIZERS)
    if optim["name"] == "sgd":
        optimizer = torch.optim.SGD(
            groups, lr=optim["lr"], momentum=optim["momentum"], weight_decay=optim["weight_decay"], foreach=True
        )
    else:
        adam = torch.optim.Adam if optim["name"] == "adam" else torch.optim.AdamW
        optimizer = adam(
            groups,
            lr=optim["lr"],
            weight_decay=optim["weight_decay"],
            betas=tuple(optim.get("betas", (0.9, 0.999))),
            foreach=True,
        )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        poly_lr_lambda(
            max_steps,
            optim["poly_power"],
            optim["warmup_steps"],
            optim.get("warmup_ratio"),
            optim.get("round_steps"),
            optim.get("round_decay", 0.5),
            optim.get("round_poly_length", 1.2),
            optim.get("first_round", 0),
        ),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
