"""Tiny SAM from segment-anything's modules: batched prompting, gradients, checkpoint round trip."""

from __future__ import annotations

import logging

import pytest
import torch

from datamodules.datasets.synth_shapes import SyntheticShapes
from datamodules.errors import CheckpointError
from datamodules.prompted import PromptedDataset, collate_prompted
from lightning_modules.networks.sam import (
    PROMPT_KINDS,
    build_configured_sam,
    build_sam,
    decode_masks,
    encode_prompts,
    predict_instances,
    sam_architecture,
    save_sam_checkpoint,
)

SIZE = 64
TINY = {"embed_dim": 32, "num_heads": 2, "prompt_embed_dim": 32, "decoder_mlp_dim": 64, "decoder_heads": 2}


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_sam("tiny", image_size=SIZE, tiny=TINY)


@pytest.fixture(scope="module")
def batch():
    shapes = SyntheticShapes(split="val", domain="clear", length=2, size=48)
    dataset = PromptedDataset(shapes, image_size=SIZE, train=False)
    return collate_prompted([dataset[0], dataset[1]])


@pytest.mark.parametrize("kind,poly_as", [("box", "mask"), ("point", "mask"), ("poly", "mask"), ("poly", "box")])
def test_all_instances_in_one_call(sam, batch, kind, poly_as):
    target = batch["targets"][0]
    n = len(target["boxes"])
    sparse, dense = encode_prompts(sam, target, kind, poly_as)
    assert sparse.shape[0] == dense.shape[0] == n
    with torch.no_grad():
        embedding = sam.image_encoder(batch["img"][:1])
        logits, iou = decode_masks(sam, embedding, sparse, dense)
    assert logits.shape == (n, 1, SIZE, SIZE) and iou.shape == (n, 1)


def test_predict_instances_per_image(sam, batch):
    with torch.no_grad():
        outputs = predict_instances(sam, sam.image_encoder(batch["img"]), batch["targets"], "point")
    assert [o.shape for o in outputs] == [(len(t["boxes"]), 1, SIZE, SIZE) for t in batch["targets"]]


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_batched_decoding_equals_one_image_at_a_time(sam, batch, kind):
    """One decoder call for all images' instances gives each image's own single-image masks and IoUs."""
    with torch.no_grad():
        embeddings = sam.image_encoder(batch["img"])
        batched = predict_instances(sam, embeddings, batch["targets"], kind, with_iou=True)
        for embedding, target, (logits, iou) in zip(embeddings, batch["targets"], batched):
            single_logits, single_iou = decode_masks(sam, embedding[None], *encode_prompts(sam, target, kind))
            torch.testing.assert_close(logits, single_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou, single_iou, atol=1e-5, rtol=1e-5)


def test_unknown_kind_is_rejected(sam, batch):
    with pytest.raises(ValueError, match="prompt kind"):
        encode_prompts(sam, batch["targets"][0], "scribble")
    assert PROMPT_KINDS == ("box", "point", "poly")


def test_gradients_reach_the_mask_decoder(sam, batch):
    sam.zero_grad()
    logits = predict_instances(sam, sam.image_encoder(batch["img"]), batch["targets"], "poly")
    sum(o.sigmoid().mean() for o in logits).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sam.mask_decoder.output_upscaling.parameters())
    assert sam.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_checkpoint_round_trip_gives_identical_logits(sam, batch, tmp_path):
    path = tmp_path / "ckpt" / "sam_tiny.pth"
    save_sam_checkpoint(sam, path)
    loaded = build_sam("tiny", path, image_size=SIZE, tiny=TINY)
    with torch.no_grad():
        expected = predict_instances(sam.eval(), sam.image_encoder(batch["img"]), batch["targets"], "box")
        actual = predict_instances(loaded.eval(), loaded.image_encoder(batch["img"]), batch["targets"], "box")
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_configured_sam_loads_the_given_checkpoint_over_the_configured_one(sam, tmp_path):
    configured, given = tmp_path / "configured.pth", tmp_path / "given.pth"
    save_sam_checkpoint(sam, given)
    save_sam_checkpoint(build_sam("tiny", image_size=SIZE, tiny=TINY), configured)
    model = {"variant": "tiny", "sam_checkpoint": str(configured), "image_size": SIZE, "tiny": TINY}
    weight = "mask_decoder.output_upscaling.0.weight"
    from_config = build_configured_sam(model).state_dict()[weight]
    assert torch.equal(from_config, torch.load(configured, weights_only=True)[weight])
    assert torch.equal(build_configured_sam(model, given).state_dict()[weight], sam.state_dict()[weight])
    assert not torch.equal(from_config, sam.state_dict()[weight])


def test_checkpoint_errors_name_the_path(sam, tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match="nowhere.pth.*sam_vit_b_01ec64.pth"):
        build_sam("tiny", missing, image_size=SIZE, tiny=TINY)
    path = tmp_path / "other.pth"
    save_sam_checkpoint(sam, path)
    with pytest.raises(CheckpointError, match=r"other.pth holds a custom \(embed dim \d+, \d+ blocks\) SAM image"):
        build_sam("tiny", path, image_size=SIZE, tiny={**TINY, "embed_dim": 48})
    official_large = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}
    official_large |= {f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1024) for i in range(24)}
    assert sam_architecture(official_large) == "vit_l (embed dim 1024, 24 blocks)"
    lightning_checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": sam.state_dict(), "hyper_parameters": {"seed": 0}}, lightning_checkpoint)
    with pytest.raises(CheckpointError, match="last.ckpt is not a plain SAM state dict.*not a Lightning .ckpt"):
        build_sam("tiny", lightning_checkpoint, image_size=SIZE, tiny=TINY)


def test_a_checkpoint_wesam_saved_loads_with_its_lora_merged(sam, tmp_path):
    """WeSAM's adaptation.py saves {"model": Model.state_dict(), "optimizer": ...}: the SAM under "model.", each
    block's qkv wrapped as qkv.qkv with rank-4 linear_a/b_q and linear_a/b_v beside it (sam_lora.py _LoRA_qkv)."""
    torch.manual_seed(1)
    state, lora = {}, {}
    for key, value in sam.state_dict().items():
        if key.endswith(".attn.qkv.weight") or key.endswith(".attn.qkv.bias"):
            block = key.rsplit(".", 1)[0]
            state[f"model.{block}.qkv.{key.rsplit('.', 1)[1]}"] = value
            for name, shape in (("a_q", (4, 32)), ("b_q", (32, 4)), ("a_v", (4, 32)), ("b_v", (32, 4))):
                lora[(block, name)] = state[f"model.{block}.linear_{name}.weight"] = torch.randn(shape)
        else:
            state[f"model.{key}"] = value
    path = tmp_path / "CAMO-box-last-ckpt.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    merged = build_sam("tiny", path, image_size=SIZE, tiny=TINY)
    x = torch.randn(5, 32)
    for block in {block for block, _ in lora}:
        wesam = sam.state_dict()
        qkv = x @ wesam[f"{block}.weight"].T + wesam[f"{block}.bias"]  # _LoRA_qkv.forward
        qkv[:, :32] += x @ lora[(block, "a_q")].T @ lora[(block, "b_q")].T
        qkv[:, -32:] += x @ lora[(block, "a_v")].T @ lora[(block, "b_v")].T
        attention = merged.get_submodule(block)
        torch.testing.assert_close(attention(x), qkv)
    del state["model.image_encoder.blocks.0.attn.qkv.linear_b_v.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="WeSAM's LoRA of image_encoder.blocks.0.attn.qkv lacks"):
        build_sam("tiny", path, image_size=SIZE, tiny=TINY)


def test_unknown_variant_lists_choices_and_random_init_warns(caplog):
    with pytest.raises(ValueError, match="vit_b.*tiny"):
        build_sam("vit_s")
    with caplog.at_level(logging.WARNING):
        build_sam("tiny", image_size=32, tiny={"embed_dim": 16, "prompt_embed_dim": 16})
    assert sum("random init" in r.getMessage() for r in caplog.records) == 1
