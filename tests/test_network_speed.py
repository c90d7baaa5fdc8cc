"""The SegFormer network against its references: the DAFormer head does exactly the FLOPs of DAFormer's
``daformer_sepaspp`` head, and the MiT encoder has HuggingFace's parameter count."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.network_speed import SIZES, daformer_head_flops, measure, network_config
from lightning_modules.networks.segformer import DAFormerHead, build_segformer


def test_reference_head_flops_by_hand():
    # one 8-channel level at stride 4 of a 16 x 16 image (a 4 x 4 grid), 4-d embedding, dilations 1 and 2, 3 classes
    grid = 16
    embed, aspp = 8 * 4 * grid, (8 * 4 * 0 + 4 * 4 + (4 * 9 + 4 * 4)) * grid  # fused width = 4 (one level)
    bottleneck, classifier = 2 * 4 * 4 * 9 * grid, 4 * 3 * grid
    assert daformer_head_flops([8], 4, [1, 2], 3, 16, 16) == 2 * (embed + aspp + bottleneck + classifier)


@pytest.mark.parametrize("size", ["b0", "b5"])
def test_daformer_head_does_the_reference_heads_flops(size):
    channels = SIZES[size]["embed_dims"]
    head = DAFormerHead(channels, 256, (1, 6, 12, 18), 19).eval()
    features = [torch.zeros(1, c, 128 // s, 128 // s) for c, s in zip(channels, (4, 8, 16, 32))]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        head(features)
    assert counter.get_total_flops() == daformer_head_flops(channels, 256, (1, 6, 12, 18), 19, 128, 128)


def test_mit_encoder_has_huggingfaces_parameter_count():
    transformers = pytest.importorskip("transformers")
    ours = build_segformer(network_config("b0"), 19).backbone
    reference = transformers.SegformerModel(
        transformers.SegformerConfig(
            hidden_sizes=SIZES["b0"]["embed_dims"],
            depths=SIZES["b0"]["depths"],
            num_attention_heads=[1, 2, 5, 8],
            sr_ratios=[8, 4, 2, 1],
        )
    )
    # HuggingFace keeps key and value apart where MiT fuses them (kv): compare the counts, not the tensors
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_measure_reports_flops_steps_and_memory_at_a_small_crop():
    row = measure("project", "b0", crop=64, steps=1)
    assert row["head_gflops"] == pytest.approx(row["reference_head_gflops"])
    assert row["gflops"] > row["head_gflops"] > 0
    assert row["step_fp32_s"] > 0 and row["step_bf16_s"] > 0 and row["step_memory_mb"] >= 0
