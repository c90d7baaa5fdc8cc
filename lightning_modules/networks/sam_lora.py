"""Named LoRA branches on SAM's image encoder.

One frozen encoder (gamma, the pre-trained path) carries several named low-rank branches (alpha / beta for
dual_lora_sam; student / teacher for WeSAM). A branch is chosen per forward with ``active_branch``; with
none active the encoder is the untouched frozen SAM. Own ~60-line layer instead of peft: peft is not
installed, the dual method needs a perturbation of the *frozen* path that peft has no hook for, and merging
a branch back into a plain ``nn.Linear`` (the official checkpoint format) is two lines here.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from datamodules.errors import ConfigError, require_choice
from datamodules.files import write_atomically
from lightning_modules.networks.sam import predict_instances, save_sam_checkpoint

# Output blocks of SAM's fused attention projection ``attn.qkv`` (Linear(dim, 3 dim)), and the output proj.
QKV_TARGETS = ("q", "k", "v")
LORA_TARGETS = (*QKV_TARGETS, "proj")


class LowRankUpdate(nn.Module):
    """One branch's update of one frozen Linear: Delta W_t = (alpha / r) B_t A_t per targeted output block t."""

    def __init__(self, in_features: int, block_size: int, targets: tuple, rank: int, scaling: float):
        super().__init__()
        self.scaling = scaling
        # LoRA's init (Hu et al. 2021): A Kaiming-uniform, B zero, so every branch starts equal to gamma.
        self.down = nn.ParameterDict({t: nn.Parameter(torch.empty(rank, in_features)) for t in targets})
        self.up = nn.ParameterDict({t: nn.Parameter(torch.zeros(block_size, rank)) for t in targets})
        for weight in self.down.values():
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def delta(self, target: str, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(x, self.down[target]), self.up[target])

    def weight(self, target: str) -> torch.Tensor:
        return self.scaling * self.up[target] @ self.down[target]


class LoRALinear(nn.Module):
    """A frozen Linear plus named low-rank branches; ``active`` picks one (None = the frozen path alone).

    E^{alpha/beta} = perturb(E) + Delta E^{alpha/beta}: in training, an active branch sees its frozen
    path's output under dropout (``perturbation``), so the two branches see different views of gamma.
    """

    def __init__(
        self,
        base: nn.Linear,
        blocks: tuple,
        targets: tuple,
        branches: list,
        rank: int,
        alpha: float,
        perturbation: float,
    ):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.blocks, self.targets, self.perturbation = blocks, targets, perturbation
        block_size = base.out_features // len(blocks)
        self.branches = nn.ModuleDict(
            {name: LowRankUpdate(base.in_features, block_size, targets, rank, alpha / rank) for name in branches}
        )
        self.active: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self.base(x)
        if self.active is None:
            return frozen
        if self.training and self.perturbation > 0:
            frozen = F.dropout(frozen, self.perturbation)
        branch = self.branches[self.active]
        delta = [
            branch.delta(b, x)
            if b in self.targets
            else x.new_zeros(*x.shape[:-1], frozen.shape[-1] // len(self.blocks))
            for b in self.blocks
        ]
        return frozen + torch.cat(delta, -1)

    def merged(self, name: str) -> nn.Linear:
        """The plain Linear W + Delta W of branch ``name`` (same keys as the official module)."""
        linear = copy.deepcopy(self.base)
        size = linear.out_features // len(self.blocks)
        with torch.no_grad():
            for index, block in enumerate(self.blocks):
                if block in self.targets:
                    linear.weight[index * size : (index + 1) * size] += (
                        self.branches[name].weight(block).to(linear.weight)
                    )
        return linear


class OutputLoRA(nn.Module):
    """The frozen image encoder followed by named low-rank branches on its output embedding.

    E^{alpha/beta} = perturb(E_img) + Delta E^{alpha/beta}, Delta E = (alpha / r) B A E per embedding pixel: the
    seed slides' "two LoRA modules after the original SAM image encoder" read literally (placement "output").
    """

    def __init__(self, encoder: nn.Module, branches: list, rank: int, alpha: float, perturbation: float):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.img_size, self.perturbation = encoder.img_size, perturbation
        channels = encoder.neck[-2].out_channels
        self.branches = nn.ModuleDict(
            {name: LowRankUpdate(channels, channels, ("embedding",), rank, alpha / rank) for name in branches}
        )
        self.active: str | None = None
        self.last_encoded: tuple | None = None  # (images, their version, frozen embedding)

    def frozen_embedding(self, images: torch.Tensor) -> torch.Tensor:
        # A training step's branches (and gamma) read the same image tensor: the frozen encoder runs once for it.
        # Inference tensors keep no version counter to tell an in-place change, so they are always encoded.
        if images.is_inference():
            return self.encoder(images)
        cached = self.last_encoded
        if cached is not None and cached[0] is images and cached[1] == images._version:
            return cached[2]
        frozen = self.encoder(images)
        self.last_encoded = (images, images._version, frozen)
        return frozen

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        frozen = self.frozen_embedding(images)
        if self.active is None:
            return frozen
        delta = self.branches[self.active].delta("embedding", frozen.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.training and self.perturbation > 0:
            frozen = F.dropout(frozen, self.perturbation)
        return frozen + delta


LORA_PLACEMENTS = ("blocks", "output")


def inject_lora(
    sam: Sam,
    branches: list,
    rank: int,
    alpha: float,
    targets: list,
    layers: list | None = None,
    perturbation: float = 0.0,
) -> list:
    """Wrap the attention projections of the chosen encoder blocks; freezes the whole encoder (gamma).

    ``targets`` from {q, k, v} (blocks of attn.qkv) and proj (attn.proj); ``layers`` None means every block.
    Returns the LoRALinear modules.
    """
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown or not targets:
        raise ConfigError(f"method.lora.targets={list(targets)}: expected a non-empty subset of {LORA_TARGETS}")
    blocks = sam.image_encoder.blocks
    layers = list(range(len(blocks))) if layers is None else list(layers)
    if any(not 0 <= i < len(blocks) for i in layers):
        raise ConfigError(f"method.lora.layers={layers}: the image encoder has blocks 0..{len(blocks) - 1}")
    sam.image_encoder.requires_grad_(False)
    wrapped = []
    qkv_targets = tuple(t for t in QKV_TARGETS if t in targets)
    for index in layers:
        attention = blocks[index].attn
        if qkv_targets:
            attention.qkv = LoRALinear(attention.qkv, QKV_TARGETS, qkv_targets, branches, rank, alpha, perturbation)
            wrapped.append(attention.qkv)
        if "proj" in targets:
            attention.proj = LoRALinear(attention.proj, ("proj",), ("proj",), branches, rank, alpha, perturbation)
            wrapped.append(attention.proj)
    return wrapped


def inject_output_lora(sam: Sam, branches: list, rank: int, alpha: float, perturbation: float = 0.0) -> OutputLoRA:
    """Wrap SAM's image encoder in an ``OutputLoRA`` (the encoder itself frozen)."""
    sam.image_encoder = OutputLoRA(sam.image_encoder, branches, rank, alpha, perturbation)
    return sam.image_encoder


def inject_configured_lora(sam: Sam, branches: list, lora: dict, perturbation: float = 0.0) -> None:
    """The branches as ``method.lora`` places them: ``blocks`` (q, v of the encoder blocks, WeSAM's SAM-LoRA) or
    ``output`` (after the frozen encoder, on its output embedding)."""
    require_choice("method.lora.placement", lora["placement"], LORA_PLACEMENTS)
    if lora["placement"] == "output":
        inject_output_lora(sam, branches, lora["rank"], lora["alpha"], perturbation)
    else:
        inject_lora(sam, branches, lora["rank"], lora["alpha"], lora["targets"], lora.get("layers"), perturbation)


def save_adapted_sam(sam: Sam, branch: str, run_dir: Path) -> None:
    """Write the SAM adapted as ``branch`` into ``run_dir``. In-block LoRA merges into a plain SAM state dict
    (``sam.pth``, loadable by sam_model_registry); an output-placed branch has no plain form, so the adapted
    module's own state dict is kept with the branch's name (``adapted_sam.pt``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(sam.image_encoder, OutputLoRA):
        adapted = {"selected_branch": branch, "state_dict": sam.state_dict()}
        write_atomically(run_dir / "adapted_sam.pt", lambda temporary: torch.save(adapted, temporary))
    else:
        save_sam_checkpoint(merged_sam(sam, branch), run_dir / "sam.pth")


def lora_modules(sam: Sam) -> list:
    return [m for m in sam.image_encoder.modules() if isinstance(m, (LoRALinear, OutputLoRA))]


def branch_parameters(sam: Sam, name: str) -> list:
    return [p for m in lora_modules(sam) for p in m.branches[name].parameters()]


@contextmanager
def active_branch(sam: Sam, name: str | None):
    """Run the image encoder as branch ``name`` (None: the frozen pre-trained encoder gamma)."""
    modules = lora_modules(sam)
    previous = [m.active for m in modules]
    for m in modules:
        m.active = name
    try:
        yield
    finally:
        for m, p in zip(modules, previous):
            m.active = p


def merged_sam(sam: Sam, name: str) -> Sam:
    """A copy of ``sam`` with branch ``name`` merged into plain Linears: the official SAM module tree.

    Output-placed branches act after the encoder's final LayerNorm and have no plain-SAM form.
    """
    if isinstance(sam.image_encoder, OutputLoRA):
        raise ConfigError("output-placed LoRA branches cannot be merged into a plain SAM; save them with the SAM")
    merged = copy.deepcopy(sam)
    for block in merged.image_encoder.blocks:
        for attr in ("qkv", "proj"):
            layer = getattr(block.attn, attr)
            if isinstance(layer, LoRALinear):
                setattr(block.attn, attr, layer.merged(name))
    return merged


def encode(sam: Sam, branch: str | None, images: torch.Tensor) -> torch.Tensor:
    """Image embeddings [B,C,h,w] of ``images`` through branch ``branch`` (None: gamma)."""
    with active_branch(sam, branch):
        return sam.image_encoder(images)


def segment(sam: Sam, branch: str | None, images: torch.Tensor, targets: list, kinds: list, poly_as: str) -> tuple:
    """(embeddings, {kind: [(mask logits [N,1,S,S], IoU predictions [N,1]) per image]}) of ``images`` through
    branch ``branch``: one decoder call per prompt kind."""
    embeddings = encode(sam, branch, images)
    return embeddings, {
        kind: predict_instances(sam, embeddings, targets, kind, poly_as, with_iou=True) for kind in kinds
    }
