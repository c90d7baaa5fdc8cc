"""SeCo's region classifier (official ``SCC/models/resnet.py``): a ResNet that classifies one connected component
from a window of the image around it, the component's mask multiplied into the stem's output (after conv1, BN,
ReLU; before the max-pool) so the features outside the component are zeroed.
"""

from __future__ import annotations

import logging

import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.networks.pretrained import load_resnet_weights

log = logging.getLogger(__name__)


class RegionClassifier(nn.Module):
    def __init__(self, num_classes: int, backbone: str, pretrained: str | None = None, backbone_kwargs=None):
        super().__init__()
        self.resnet = timm.create_model(backbone, num_classes=num_classes, **(backbone_kwargs or {}))
        if pretrained:
            load_resnet_weights(self.resnet, pretrained, "method.scc.classifier.network.pretrained", backbone)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Class logits [K, C] of windows ``images`` [K,3,h,w] with component ``masks`` [K,1,h,w] (0/1)."""
        net = self.resnet
        stem = net.act1(net.bn1(net.conv1(images)))
        stem = stem * F.interpolate(masks.to(stem.dtype), size=stem.shape[-2:], mode="nearest")
        features = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(stem)))))
        return net.fc(net.global_pool(features))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.resnet.fc.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]


def build_region_classifier(network: dict, num_classes: int) -> RegionClassifier:
    if not network.get("pretrained"):
        log.info(
            "the SCC region classifier (%s) starts from random init (no ImageNet weights set)", network["backbone"]
        )
    return RegionClassifier(num_classes, network["backbone"], network.get("pretrained"), network.get("backbone_kwargs"))
