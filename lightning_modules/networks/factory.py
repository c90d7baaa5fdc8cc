"""Building a configured segmentation network and starting it from another run's weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import get_method
from torch import nn

from datamodules.errors import CheckpointError

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents, or one CheckpointError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a bad file
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({error}); is it a complete .ckpt / .pth file?"
        ) from error


def load_state_from_checkpoint(path: str, prefix: str = "") -> dict:
    """Tensors of a Lightning .ckpt (or a plain state dict) whose keys start with ``prefix``, prefix removed."""
    state = read_checkpoint(path)
    state = state.get("state_dict", state)
    selected = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        raise CheckpointError(
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


def load_segmenter_weights(segmenter: nn.Module, path: str, model: dict) -> None:
    """Start from the ``segmenter`` of another run's checkpoint (e.g. source_only's last.ckpt).

    A checkpoint of another network (e.g. a SegFormer run given to a DeepLabV2 method) is refused with the
    network it was written for, read from the run's saved hyperparameters.
    """
    state = load_state_from_checkpoint(path, "segmenter.")
    expected = segmenter.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        written_for = read_checkpoint(path).get("hyper_parameters", {}).get("model", {}).get("name", "another network")
        raise CheckpointError(
            f"checkpoint {path} holds {written_for}, but this run builds {model['name']} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped weights); "
            f"choose arch= / model= to match the run that wrote it"
        )
    segmenter.load_state_dict(state)
    log.info("segmenter weights loaded from %s", path)
