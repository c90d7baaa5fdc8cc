"""SegFormer (Xie et al., NeurIPS 2021): the Mix Transformer (MiT) encoder with a DAFormer decode head
(Hoyer et al., CVPR 2022), the network TMT and DAFormer-family self-training build on.

Parameter names follow the official MiT code (NVlabs/SegFormer ``mix_transformer.py``, also used by
DAFormer): ``patch_embed{i}.proj``, ``block{i}.{j}.attn.{q,kv,sr,norm,proj}``, ``block{i}.{j}.mlp.{fc1,
dwconv.dwconv,fc2}``, ``norm{i}``; so the official ``mit_b5.pth`` loads as is, and
``load_mit_pretrained`` also reads mmsegmentation-converted MiT weights (``layers.{i}...``) by undoing
mmseg's ``mit2mmseg`` renaming. Every self-attention accepts an additive bias on its logits, one value
per key token, which is how TMT's transferability map enters the encoder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``p`` during training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class OverlapPatchEmbed(nn.Module):
    """Strided overlapping convolution to tokens (7x7 stride 4 for stage 1, 3x3 stride 2 after)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientSelfAttention(nn.Module):
    """MiT attention: keys/values from a spatially reduced (stride ``sr_ratio``) token grid.

    ``key_bias`` [B, 1, h, w] is added to the attention logits of every query and head for the key at
    each position (pooled to the reduced key grid): softmax(QK^T / sqrt(d) + M) V.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, height: int, width: int, key_bias: torch.Tensor | None = None):
        batch, tokens, dim = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(batch, tokens, heads, dim // heads).transpose(1, 2)
        key_height, key_width = height, width
        if self.sr_ratio > 1:
            grid = self.sr(x.transpose(1, 2).reshape(batch, dim, height, width))
            key_height, key_width = grid.shape[-2:]
            x = self.norm(grid.flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(batch, -1, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        mask = None
        if key_bias is not None:
            pooled = F.adaptive_avg_pool2d(key_bias.float(), (key_height, key_width))
            mask = pooled.flatten(2).unsqueeze(1).to(q.dtype)  # [B, 1, 1, N_keys], broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, tokens, dim = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(batch, dim, height, width))
        return x.flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2 (the conv replaces positional encodings)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class MiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x, height: int, width: int, key_bias: torch.Tensor | None = None):
        x = x + self.drop_path(self.attn(self.norm1(x), height, width, key_bias))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class MixTransformer(nn.Module):
    """MiT encoder: four stages at strides 4/8/16/32, returns the four feature maps."""

    def __init__(
        self,
        embed_dims: Sequence[int],
        num_heads: Sequence[int],
        depths: Sequence[int],
        sr_ratios: Sequence[int],
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        self.embed_dims = list(embed_dims)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        start = 0
        for i, (dim, heads, depth, sr) in enumerate(zip(embed_dims, num_heads, depths, sr_ratios), start=1):
            source = in_channels if i == 1 else embed_dims[i - 2]
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(source, dim, 7 if i == 1 else 3, 4 if i == 1 else 2))
            setattr(
                self,
                f"block{i}",
                nn.ModuleList(MiTBlock(dim, heads, mlp_ratio, sr, rates[start + j]) for j in range(depth)),
            )
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))
            start += depth

    def forward(
        self, images: torch.Tensor, key_bias: torch.Tensor | None = None, guided_stages: Sequence[int] = (0, 1, 2, 3)
    ) -> list[torch.Tensor]:
        features, x = [], images
        for i in range(len(self.embed_dims)):
            x, height, width = getattr(self, f"patch_embed{i + 1}")(x)
            stage_bias = key_bias if i in guided_stages else None
            for block in getattr(self, f"block{i + 1}"):
                x = block(x, height, width, stage_bias)
            x = getattr(self, f"norm{i + 1}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
            features.append(x)
        return features


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 1, dilation: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel,
            padding=dilation * (kernel // 2),
            dilation=dilation,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SeparableASPP(nn.Module):
    """DAFormer's context-aware fusion: parallel (depthwise-separable, dilated) 3x3 branches + bottleneck."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            conv_bn_relu(in_channels, channels)
            if d == 1
            else nn.Sequential(
                conv_bn_relu(in_channels, in_channels, 3, d, groups=in_channels), conv_bn_relu(in_channels, channels)
            )
            for d in dilations
        )
        self.bottleneck = conv_bn_relu(len(dilations) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], 1))


class DAFormerHead(nn.Module):
    """Per-level linear embedding, upsampling to stride 4, concatenation, ASPP fusion, classifier."""

    def __init__(
        self,
        in_channels: Sequence[int],
        embed_dim: int,
        dilations: Sequence[int],
        num_classes: int,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.embed = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)
        self.fuse = SeparableASPP(len(in_channels) * embed_dim, embed_dim, dilations)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        size = features[0].shape[-2:]
        embedded = [
            F.interpolate(embed(f), size=size, mode="bilinear", align_corners=False)
            for embed, f in zip(self.embed, features)
        ]
        fused = self.fuse(torch.cat(embedded, 1))
        return self.classifier(self.dropout(fused)), fused


class SegFormer(nn.Module):
    """``forward(images, key_bias) -> (logits at stride 4, fused decoder features)``.

    ``key_bias`` [B, 1, h, w] (any resolution) is added to the attention logits of the encoder stages in
    ``guided_stages``; None leaves the encoder exactly the plain MiT.
    """

    def __init__(self, backbone: MixTransformer, head: DAFormerHead):
        super().__init__()
        self.backbone = backbone
        self.decode_head = head

    def forward(
        self, images: torch.Tensor, key_bias: torch.Tensor | None = None, guided_stages: Sequence[int] = (0, 1, 2, 3)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode_head(self.backbone(images, key_bias, guided_stages))


MMSEG_PATTERNS = [
    (r"layers\.(\d+)\.0\.projection\.(.*)", lambda s, rest: f"patch_embed{s}.proj.{rest}"),
    (r"layers\.(\d+)\.0\.norm\.(.*)", lambda s, rest: f"patch_embed{s}.norm.{rest}"),
    (r"layers\.(\d+)\.1\.(\d+\.)attn\.attn\.out_proj\.(.*)", lambda s, j, rest: f"block{s}.{j}attn.proj.{rest}"),
    (r"layers\.(\d+)\.1\.(\d+\.)attn\.(sr|norm)\.(.*)", lambda s, j, m, rest: f"block{s}.{j}attn.{m}.{rest}"),
    (r"layers\.(\d+)\.1\.(\d+\.)ffn\.layers\.0\.(.*)", lambda s, j, rest: f"block{s}.{j}mlp.fc1.{rest}"),
    (r"layers\.(\d+)\.1\.(\d+\.)ffn\.layers\.1\.(.*)", lambda s, j, rest: f"block{s}.{j}mlp.dwconv.dwconv.{rest}"),
    (r"layers\.(\d+)\.1\.(\d+\.)ffn\.layers\.4\.(.*)", lambda s, j, rest: f"block{s}.{j}mlp.fc2.{rest}"),
    (r"layers\.(\d+)\.1\.(\d+\.)(norm[12])\.(.*)", lambda s, j, m, rest: f"block{s}.{j}{m}.{rest}"),
    (r"layers\.(\d+)\.2\.(.*)", lambda s, rest: f"norm{s}.{rest}"),
]


def mmseg_to_official_mit(state: dict) -> dict:
    """Undo mmseg's ``mit2mmseg``: stage i-1 -> i, fused in_proj -> q / kv, 1x1 convs -> linear weights."""
    converted = {}
    for key, value in state.items():
        fused = re.fullmatch(r"layers\.(\d+)\.1\.(\d+)\.attn\.attn\.in_proj_(weight|bias)", key)
        if fused:
            stage, block, kind = int(fused[1]) + 1, fused[2], fused[3]
            dim = value.shape[0] // 3
            converted[f"block{stage}.{block}.attn.q.{kind}"] = value[:dim]
            converted[f"block{stage}.{block}.attn.kv.{kind}"] = value[dim:]
            continue
        for pattern, rename in MMSEG_PATTERNS:
            match = re.fullmatch(pattern, key)
            if match:
                stage, *rest = match.groups()
                new_key = rename(int(stage) + 1, *rest)
                if re.search(r"mlp\.fc[12]\.weight$", new_key):
                    value = value.flatten(1)
                converted[new_key] = value
                break
        else:
            raise KeyError(f"mmseg MiT key '{key}' has no official MiT counterpart")
    return converted


def load_mit_pretrained(backbone: MixTransformer, path: str) -> None:
    """ImageNet MiT weights: the official ``mit_b*.pth`` (NVlabs/SegFormer, DAFormer) or an mmseg conversion.

    A ``state_dict`` / ``model`` wrapper and a ``backbone.`` prefix are removed; the ImageNet
    classification ``head.*`` is dropped. Every encoder parameter must be found.
    """
    if not Path(path).is_file():
        raise CheckpointError(
            f"model.pretrained={path} does not exist; expected an MiT ImageNet weight file "
            f"(official mit_b5.pth or an mmseg-converted MiT checkpoint)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated file, a .safetensors file, not a torch file at all
        raise CheckpointError(f"model.pretrained={path} cannot be read as a torch weight file ({error})") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"model.pretrained={path} holds a {type(state).__name__}; expected a MiT state dict")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "decode_head."))}
    if any(k.startswith("layers.") for k in state):
        state = mmseg_to_official_mit(state)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"model.pretrained={path} does not match the MiT encoder: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    log.info("loaded MiT ImageNet weights from %s", path)


def build_segformer(model: dict, num_classes: int) -> SegFormer:
    """SegFormer from the ``model`` config node (configs/network/segformer_*.yaml)."""
    backbone = MixTransformer(
        model["embed_dims"],
        model["num_heads"],
        model["depths"],
        model["sr_ratios"],
        model["mlp_ratio"],
        model["drop_path_rate"],
    )
    if model.get("pretrained"):
        load_mit_pretrained(backbone, model["pretrained"])
    else:
        log.warning("model.pretrained is not set: the MiT encoder starts from random init")
    head = DAFormerHead(
        model["embed_dims"], model["decoder_embed_dim"], model["aspp_dilations"], num_classes, model["decoder_dropout"]
    )
    return SegFormer(backbone, head)
