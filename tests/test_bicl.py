"""BiCL: prototype and contrast math on constructed features, pseudo-label rules on constructed
similarities, memories in checkpoints, ablation switches, a tiny run, bf16 and two-process DDP."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.constants import IGNORE_INDEX as IGN
from datamodules.datasets.base import read_label
from datamodules.errors import ConfigError
from experiments.run import execute
from lightning_modules.components.losses import pixel_entropy
from lightning_modules.components.ops import pixels
from lightning_modules.components.prototypes import (
    batch_prototypes,
    calibrated_source_prototypes,
    calibration,
    class_balanced_thresholds,
    class_top_fraction_thresholds,
    confidence_histogram,
    dynamic_pseudo_labels,
    ema_prototype_memory,
    hybrid_pseudo_labels,
    image_prototypes,
    paired_prototype_contrast_loss,
    prototype_contrast_loss,
    static_pseudo_labels,
    union_static_labels,
)
from lightning_modules.optim import poly_lr_lambda
from lightning_modules.panels import panel_size
from tests.conftest import compose_config, method_module, run_ddp

FAST = [
    "data.source.options.length=8",
    "data.target.options.length=8",
    "data.val.options.length=2",
    "data.batch_size=4",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
]


def test_batch_prototypes_are_masked_means_and_mark_absent_classes():
    features = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 2, IGN])
    prototypes, present = batch_prototypes(features, labels, num_classes=3)
    assert torch.allclose(prototypes[0], torch.tensor([2.0, 1.0]))
    assert torch.allclose(prototypes[2], torch.tensor([0.0, 4.0]))
    assert present.tolist() == [True, False, True]


def test_contrast_loss_has_the_closed_form_value_and_skips_classes_without_prototype():
    prototypes = torch.eye(3)
    present = torch.tensor([True, True, False])
    features = torch.eye(3)  # each pixel sits on its class prototype; class 2 has no prototype
    labels = torch.tensor([0, 1, 2])
    tau = 0.5
    # two pixels with a positive; the softmax runs over classes 0 and 1 only: similarities 1 and 0.
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0.0)))
    loss = prototype_contrast_loss(features, labels, prototypes, present, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_contrast_loss_pulls_pixels_to_their_class_prototype():
    prototypes = torch.eye(2)
    present = torch.tensor([True, True])
    labels = torch.tensor([0])
    aligned = prototype_contrast_loss(torch.tensor([[1.0, 0.1]]), labels, prototypes, present, 0.1)
    wrong = prototype_contrast_loss(torch.tensor([[0.1, 1.0]]), labels, prototypes, present, 0.1)
    assert aligned < wrong
    features = torch.tensor([[0.6, 0.8]], requires_grad=True)
    prototype_contrast_loss(features, labels, prototypes, present, 0.1).backward()
    assert features.grad[0, 0] < 0 < features.grad[0, 1]  # descent moves f towards prototype 0


def test_contrast_math_stays_float32_under_bf16_autocast():
    features = torch.randn(16, 8).bfloat16()
    labels = torch.randint(0, 3, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prototypes, present = batch_prototypes(features, labels, 3)
        loss = prototype_contrast_loss(features, labels, prototypes, present, 0.1)
    assert prototypes.dtype == torch.float32 and loss.dtype == torch.float32


def test_memory_ema_copies_first_prototype_then_mixes_with_lambda():
    memory = torch.zeros(3, 2)
    seen = torch.zeros(3, dtype=torch.bool)
    first = torch.tensor([[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    memory, seen = ema_prototype_memory(memory, seen, first, torch.tensor([True, True, False]), 0.9)
    assert torch.equal(memory[:2], first[:2]) and torch.equal(memory[2], torch.zeros(2))
    assert seen.tolist() == [True, True, False]
    second = torch.tensor([[11.0, 11.0], [0.0, 0.0], [0.0, 0.0]])
    memory, seen = ema_prototype_memory(memory, seen, second, torch.tensor([True, False, False]), 0.9)
    assert torch.allclose(memory[0], torch.tensor([2.0, 2.0]))  # 0.9 * 1 + 0.1 * 11
    assert torch.equal(memory[1], first[1])


def test_calibration_shifts_source_prototypes_by_the_memory_gap():
    memory_target = torch.tensor([[3.0, 1.0], [7.0, 7.0]])
    memory_source = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    xi = calibration(memory_target, memory_source, torch.tensor([True, False]), torch.tensor([True, True]))
    assert torch.equal(xi, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(calibrated_source_prototypes(torch.ones(2, 2), xi), torch.tensor([[3.0, 1.0], [1.0, 1.0]]))


def test_dynamic_labels_need_the_argmax_class_above_threshold():
    prototypes = torch.eye(3)
    available = torch.tensor([True, True, False])
    angle = math.radians(20)  # cos 20deg = 0.94 to prototype 0
    features = torch.tensor(
        [
            [math.cos(angle), math.sin(angle), 0.0],  # argmax 0, similarity 0.94 > T
            [0.6, 0.8, 0.0],  # argmax 1, similarity 0.8 not > T
            [0.0, 0.1, 1.0],  # nearest is class 2, which has no prototype
        ]
    )
    labels = dynamic_pseudo_labels(features, prototypes, available, threshold=0.8)
    assert labels.tolist() == [0, IGN, IGN]
    assert dynamic_pseudo_labels(features, prototypes, torch.ones(3, dtype=torch.bool), 0.8).tolist() == [0, IGN, 2]


def test_hybrid_labels_prefer_dynamic_then_static():
    dynamic = torch.tensor([1, IGN, IGN, 2])
    static = torch.tensor([0, 3, IGN, IGN])
    assert hybrid_pseudo_labels(dynamic, static).tolist() == [1, 3, IGN, 2]


def test_class_balanced_thresholds_keep_the_top_proportion_of_each_class():
    # 10 pixels predicted class 0 with confidences 0.50..0.95; 1 pixel class 1 at 0.6; class 2 never.
    confidences = torch.tensor([0.5 + 0.05 * i for i in range(10)] + [0.6])
    predicted = torch.tensor([0] * 10 + [1])
    probabilities = torch.zeros(11, 3)
    probabilities[torch.arange(11), predicted] = confidences
    probabilities[torch.arange(11), (predicted + 1) % 3] = 1 - confidences
    histogram = confidence_histogram(probabilities, bins=100)
    thresholds = class_balanced_thresholds(histogram, proportion=0.2)
    assert thresholds[0].item() == pytest.approx(0.90)  # the top 2 of 10: 0.90 and 0.95
    assert thresholds[1].item() == pytest.approx(0.60)
    assert math.isinf(thresholds[2].item())
    labels = static_pseudo_labels(probabilities, thresholds)
    assert labels.tolist() == [IGN] * 8 + [0, 0, 1]


def test_class_thresholds_are_the_kth_highest_confidence_of_each_class():
    # Class 0: 10 sampled pixels 0.50..0.95; class 1: 3 pixels; class 2 never predicted.
    confidence = torch.tensor([0.5 + 0.05 * i for i in range(10)] + [0.7, 0.6, 0.8])
    label = torch.tensor([0] * 10 + [1] * 3)
    one_class = torch.zeros(13, dtype=torch.long)
    thresholds = class_top_fraction_thresholds(confidence[torch.randperm(13)], one_class, 3, 0.2)
    assert thresholds[0].item() == pytest.approx(0.90)  # shuffled, one class: the 2nd highest of 13 = 0.90
    thresholds = class_top_fraction_thresholds(confidence, label, 3, 0.2)
    assert thresholds[0].item() == pytest.approx(0.90)  # top 2 of 10
    assert thresholds[1].item() == pytest.approx(0.80)  # int(0.6) = 0 rounds up to the single highest
    assert math.isinf(thresholds[2].item())


def test_union_rule_labels_class_thresholds_or_the_images_own_top_fraction():
    # One 2 x 5 image, 2 classes; probabilities of class 0 per pixel (class 1 gets the rest).
    p0 = torch.tensor([[0.99, 0.95, 0.90, 0.60, 0.55], [0.30, 0.20, 0.45, 0.40, 0.52]])
    probabilities = torch.stack([p0, 1 - p0]).unsqueeze(0)
    thresholds = torch.tensor([0.95, 0.79])
    # Class-wise: class 0 pixels at >= 0.95 (two), class 1 pixels at >= 0.79 (0.80 only: p0 = 0.20).
    # Image top 20% (k = int(0.2 x 10) = 2): strictly above the 2nd highest confidence 0.95: only the 0.99 pixel.
    labels = union_static_labels(probabilities, thresholds, 0.2, "argmax")[0]
    assert labels.tolist() == [[0, 0, IGN, IGN, IGN], [IGN, 1, IGN, IGN, IGN]]
    # A higher per-image share adds the image's next most confident pixels whatever their class: at 50% (k = 5)
    # those strictly above the 5th highest confidence 0.70 (0.99, 0.95, 0.90, 0.80), the 0.70 pixel itself not.
    labels = union_static_labels(probabilities, thresholds, 0.5, "argmax")[0]
    assert labels.tolist() == [[0, 0, 0, IGN, IGN], [IGN, 1, IGN, IGN, IGN]]
    # any_class (the authors' code): a pixel passes when any class reaches its own threshold; class 1's 0.79
    # is reached by no pixel's class-1 probability other than 0.80, so only a lower class-1 threshold shows it:
    # at 0.45, the pixel with p0 = 0.55 (argmax 0, p1 = 0.45) passes through class 1 and takes the argmax 0.
    low = torch.tensor([0.95, 0.45])
    any_class = union_static_labels(probabilities, low, 0.1, "any_class")[0]
    argmax = union_static_labels(probabilities, low, 0.1, "argmax")[0]
    assert any_class[0, 4].item() == 0 and argmax[0, 4].item() == IGN


def test_offline_static_labels_refuse_more_than_one_round_and_the_wrong_stream(source_ckpt, tmp_path):
    def build(*overrides):
        return method_module("bicl", "synth2real", f"method.source_ckpt={source_ckpt}", *overrides, run_dir=tmp_path)

    with pytest.raises(ConfigError, match=r"trainer.max_steps=20 is more than one self-training round"):
        build("method.round_steps=10", "trainer.max_steps=20")
    with pytest.raises(ConfigError, match=r"static_labels=offline trains on the 'pl' stream.*expected \[src, pl\]"):
        build("method.streams=[src,tgt]")
    assert not build("method.static_labels=online", "method.streams=[src,tgt]").offline


def test_static_label_stage_resumes_and_refuses_labels_of_another_labeler(run_tiny, source_ckpt, tmp_path):
    stage = ("stage=static_labels", "data.target.options.length=8", "data.batch_size=4")
    results, run_dir = run_tiny("bicl", "synth2real", *stage, f"method.source_ckpt={source_ckpt}", name="labels")
    label_dir = run_dir / "static_labels"
    files = sorted(label_dir.glob("*.png"))
    assert len(files) == 8 and 0 < results["density"] <= 100 and 0 <= results["accuracy"] <= 100
    # A stage killed in its labelling pass: one label and the results missing. The rerun writes that label again,
    # identical, and leaves the others as they were.
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    files[3].unlink()
    (label_dir / "static_label_results.json").unlink()
    again, _ = run_tiny("bicl", "synth2real", *stage, f"method.source_ckpt={source_ckpt}", name="labels")
    assert again == results
    after = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(label_dir.glob("*.png"))}
    assert after == {**before, files[3].name: (before[files[3].name][0], after[files[3].name][1])}
    assert all(after[name] == before[name] for name in before if name != files[3].name)
    # Labels of another labeler in that folder are refused, naming the folder and what differs.
    other = tmp_path / "other.ckpt"
    other.write_bytes(Path(source_ckpt).read_bytes() + b"x")
    with pytest.raises(ConfigError, match=rf"method.label_dir={label_dir} holds labels made with a different labeler"):
        run_tiny("bicl", "synth2real", *stage, f"method.source_ckpt={other}", name="labels")


def test_rounds_run_as_separate_runs_continue_the_halving_schedule():
    # Round 2 as its own run: step 0 at a quarter of the rate, the poly restarted.
    factor = poly_lr_lambda(10000, 0.9, 0, round_steps=10000, first_round=2)
    assert factor(0) == 0.25 and factor(5000) == pytest.approx(0.25 * (1 - 5000 / 12000) ** 0.9)


def read_metrics(run_dir):
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}


def test_aspp_contrast_features_are_the_concatenated_branch_logits(source_ckpt):
    module = method_module(
        "bicl", "synth2real", f"method.source_ckpt={source_ckpt}", "method.contrast_features=aspp"
    ).eval()
    images = torch.randn(2, 3, 32, 64)
    logits, features = module.embed(images)
    segmenter_logits, backbone_features = module.segmenter(images)
    branches = module.segmenter.classifier.branch_logits(backbone_features)
    assert module.projector is None and module.memory_source.shape == (19, 4 * 19)
    assert torch.allclose(logits, segmenter_logits, atol=1e-5)
    assert torch.allclose(features, F.normalize(pixels(branches), dim=1), atol=1e-5) and features.shape[1] == 76
    with pytest.raises(ValueError, match="method.contrast_features='pooled'"):
        method_module("bicl", "synth2real", "method.contrast_features=pooled")


def test_entropy_readings_on_constructed_logits():
    uniform, peaked = torch.zeros(1, 4, 2, 2), torch.tensor([20.0, 0, 0, 0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    assert pixel_entropy(uniform).item() == pytest.approx(math.log(4), rel=1e-5)
    assert pixel_entropy(peaked).item() < 1e-6
    # The public code's function: -sum p log softmax(p); at p uniform (1/4 each) softmax(p) is uniform too.
    assert pixel_entropy(uniform, "code").item() == pytest.approx(math.log(4), rel=1e-5)
    p = torch.tensor([1.0, 0, 0, 0])
    assert pixel_entropy(peaked, "code").item() == pytest.approx(-(p * p.log_softmax(0)).sum().item(), rel=1e-4)


def test_running_without_a_source_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(SystemExit, match=r"set method.source_ckpt=PATH.*\+method=source_only \+task=synth2real"):
        execute(compose_config("bicl", "synth2real", tmp_path))


def test_tiny_run_logs_pseudo_label_quality_and_checkpoints_memories(run_tiny, source_ckpt):
    results, run_dir = run_tiny("bicl", "synth2real", *FAST, f"method.source_ckpt={source_ckpt}")
    assert 0 <= results["metrics"]["mIoU"] <= 100
    metrics = read_metrics(run_dir)
    for kind in ("static", "dynamic_uncalibrated", "dynamic", "hybrid"):
        assert 0 <= metrics[f"val/pseudo_labels/{kind}_density"] <= 100
        assert 0 <= metrics[f"val/pseudo_labels/{kind}_accuracy"] <= 100
        # results.json keeps the final evaluation's (test) quality of every rule: the benchmark's Table 4
        quality = results["pseudo_labels"][kind]
        assert quality["density"] == pytest.approx(metrics[f"test/pseudo_labels/{kind}_density"], abs=1e-3)
        assert quality["accuracy"] == pytest.approx(metrics[f"test/pseudo_labels/{kind}_accuracy"], abs=1e-3)
    # y_T falls back to y_F wherever y_D is absent, so it labels at least what either labels
    hybrid = results["pseudo_labels"]["hybrid"]["density"]
    assert hybrid >= max(results["pseudo_labels"][kind]["density"] for kind in ("static", "dynamic")) - 1e-6
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    # The official contrast features by default: the 4 ASPP branches' logits, 4 x 19 = 76-d, no projection head.
    assert state["memory_source_seen"].any() and state["memory_target"].shape == (19, 76)
    assert state["memory_source"].abs().sum() > 0
    # Offline static labels by default: the round's labels were written before training, one per target image,
    # at the image's size, and the thresholds the run used are those of the file.
    labels = sorted((run_dir / "static_labels").glob("*.png"))
    assert len(labels) == 8 and read_label(labels[0]).shape == (64, 128)
    written = json.loads((run_dir / "static_labels" / "thresholds.json").read_text())
    assert [math.inf if t is None else t for t in written] == state["static_thresholds"].tolist()
    assert not any(k.startswith("projector.") for k in state)
    # The 2 val images (64 x 128): image | ground truth | prediction | pseudo-label.
    assert Image.open(run_dir / "predictions" / "step_000002.png").size == panel_size(4, 2, 64, 128)


def test_base_ablation_freezes_the_projection_and_bf16_run_works(run_tiny, source_ckpt):
    results, run_dir = run_tiny(
        "bicl",
        "synth2real",
        *FAST,
        f"method.source_ckpt={source_ckpt}",
        "trainer.precision=bf16-mixed",
        "method.use_fc=false",
        "method.use_bc=false",
        "method.use_dynamic=false",
        "method.entropy=code",
        "method.contrast_features=projection",
        "trainer.log_every_n_steps=1",
    )
    assert results["metrics"]["mIoU"] >= 0
    metrics = read_metrics(run_dir)
    assert "train/loss_fc" not in metrics and "train/loss_bc" not in metrics and "train/loss_entropy" in metrics
    assert math.isfinite(metrics["val/mIoU"])


def test_two_process_ddp_ranks_hold_identical_memories(tmp_path, source_ckpt):
    result = run_ddp(
        "bicl", "synth2real", tmp_path, "data.source.options.length=8", "data.target.options.length=8",
        "data.val.options.length=4", "data.batch_size=2", f"method.source_ckpt={source_ckpt}", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics["val/memory_rank_spread"] == 0.0
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state["memory_target_seen"].any() and state["memory_source"].abs().sum() > 0


def test_image_pairing_contrasts_each_pixel_with_its_paired_image_prototypes():
    torch.manual_seed(0)
    features = torch.randn(12, 4)
    labels = torch.tensor([0, 0, 1, 1, IGN, 2, 0, 1, 1, 1, IGN, IGN])  # image 1 has no class 2
    prototypes, present = image_prototypes(features, labels, 3, 2)
    assert torch.allclose(prototypes[0, 0], features[:2].mean(0)) and torch.allclose(
        prototypes[1, 1], features[7:10].mean(0)
    )
    assert present.tolist() == [[True, True, True], [True, True, False]]
    # Other-domain pixels of pair b see only pair b's prototypes; the loss is the mean of the pairs' own losses.
    others = torch.randn(12, 4)
    other_labels = torch.tensor([2, 2, 0, 1, 1, 0, 2, 0, 0, 1, 1, IGN])
    paired = paired_prototype_contrast_loss(others, other_labels, prototypes, present, 0.1)
    per_pair = [
        prototype_contrast_loss(
            others[6 * b : 6 * b + 6], other_labels[6 * b : 6 * b + 6], prototypes[b], present[b], 0.1
        )
        for b in range(2)
    ]
    assert paired.item() == pytest.approx(sum(per_pair).item() / 2, rel=1e-5)
    # Batch prototypes mix both images: a different loss.
    pooled, pooled_present = batch_prototypes(features, labels, 3)
    assert prototype_contrast_loss(others, other_labels, pooled, pooled_present, 0.1).item() != pytest.approx(
        paired.item()
    )


def test_round_schedule_restarts_the_poly_each_round_at_half_the_rate():
    factor = poly_lr_lambda(30000, 0.9, 0, round_steps=10000)
    assert factor(0) == 1.0 and factor(10000) == 0.5 and factor(20000) == 0.25
    # Within a round the poly runs over 1.2 x its length, so it has not reached 0 at the round's end.
    assert factor(9999) == pytest.approx((1 - 9999 / 12000) ** 0.9)
    assert factor(15000) == pytest.approx(0.5 * (1 - 5000 / 12000) ** 0.9)
    # Without rounds: one poly over the run.
    assert poly_lr_lambda(30000, 0.9, 0)(15000) == pytest.approx(0.5**0.9)
