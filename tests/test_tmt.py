"""TMT: SegFormer encoder and weight loading, ACTE region partition and transferability, the attention
bias (shape, effect, ablation equivalence), DAFormer self-training pieces, and runs end to end."""

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from datamodules.constants import IMAGENET_MEAN, IMAGENET_STD
from datamodules.errors import CheckpointError, ConfigError
from experiments.run import CONFIG_DIR
from lightning_modules.components.ops import upsample
from lightning_modules.components.self_training import (
    class_mix_masks,
    ema_momentum,
    pseudo_labels_with_quality,
    strong_photometric,
)
from lightning_modules.components.transferability import (
    guidance_map,
    initial_assignment,
    partition_descriptors,
    region_averaged,
    region_correctness,
    region_partition,
    region_transferability,
    semantic_uncertainty,
    transferability_attention_bias,
    transferability_map,
)
from lightning_modules.networks.segformer import EfficientSelfAttention, build_segformer, load_mit_pretrained
from lightning_modules.panels import panel_size
from tests.conftest import compose_config, method_module, run_ddp

TINY = yaml.safe_load((CONFIG_DIR / "network" / "segformer_tiny.yaml").read_text())


def purity(assignment: torch.Tensor, classes: torch.Tensor) -> bool:
    """True when every region's hard-assigned pixels all belong to one constructed class."""
    owner = assignment[0].argmax(0)
    return all(classes[owner == r].unique().numel() <= 1 for r in owner.unique())


def test_region_partition_follows_constructed_boundaries():
    torch.manual_seed(0)
    height, width = 16, 16
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    # Three regions whose borders cut through the 4 x 4 cells: x < 6, x >= 6 above y = 9, below it.
    classes = torch.where(xs < 6, 0, torch.where(ys < 9, 1, 2))
    prototypes = torch.eye(8)[:3] * 3
    features = prototypes[classes].permute(2, 0, 1)[None] + 0.05 * torch.randn(1, 8, height, width)
    colours = torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, -1, 1]])[classes].permute(2, 0, 1)[None]
    descriptors = partition_descriptors(features, colours, structure_weight=1.0)

    assert not purity(initial_assignment(height, width, 4)[None], classes.flatten())
    assignment = region_partition(descriptors, cell_size=4, iterations=3, kappa=10.0)
    assert assignment.shape == (1, 16, height * width)
    assert torch.allclose(assignment.sum(1), torch.ones(1, height * width))
    assert purity(assignment, classes.flatten())
    # The local window: a pixel never belongs to a cell two or more cells away.
    region = torch.arange(16)
    far = (((region // 4)[:, None] - (ys.flatten() // 4)[None]).abs() >= 2) | (
        ((region % 4)[:, None] - (xs.flatten() // 4)[None]).abs() >= 2
    )
    assert assignment[0][far].max() == 0


def test_transferability_is_domain_confusion_and_spreads_through_assignment():
    logits = torch.tensor([[0.0, 20.0, -20.0]])
    transferability = region_transferability(logits)
    assert torch.allclose(transferability, torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-4)
    hard = F.one_hot(torch.tensor([0, 0, 1, 2]), 3).T.float()[None]
    dense = transferability_map(hard, transferability, 2, 2)
    assert dense.shape == (1, 1, 2, 2)
    assert torch.allclose(dense.flatten(), torch.tensor([1.0, 1.0, 0.0, 0.0]), atol=1e-4)


def test_guidance_lowers_regions_of_low_transferability_or_high_uncertainty():
    # Four pixels in two regions: the first pair predicted with certainty, the second uniformly.
    logits = torch.tensor([[40.0, 40.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 3, 2, 2)
    uncertainty = semantic_uncertainty(logits)
    assert torch.allclose(uncertainty.flatten(), torch.tensor([0.0, 0.0, 1.0, 1.0]), atol=1e-4)
    # A soft assignment averages each region's pixels before spreading back: region 1 holds pixels 1-3.
    assignment = torch.tensor([[[1.0, 0.5, 0.0, 0.0], [0.0, 0.5, 1.0, 1.0]]])
    averaged = region_averaged(assignment, uncertainty)
    assert torch.allclose(averaged.flatten(), torch.tensor([0.0, 0.4, 0.8, 0.8]), atol=1e-4)
    transferability = torch.ones(1, 1, 2, 2)
    guidance = guidance_map(transferability, averaged, 1.0)
    # Equal transferability: the uncertain region gets the lower map, so the larger attention bias.
    assert torch.allclose(guidance.flatten(), torch.tensor([1.0, 0.6, 0.2, 0.2]), atol=1e-4)
    assert torch.equal(guidance_map(transferability, averaged, 0.0), transferability)


def test_region_correctness_uses_the_majority_of_labelled_pixels():
    assignment = F.one_hot(torch.tensor([0, 0, 0, 1, 1, 2]), 3).T.float()[None]
    prediction = torch.tensor([[1, 1, 2, 3, 0, 5]])
    label = torch.tensor([[1, 1, 0, 4, 255, 255]])
    labelled, correct = region_correctness(assignment, prediction, label, 255)
    assert labelled.tolist() == [[True, True, False]]
    assert correct[labelled].tolist() == [True, False]


def identity_attention(dim: int, sr_ratio: int = 1) -> EfficientSelfAttention:
    attention = EfficientSelfAttention(dim, 1, sr_ratio)
    with torch.no_grad():
        attention.kv.weight[dim:] = torch.eye(dim)
        attention.kv.bias.zero_()
        attention.proj.weight.copy_(torch.eye(dim))
        attention.proj.bias.zero_()
    return attention


def test_attention_bias_moves_attention_mass_to_low_transferability_tokens():
    torch.manual_seed(0)
    attention = identity_attention(dim=4)
    low = torch.zeros(4, 4)
    low[1:3, 0:2] = 1  # low-transferability region
    tokens = torch.randn(1, 16, 4)
    tokens[..., 0] = low.flatten()  # value channel 0 = membership, so output channel 0 = attention mass there
    transferability = (1 - low)[None, None]
    plain = attention(tokens, 4, 4)[..., 0]
    guided = attention(tokens, 4, 4, transferability_attention_bias(transferability, 2.0))[..., 0]
    assert (guided > plain + 1e-3).all()
    # A constant map leaves attention unchanged (softmax is shift invariant).
    constant = attention(tokens, 4, 4, torch.full((1, 1, 4, 4), -3.0))[..., 0]
    assert torch.allclose(constant, plain, atol=1e-6)
    # Spatial reduction: the map is pooled to the reduced key grid and still favours the region.
    reduced = identity_attention(dim=4, sr_ratio=2)
    assert reduced(tokens, 4, 4, transferability_attention_bias(transferability, 2.0)).shape == (1, 16, 4)


def test_guidance_off_or_zero_strength_gives_the_plain_encoder_logits():
    torch.manual_seed(0)
    segmenter = build_segformer(TINY, 19).eval()
    images = torch.randn(2, 3, 64, 128)
    transferability = torch.rand(2, 1, 16, 32)
    plain, _ = segmenter(images)
    zero, _ = segmenter(images, transferability_attention_bias(transferability, 0.0))
    guided, _ = segmenter(images, transferability_attention_bias(transferability, 1.0))
    unguided_stages, _ = segmenter(images, transferability_attention_bias(transferability, 1.0), guided_stages=())
    assert torch.allclose(zero, plain, atol=1e-6) and torch.equal(unguided_stages, plain)
    assert not torch.allclose(guided, plain, atol=1e-4)

    module = method_module("tmt", "synth2real", "method.transferability_guidance=false").eval()
    assert not hasattr(module, "discriminator")
    assert torch.equal(module(images), upsample(module.segmenter(images)[0], images.shape[-2:]))
    assert module.train().segmenter.training and not module.teacher.training


class StandardisedRegionScore(torch.nn.Module):
    """Domain logits [B, R] = 3 x the regions' first pooled feature, standardised over the regions of an image."""

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        first = pooled[..., 0]
        return 3 * (first - first.mean(1, keepdim=True)) / first.std(1, keepdim=True)


def test_guided_inference_decides_whether_the_map_guides_the_prediction():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 128)
    module = method_module("tmt", "synth2real").eval()
    # An untrained discriminator finds every region fully transferable (a uniform bias); this one is confident on
    # some regions and not on others.
    module.discriminator = StandardisedRegionScore()
    plain_logits = module.segmenter(images)[0]
    plain = upsample(plain_logits, images.shape[-2:])
    assert module.method["guided_inference"] is False
    logits, assignment, transferability, dense, guidance = module.guided_forward(images)
    # The plain pass predicts; the map is still estimated for the region metrics and the panels.
    assert torch.equal(logits, plain)
    assert assignment.shape[0] == 2 and transferability.shape == assignment.shape[:2]
    assert dense.std() > 0.01
    # The guidance is T less mu times the region-averaged uncertainty of the plain prediction.
    uncertainty = region_averaged(assignment, semantic_uncertainty(plain_logits))
    assert module.method["uncertainty_weight"] > 0 and uncertainty.std() > 0
    assert torch.allclose(guidance, dense - module.method["uncertainty_weight"] * uncertainty, atol=1e-6)
    module.method["guided_inference"] = True
    guided = module(images)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain, atol=1e-4)


def test_bf16_autocast_attention_with_bias():
    segmenter = build_segformer(TINY, 19).eval()
    bias = transferability_attention_bias(torch.rand(1, 1, 16, 32), 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = segmenter(torch.randn(1, 3, 64, 128), bias)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def mmseg_style(official: dict) -> dict:
    """mmseg's ``mit2mmseg`` renaming, written from its documented rules, to make a test checkpoint."""
    out = {}
    for key, value in official.items():
        stage = re.match(r"(patch_embed|block|norm)(\d)", key)
        index = int(stage[2]) - 1
        if key.startswith("patch_embed"):
            out[key.replace(f"patch_embed{index + 1}", f"layers.{index}.0").replace("proj.", "projection.")] = value
        elif key.startswith("block"):
            new = key.replace(f"block{index + 1}", f"layers.{index}.1")
            if "attn.q." in new:
                out[new.replace("q.", "attn.in_proj_")] = torch.cat([value, official[key.replace("q.", "kv.")]])
            elif "attn.kv." in new:
                continue
            elif "attn.proj." in new:
                out[new.replace("proj.", "attn.out_proj.")] = value
            elif "mlp." in new:
                if "fc1.weight" in new or "fc2.weight" in new:
                    value = value[..., None, None]
                new = new.replace("mlp.", "ffn.layers.").replace("fc1.", "0.").replace("dwconv.dwconv.", "1.")
                out[new.replace("fc2.", "4.")] = value
            else:
                out[new] = value
        else:
            out[key.replace(f"norm{index + 1}", f"layers.{index}.2")] = value
    return out


@pytest.mark.parametrize("layout", ["official", "data-parallel", "mmseg"])
def test_pretrained_mit_weights_load_by_key_mapping(tmp_path, layout):
    torch.manual_seed(0)
    source = build_segformer(TINY, 19).backbone
    state = copy.deepcopy(source.state_dict())
    if layout == "official":
        saved = {"state_dict": {**state, "head.weight": torch.zeros(1000, 128)}}
    elif layout == "data-parallel":
        saved = {"model": {f"module.{k}": v for k, v in state.items()}}
    else:
        saved = {"state_dict": {f"backbone.{k}": v for k, v in mmseg_style(state).items()}}
    torch.save(saved, tmp_path / "mit.pth")
    target = build_segformer(TINY, 19).backbone
    load_mit_pretrained(target, str(tmp_path / "mit.pth"))
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_pretrained_errors_name_the_problem(tmp_path):
    backbone = build_segformer(TINY, 19).backbone
    with pytest.raises(CheckpointError, match="model.pretrained="):
        load_mit_pretrained(backbone, str(tmp_path / "missing.pth"))
    torch.save({"block1.0.norm1.weight": torch.ones(16)}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing"):
        load_mit_pretrained(backbone, str(tmp_path / "partial.pth"))
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "partial.pth").read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"truncated.pth cannot be read as a torch weight file"):
        load_mit_pretrained(backbone, str(tmp_path / "truncated.pth"))


def test_pseudo_label_quality_and_ema_schedule():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = 10.0  # one confident pixel of four
    labels, quality = pseudo_labels_with_quality(logits, 0.968)
    assert labels[0, 0, 0] == 1 and quality.item() == pytest.approx(0.25)
    assert ema_momentum(0, 0.999) == 0 and ema_momentum(9, 0.999) == pytest.approx(0.9)
    assert ema_momentum(10**6, 0.999) == 0.999


def test_class_mix_takes_whole_classes_half_of_those_present():
    torch.manual_seed(0)
    labels = torch.tensor([[0, 0, 2, 2, 5, 5, 7, 255]]).reshape(1, 2, 4)
    mask = class_mix_masks(labels)
    chosen = labels[mask.bool()].unique()
    assert len(chosen) == 2 and 255 not in chosen.tolist()
    for c in chosen:
        assert mask[labels == c].all()
    assert mask[labels == 255].sum() == 0


def test_strong_photometric_keeps_shape_and_changes_images():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    out = strong_photometric(images, 1.0, 0.2, 1.0, (0.15, 1.15))
    assert out.shape == images.shape and not torch.allclose(out, images)
    valid = (torch.rand(4, 3, 32, 32) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[
        :, None, None
    ]
    assert torch.allclose(strong_photometric(valid, 0.0, 0.2, 0.0, (0.15, 1.15)), valid, atol=1e-5)


def test_source_only_trains_a_segformer():
    cfg = compose_config("source_only", "synth2real", "unused", "arch=segformer")
    assert cfg.model.builder == "lightning_modules.networks.segformer.build_segformer"


def test_tmt_end_to_end_draws_its_maps_and_region_transferability(run_tiny):
    results, run_dir = run_tiny(
        "tmt", "synth2real", "trainer.max_steps=2", "logger.panels.images=2", "trainer.log_every_n_steps=1"
    )
    assert 0 <= results["metrics"]["mIoU"] <= 100
    # Two 64 x 128 images: image | ground truth | prediction | pseudo-label | transferability | attention mask.
    panel = Image.open(run_dir / "predictions" / "step_000002.png")
    assert panel.size == panel_size(6, 2, 64, 128)
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    for name in (
        "val/transferability_correct_regions",
        "val/transferability_incorrect_regions",
        "train/loss_domain",
        "train/pseudo_quality",
        "train/loss_feature_distance",
        "train/feature_distance_cells",
    ):
        assert name in header
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("teacher.") for k in state) and any(k.startswith("discriminator.") for k in state)


def test_tmt_bf16_mixed_run(run_tiny):
    results, _ = run_tiny(
        "tmt", "synth2real", "trainer.precision=bf16-mixed", "trainer.max_steps=2", "data.val.options.length=2"
    )
    assert results["metrics"]["mIoU"] >= 0


def test_tmt_two_process_ddp_run(tmp_path):
    result = run_ddp(
        "tmt", "synth2real", tmp_path, "data.source.options.length=8", "data.target.options.length=8",
        "data.val.options.length=5", "data.batch_size=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["global_step"] == 2
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    # Both ranks ran the EMA teacher, the region discriminator and the synced region metrics to the end.
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/transferability_correct_regions" in header
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("teacher."))


def test_a_guided_stage_the_encoder_lacks_is_refused():
    """Stage 7 of a 4-stage MiT would guide nothing, silently."""
    with pytest.raises(ConfigError, match=r"method.guided_stages=\[2, 7\]; the encoder's stages are \[0, 1, 2, 3\]"):
        method_module("tmt", "synth2real", "method.guided_stages=[2,7]")
