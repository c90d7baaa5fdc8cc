"""ImageNet ResNet weights from a local file, loaded strictly: timm's own ``pretrained_cfg_overlay`` loading turns
strict off whenever the class count is not ImageNet's (always here: features only, or SCC's 19 classes), so a file of
another depth or another key layout would load in part or not at all, with one log line."""

from __future__ import annotations

from pathlib import Path

from timm.models import load_state_dict
from torch import nn

from datamodules.errors import CheckpointError

CLASSIFIER_PREFIX = "fc."  # ImageNet's 1000-class layer: never loaded (features only, or another class count)
SHOWN = 5


def load_resnet_weights(resnet: nn.Module, path: str, key: str, name: str) -> None:
    """torchvision / timm ImageNet weights of ResNet ``name`` into ``resnet`` (a timm ResNet, whole or features only),
    every tensor but ``fc.*`` required; ``key`` is the config key that named ``path``, for the errors."""
    if not Path(path).is_file():
        raise CheckpointError(
            f"{key}={path} does not exist; expected a torchvision or timm {name} ImageNet weight file"
        )
    try:
        state = load_state_dict(path)  # .pth or .safetensors; a state_dict / model wrapper and module. removed
    except Exception as error:  # torch.load and safetensors raise many types for a file that is not weights
        raise CheckpointError(f"{key}={path} cannot be read as a weight file ({error})") from error
    if any(k.startswith("Scale.") or k.split(".")[0] == "layer5" or ".layer5." in k for k in state):
        raise CheckpointError(
            f"{key}={path} is the Caffe DeepLab ResNet init of AdvEnt / DASS (Scale.* or layer5.* keys), made for BGR, "
            f"mean-subtracted 0-255 input; expected torchvision or timm {name} ImageNet weights (e.g. torchvision's "
            "resnet101-63fe2227.pth), which match this framework's RGB ImageNet normalisation"
        )
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)}
    expected = {k: v for k, v in resnet.state_dict().items() if not k.startswith(CLASSIFIER_PREFIX)}
    problems = {
        "missing from the file": [k for k in expected if k not in state],
        "not in the network": [k for k in state if k not in expected],
        "of another shape": [
            f"{k} {list(v.shape)} for {list(expected[k].shape)}"
            for k, v in state.items()
            if k in expected and v.shape != expected[k].shape
        ],
    }
    found = [f"{len(keys)} tensors {what} ({', '.join(keys[:SHOWN])})" for what, keys in problems.items() if keys]
    if found:
        raise CheckpointError(f"{key}={path} does not fit {name}: {'; '.join(found)}; expected its ImageNet weights")
    resnet.load_state_dict(state, strict=False)
