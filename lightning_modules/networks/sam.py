"""Segment Anything built from segment-anything's own modules, and batched prompting of all instances.

``build_sam`` gives the official ViT-B/L/H (``sam_model_registry``) or a CPU-size "tiny" SAM made from the
same modules, loading official-format state dicts with errors that name the file. ``encode_prompts`` /
``decode_masks`` are the differentiable halves of ``Sam.forward`` (which runs under no_grad);
``decode_batch`` decodes every instance of every image of a batch in one mask-decoder call.
``SharedEmbeddingPredictor`` serves SAM's everything mode and prompted masks from one image-encoder pass.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from datamodules.constants import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from datamodules.errors import CheckpointError, ConfigError
from datamodules.files import write_atomically
from datamodules.prompts import masks_to_boxes

log = logging.getLogger(__name__)

OFFICIAL_VARIANTS = ("vit_b", "vit_l", "vit_h")
VARIANTS = (*OFFICIAL_VARIANTS, "tiny")
OFFICIAL_IMAGE_SIZE = 1024  # fixed by segment_anything's _build_sam
TINY_DEFAULTS = {
    "image_size": 128,
    "patch_size": 16,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 2,
    "window_size": 4,
    "global_attn_indexes": (1,),
    "prompt_embed_dim": 64,
    "decoder_depth": 2,
    "decoder_mlp_dim": 256,
    "decoder_heads": 4,
}
PROMPT_KINDS = ("box", "point", "poly")
POLY_AS = ("mask", "box")
# A polygon becomes a mask prompt of logits in [-10, 10]: the fraction f of each low-res cell inside the
# polygon maps linearly to 10 * (2f - 1), so the prompt's 0-level set is the polygon's outline and its
# magnitude matches SAM's own confident low-res logits, which is what SAM's mask input saw in training.
POLY_MASK_LOGIT = 10.0


def build_tiny_sam(image_size: int, options: dict) -> Sam:
    """A small SAM from segment-anything's modules; same structure as the official build, smaller dims."""
    dim = options["prompt_embed_dim"]
    embedding_size = image_size // options["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=options["patch_size"],
            embed_dim=options["embed_dim"],
            depth=options["depth"],
            num_heads=options["num_heads"],
            mlp_ratio=4,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=options["window_size"],
            global_attn_indexes=tuple(options["global_attn_indexes"]),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=dim,
            transformer=TwoWayTransformer(
                depth=options["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=options["decoder_mlp_dim"],
                num_heads=options["decoder_heads"],
            ),
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def tiny_options(tiny: dict | None, image_size: int | None) -> dict:
    options = dict(TINY_DEFAULTS)
    unknown = set(tiny or {}) - set(TINY_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown tiny SAM options {sorted(unknown)}; expected some of {sorted(TINY_DEFAULTS)}")
    options.update(tiny or {})
    if image_size is not None:
        options["image_size"] = image_size
    return options


def load_sam_checkpoint(sam: Sam, checkpoint: str | Path) -> None:
    """Load an official-format state dict, failing once with the file and the first keys that do not fit."""
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(
            f"SAM checkpoint {path} does not exist; expected an official SAM state dict .pth "
            "(e.g. sam_vit_b_01ec64.pth) or one written by save_sam_checkpoint"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a Lightning .ckpt, a truncated file, not a torch file at all
        raise CheckpointError(
            f"SAM checkpoint {path} is not a plain SAM state dict ({type(error).__name__}); expected an official "
            "SAM .pth (e.g. sam_vit_b_01ec64.pth) or the sam.pth a SAM run writes beside its checkpoints, not a "
            "Lightning .ckpt"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = wesam_checkpoint_as_sam(state["model"], path)
    if isinstance(state, dict) and "selected_branch" in state:
        raise CheckpointError(
            f"SAM checkpoint {path} is an adapted SAM whose LoRA sits after the image encoder (the adapted_sam.pt of "
            "a run with method.lora.placement=output), which has no plain SAM form; expected a plain SAM .pth: load "
            "that run's checkpoints/last.ckpt into its method's module, or adapt with method.lora.placement=blocks "
            "for a merged sam.pth"
        )
    if not isinstance(state, dict) or "state_dict" in state:
        raise CheckpointError(
            f"SAM checkpoint {path} is not a plain SAM state dict; expected an official SAM .pth (e.g. "
            "sam_vit_b_01ec64.pth) or the sam.pth a SAM run writes beside its checkpoints, not a Lightning .ckpt"
        )
    expected = sam.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: {tuple(v.shape)} in file vs {tuple(expected[k].shape)} in model"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        held, built = sam_architecture(state), sam_architecture(expected)
        if held and built and held != built:
            raise CheckpointError(
                f"SAM checkpoint {path} holds a {held} SAM image encoder, but model.variant builds a {built} one; "
                "set model.variant (and model.image_size) to the file's variant or pass a checkpoint of this variant"
            )
        raise CheckpointError(
            f"SAM checkpoint {path} does not fit this SAM variant ({len(problems)} mismatching keys, "
            f"first: {'; '.join(problems[:5])})"
        )
    sam.load_state_dict(state)


WESAM_PREFIX = "model."  # WeSAM's Model wrapper holds the SAM as .model


def wesam_checkpoint_as_sam(state: dict, path: Path) -> dict:
    """The plain SAM state dict of a checkpoint WeSAM's ``adaptation.py`` saves (``{"model": Model.state_dict(),
    "optimizer": ...}``), its LoRA merged: ``sam_lora.py``'s ``_LoRA_qkv`` adds B_q A_q x to the q third and B_v A_v x
    to the v third of each block's qkv output (no scaling), so W_qkv[:d] += B_q A_q and W_qkv[-d:] += B_v A_v."""
    if not any(k.startswith(WESAM_PREFIX + "image_encoder.") for k in state):
        raise CheckpointError(
            f"SAM checkpoint {path} holds a 'model' entry that is not a SAM (no model.image_encoder.* keys); expected "
            "an official SAM .pth, the sam.pth a SAM run writes, or a checkpoint WeSAM's adaptation.py saved"
        )
    sam_state = {k.removeprefix(WESAM_PREFIX): v for k, v in state.items()}
    merged = 0
    for key in [k for k in sam_state if k.endswith(".attn.qkv.qkv.weight")]:
        block = key.removesuffix(".qkv.weight")
        try:
            weight, dim = sam_state.pop(key).clone(), sam_state[f"{block}.linear_a_q.weight"].shape[1]
            weight[:dim] += sam_state.pop(f"{block}.linear_b_q.weight") @ sam_state.pop(f"{block}.linear_a_q.weight")
            weight[-dim:] += sam_state.pop(f"{block}.linear_b_v.weight") @ sam_state.pop(f"{block}.linear_a_v.weight")
        except KeyError as error:
            raise CheckpointError(f"SAM checkpoint {path}: WeSAM's LoRA of {block} lacks {error}") from error
        sam_state[f"{block}.weight"] = weight
        sam_state[f"{block}.bias"] = sam_state.pop(f"{block}.qkv.bias")
        merged += 1
    log.info("SAM checkpoint %s: WeSAM's adapted SAM, its LoRA merged into %d encoder blocks", path, merged)
    return sam_state


OFFICIAL_VARIANTS = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}


def sam_architecture(state: Mapping) -> str | None:
    """'vit_b (embed dim 768, 12 blocks)'-style description of a SAM state dict's image encoder, None if it has none."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return None
    blocks = {key.split(".")[2] for key in state if key.startswith("image_encoder.blocks.")}
    shape = (int(patch.shape[0]), len(blocks))
    return f"{OFFICIAL_VARIANTS.get(shape, 'custom')} (embed dim {shape[0]}, {shape[1]} blocks)"


def build_sam(
    variant: str, checkpoint: str | Path | None = None, image_size: int | None = None, tiny: dict | None = None
) -> Sam:
    """SAM ``variant`` (vit_b / vit_l / vit_h / tiny), from ``checkpoint`` or, with none, random init.

    ``image_size`` None means the variant's own size: 1024 for the official ones (the registry fixes
    it), ``tiny["image_size"]`` (default 128) for tiny.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown SAM variant '{variant}'; expected one of {VARIANTS}")
    if variant == "tiny":
        options = tiny_options(tiny, image_size)
        sam = build_tiny_sam(options["image_size"], options)
    else:
        if image_size not in (None, OFFICIAL_IMAGE_SIZE):
            raise ConfigError(f"SAM {variant} takes {OFFICIAL_IMAGE_SIZE}px inputs; got image_size={image_size}")
        sam = sam_model_registry[variant](checkpoint=None)
    if checkpoint is None:
        log.warning("no SAM checkpoint given (model.sam_checkpoint): SAM %s starts from random init", variant)
    else:
        load_sam_checkpoint(sam, checkpoint)
    return sam.train()


def build_configured_sam(model: Mapping, checkpoint: str | Path | None = None) -> Sam:
    """The SAM a run's ``model`` config describes, from ``checkpoint`` if given, else ``model.sam_checkpoint``."""
    weights = checkpoint if checkpoint is not None else model.get("sam_checkpoint")
    return build_sam(model["variant"], weights, model["image_size"], model.get("tiny"))


def save_sam_checkpoint(sam: Sam, path: str | Path) -> None:
    """A plain state dict, the format of the official files (loadable by build_sam and sam_model_registry), written
    atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = sam.state_dict()
    write_atomically(path, lambda temporary: torch.save(state, temporary))


def poly_mask_logits(polys: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Rasterised polygons [N,S,S] -> mask-prompt logits [N,1,s,s] (see POLY_MASK_LOGIT)."""
    inside = F.interpolate(polys[:, None].float(), size=size, mode="area")
    return POLY_MASK_LOGIT * (2 * inside - 1)


def encode_prompts(sam: Sam, target: dict, kind: str, poly_as: str = "mask") -> tuple[torch.Tensor, torch.Tensor]:
    """(sparse, dense) prompt embeddings for all N instances of one image; prompts are in SAM's input frame."""
    encoder, device = sam.prompt_encoder, sam.device
    if kind == "box":
        return encoder(points=None, boxes=target["boxes"].to(device), masks=None)
    if kind == "point":
        points = (target["points"].to(device), target["point_labels"].to(device))
        return encoder(points=points, boxes=None, masks=None)
    if kind == "poly" and poly_as in POLY_AS:
        polys = target["polys"].to(device)
        if poly_as == "box":
            return encoder(points=None, boxes=masks_to_boxes(polys > 0.5), masks=None)
        return encoder(points=None, boxes=None, masks=poly_mask_logits(polys, encoder.mask_input_size))
    raise ConfigError(
        f"unknown prompt kind '{kind}' / poly_as '{poly_as}'; expected kind in {PROMPT_KINDS} and poly_as in {POLY_AS}"
    )


def decode_masks(
    sam: Sam, image_embedding: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, multimask_output: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits [N,M,S,S] at the padded input resolution (not cropped) and IoU predictions [N,M].

    Upsampled like Sam.postprocess_masks' first step; callers crop to ``input_size`` themselves.
    """
    low_res, iou = sam.mask_decoder(
        image_embeddings=image_embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )
    size = sam.image_encoder.img_size
    return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False), iou


def decode_batch(
    sam: Sam, image_embeddings: torch.Tensor, prompts: list, multimask_output: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mask logits [N_i,M,S,S], IoU predictions [N_i,M]) per image from its (sparse, dense) prompts, all the
    batch's instances in one decoder call."""
    counts = [len(sparse) for sparse, _ in prompts]
    sparse, dense = torch.cat([sparse for sparse, _ in prompts]), torch.cat([dense for _, dense in prompts])
    # SAM's decoder adds each mask's dense prompt to the one image embedding it is given; adding every
    # instance's own image embedding here instead lets one call serve instances of different images.
    instance_embeddings = image_embeddings.repeat_interleave(torch.tensor(counts, device=dense.device), dim=0)
    logits, iou = decode_masks(
        sam, torch.zeros_like(image_embeddings[:1]), sparse, dense + instance_embeddings, multimask_output
    )
    return list(zip(logits.split(counts), iou.split(counts)))


def predict_instances(
    sam: Sam, image_embeddings: torch.Tensor, targets: list, kind: str, poly_as: str = "mask", with_iou: bool = False
) -> list:
    """Single-mask logits [N_i,1,S,S] per image (with ``with_iou``, pairs of logits and IoU predictions
    [N_i,1]): one prompt-encoder call per image, one decoder call for the batch."""
    outputs = decode_batch(sam, image_embeddings, [encode_prompts(sam, target, kind, poly_as) for target in targets])
    return outputs if with_iou else [logits for logits, _ in outputs]


class SharedEmbeddingPredictor(SamPredictor):
    """SamPredictor that keeps one image embedding until ``release``: the everything-mode generator's own
    set_image / reset_image around its point grid reuse it, so the image encoder runs once per image."""

    def __init__(self, sam) -> None:
        super().__init__(sam)
        self.release()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if not self.is_image_set:
            super().set_image(image, image_format)

    def reset_image(self) -> None:
        """Kept: the embedding also serves the box + point prompts of the things."""

    def release(self) -> None:
        super().reset_image()
