"""DeepLabV2 (Chen et al., TPAMI 2018) as used by the UDA literature: a dilated ResNet (output stride
8) from timm and the ASPP classifier, whose parallel dilated 3x3 convolutions are summed.
"""

from __future__ import annotations

import logging
from typing import Sequence

import timm
import torch
from torch import nn

from lightning_modules.networks.pretrained import load_resnet_weights

log = logging.getLogger(__name__)


class ASPPClassifier(nn.Module):
    """DeepLabV2's classifier: sum of dilated 3x3 convolutions straight to class logits."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d) for d in dilations)
        for branch in self.branches:
            nn.init.normal_(branch.weight, std=0.01)
            nn.init.zeros_(branch.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(features) for branch in self.branches]).sum(0)

    def branch_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Each dilated branch's class logits, concatenated: [B, branches x classes, h, w] (their sum is forward's)."""
        return torch.cat([branch(features) for branch in self.branches], 1)


class DeepLabV2(nn.Module):
    """``forward`` returns class logits at 1/8 resolution and the backbone features they come from."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        aspp_dilations: Sequence[int] = (6, 12, 18, 24),
        pretrained: str | None = None,
        freeze_bn: bool = False,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained, backbone_kwargs or {})
        self.feature_channels = self.backbone.feature_info.channels()[-1]
        self.classifier = ASPPClassifier(self.feature_channels, num_classes, aspp_dilations)
        self.freeze_bn = freeze_bn

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)[-1]
        return self.classifier(features), features

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of (possibly perturbed) backbone features: UniMatch's feature-perturbation stream."""
        return self.classifier(features)

    def forward_branches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits and the concatenated ASPP branch logits they are the sum of (BiCL's official features)."""
        branches = self.classifier.branch_logits(self.backbone(images)[-1])
        return branches.unflatten(1, (len(self.classifier.branches), -1)).sum(1), branches

    def train(self, mode: bool = True):
        # DeepLabV2 UDA recipes train with batch 1-2 per domain and keep ImageNet BN statistics fixed.
        super().train(mode)
        if self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
                    module.weight.requires_grad_(False)
                    module.bias.requires_grad_(False)
        return self


def build_backbone(name: str, pretrained: str | None, kwargs: dict) -> nn.Module:
    """A timm ResNet at output stride 8; ``pretrained`` is a local ImageNet weight file (no downloads)."""
    backbone = timm.create_model(name, features_only=True, output_stride=8, out_indices=(-1,), **kwargs)
    if pretrained:
        load_resnet_weights(backbone, pretrained, "model.pretrained", name)
        log.info("loaded ImageNet weights for %s from %s", name, pretrained)
    else:
        log.warning("model.pretrained is not set: the %s backbone starts from random init", name)
    return backbone


def build_deeplabv2(model: dict, num_classes: int) -> DeepLabV2:
    """DeepLabV2 from the ``model`` config node (configs/network/deeplabv2_*.yaml)."""
    return DeepLabV2(
        num_classes,
        backbone=model["backbone"],
        aspp_dilations=model["aspp_dilations"],
        pretrained=model.get("pretrained"),
        freeze_bn=model["freeze_bn"],
        backbone_kwargs=model.get("backbone_kwargs"),
    )
