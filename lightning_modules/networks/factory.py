"""Building a configured segmentation network and starting it from another run's weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import get_method
from torch import nn

log = logging.getLogger(__name__)


def load_state_from_checkpoint(path: str, prefix: str = "") -> dict:
    """Tensors of a Lightning .ckpt (or a plain state dict) whose keys start with ``prefix``, prefix removed."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    selected = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        raise KeyError(
            f"checkpoint {path} holds no weights under '{prefix}'; keys start with "
            f"{sorted({k.split('.')[0] for k in state})}"
        )
    return selected


def build_network(model: dict, num_classes: int) -> nn.Module:
    """The network named by ``model.builder`` in configs/network/*.yaml.

    Contract of every segmenter: ``forward(images) -> (logits at the feature resolution, features)``
    and a ``backbone`` attribute (the parameters trained at the base learning rate).
    """
    return get_method(model["builder"])(model, num_classes)


def load_segmenter_weights(segmenter: nn.Module, path: str) -> None:
    """Start from the ``segmenter`` of another run's checkpoint (e.g. source_only's last.ckpt)."""
    segmenter.load_state_dict(load_state_from_checkpoint(path, "segmenter."))
    log.info("segmenter weights loaded from %s", path)
