"""The small heads methods add to a segmenter: BiCL's contrast projection, mt_metric's metric network with its
class proxies, TMT's region domain discriminator."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.components.metric_learning import proxy_similarity


class ProjectionHead(nn.Module):
    """Pixel-feature projection for contrastive learning: 1x1 conv, ReLU, 1x1 conv (applied to backbone features)."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class MetricHead(nn.Module):
    """Metric network on encoder features and the class proxies; ``forward`` gives cosine similarities [B, C, h, w]."""

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int, embedding_dim: int):
        super().__init__()
        self.embed = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, embedding_dim, 1)
        )
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        # Proxy-Anchor's official initialisation of the proxies.
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return proxy_similarity(self.embed(features), self.proxies)


class RegionDomainDiscriminator(nn.Module):
    """D(f(r)): probability that a region's pooled feature comes from the source domain."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, region_features: torch.Tensor) -> torch.Tensor:
        return self.net(region_features).squeeze(-1)
