"""mt_metric (STvM): reliability weighting and metric loss on constructed inputs, the EMA teacher, the
source-free contract, and tiny end-to-end runs (fp32, bf16, two-process DDP)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import datamodules.build
import datamodules.uda
import lightning_modules.mt_metric
from datamodules.constants import IMAGENET_MEAN, IMAGENET_STD
from experiments.run import check_compatibility
from lightning_modules.components.metric_learning import (
    class_normalised_weight,
    confidence_threshold_weight,
    correctness_histograms,
    histogram_auc,
    normalised_softmax_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    proxy_similarity,
    reliability_weight,
    thresholded,
    weighted_cross_entropy,
)
from lightning_modules.components.ops import class_means
from lightning_modules.components.self_training import class_mix_masks
from lightning_modules.mt_metric import MTMetric, TeacherTargets
from lightning_modules.networks.heads import MetricHead
from lightning_modules.panels import panel_size
from tests.conftest import compose_config, method_module, run_ddp


def build_module(source_ckpt, *overrides) -> MTMetric:
    return method_module("mt_metric", "synth2real", f"method.source_ckpt={source_ckpt}", *overrides)


def test_reliability_weight_is_the_proxy_posterior_of_the_pseudo_class():
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Three pixels, all pseudo-labelled class 0: on its proxy, half-way, on the other proxy.
    embeddings = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]).view(1, 2, 1, 3)
    similarity = proxy_similarity(embeddings, proxies)
    assert torch.allclose(similarity[0, :, 0], torch.tensor([[1.0, math.sqrt(0.5), 0.0], [0.0, math.sqrt(0.5), 1.0]]))
    weight = reliability_weight(similarity, torch.zeros(1, 1, 3, dtype=torch.long), scale=32.0)
    expected = torch.tensor([1 / (1 + math.exp(-32)), 0.5, 1 / (1 + math.exp(32))])
    assert torch.allclose(weight[0, 0], expected, atol=1e-6)
    # Relative, not absolute: the same pixel weighs less when another proxy is as close.
    crowded = reliability_weight(
        proxy_similarity(embeddings, torch.tensor([[1.0, 0.0], [1.0, 0.01]])),
        torch.zeros(1, 1, 3, dtype=torch.long),
        scale=32.0,
    )
    assert crowded[0, 0, 0] < 0.51 < weight[0, 0, 0]


def test_class_normalised_weight_ranks_pixels_within_their_class():
    weight = torch.tensor([[[0.2, 0.4, 0.9, 0.9, 0.6]]])
    pseudo_label = torch.tensor([[[0, 0, 2, 2, 2]]])
    normalised = class_normalised_weight(weight, pseudo_label, num_classes=3)
    assert torch.allclose(normalised, torch.tensor([[[2 / 3, 4 / 3, 9 / 8, 9 / 8, 6 / 8]]]))
    # Every pseudo-class now weighs 1 on average: a class with low reliabilities is not trained less as a whole.
    assert torch.allclose(
        class_means(normalised.flatten(1), pseudo_label.flatten(1), 3), torch.tensor([[1.0, 0.0, 1.0]])
    )


def test_softmax_proxy_losses_match_their_formulas():
    similarity = torch.tensor([0.5, -0.2, 0.1]).view(1, 3, 1, 1)
    label = torch.zeros(1, 1, 1, dtype=torch.long)
    logits = 16 * torch.tensor([0.5, -0.2, 0.1])
    assert normalised_softmax_loss(similarity, label, 16).item() == pytest.approx(
        (logits.logsumexp(0) - logits[0]).item(), abs=1e-5
    )
    # Proxy-NCA leaves the positive out of the denominator.
    assert proxy_nca_loss(similarity, label, 16).item() == pytest.approx(
        (logits[1:].logsumexp(0) - logits[0]).item(), abs=1e-5
    )


@pytest.mark.parametrize("loss", ["proxy_anchor", "normalised_softmax", "proxy_nca"])
def test_proxy_losses_pull_pixels_to_their_proxy(loss):
    torch.manual_seed(0)
    head = MetricHead(in_channels=3, num_classes=3, hidden_dim=8, embedding_dim=5)
    labels = torch.randint(0, 3, (2, 3, 3))
    features = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() + 0.1 * torch.randn(2, 3, 3, 3)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)
    losses = {
        "proxy_anchor": lambda similarity: proxy_anchor_loss(similarity, labels, alpha=32.0, delta=0.1),
        "normalised_softmax": lambda similarity: normalised_softmax_loss(similarity, labels, 16.0),
        "proxy_nca": lambda similarity: proxy_nca_loss(similarity, labels, 16.0),
    }

    def margin():  # similarity to the own proxy minus the closest other proxy
        similarity = head(features).detach()
        own = similarity.gather(1, labels.unsqueeze(1))
        return (own - similarity.scatter(1, labels.unsqueeze(1), -2.0).max(1, keepdim=True).values).mean()

    before = margin()
    for _ in range(30):
        optimizer.zero_grad()
        losses[loss](head(features)).backward()
        optimizer.step()
    assert margin() > before + 0.1


def test_proxy_anchor_loss_matches_its_formula():
    similarity = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    loss = proxy_anchor_loss(similarity, torch.zeros(1, 1, 1, dtype=torch.long), alpha=32.0, delta=0.1)
    positive = math.log1p(math.exp(-32 * (1.0 - 0.1)))  # class 0: the one proxy with a positive
    negative = (0.0 + math.log1p(math.exp(32 * (0.0 + 0.1)))) / 2  # class 0 has no negative, class 1 one
    assert loss.item() == pytest.approx(positive + negative, rel=1e-5)


def test_threshold_weight_and_weighted_loss_ignore_what_weighs_nothing():
    probabilities = torch.tensor([[0.95, 0.6], [0.05, 0.4]]).view(1, 2, 1, 2)
    weight = confidence_threshold_weight(probabilities, threshold=0.9)
    assert weight.tolist() == [[[1.0, 0.0]]]
    logits = torch.randn(1, 2, 1, 2, requires_grad=True)
    weighted_cross_entropy(logits, torch.zeros(1, 1, 2, dtype=torch.long), weight).backward()
    assert logits.grad[..., 1].abs().sum() == 0 and logits.grad[..., 0].abs().sum() > 0


def test_running_without_a_source_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(
        SystemExit,
        match=r"set method.source_ckpt=PATH.*python -m experiments.run "
        r"\+method=source_only \+task=synth2real",
    ):
        check_compatibility(compose_config("mt_metric", "synth2real", tmp_path))


def test_teacher_is_the_ema_of_the_student_and_the_weighting_switch(source_ckpt):
    module = build_module(source_ckpt)
    momentum = module.hparams["method"]["ema_momentum"]
    assert isinstance(module.metric_head, MetricHead)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    with torch.no_grad():
        for p in module.segmenter.parameters():
            p.add_(1.0)
    module.on_train_batch_end(None, None, 0)
    for before, teacher, student in zip(teacher_before, module.teacher.parameters(), module.segmenter.parameters()):
        assert torch.allclose(teacher, momentum * before + (1 - momentum) * student)
    assert module.train().teacher.training is False

    assert build_module(source_ckpt, "method.weighting=threshold").metric_head is None
    unweighted = build_module(source_ckpt, "method.weighting=uniform")
    assert unweighted.metric_head is None
    assert (unweighted.teacher_targets(torch.randn(2, 3, 32, 64)).weight == 1).all()
    with pytest.raises(ValueError, match="method.weighting='entropy'"):
        build_module(source_ckpt, "method.weighting=entropy")


def test_adapts_from_target_images_only_and_reports_weight_by_correctness(run_tiny, source_ckpt, monkeypatch):
    built_specs, datamodules_built = [], []
    build_from_spec, build_datamodule = datamodules.uda.build_from_spec, datamodules.build.build_datamodule

    def spy_build_from_spec(spec, default_split):
        built_specs.append((spec.get("split", default_split), (spec.get("options") or {}).get("domain")))
        return build_from_spec(spec, default_split)

    def spy_build_datamodule(cfg):
        datamodules_built.append(build_datamodule(cfg))
        return datamodules_built[-1]

    monkeypatch.setattr(datamodules.uda, "build_from_spec", spy_build_from_spec)
    monkeypatch.setattr(datamodules.build, "build_datamodule", spy_build_datamodule)
    results, run_dir = run_tiny(
        "mt_metric", "synth2real", f"method.source_ckpt={source_ckpt}", "trainer.log_every_n_steps=1"
    )

    assert set(datamodules_built[0].train_sets) == {"tgt"}
    assert ("train", "real") in built_specs and all(domain == "real" for _, domain in built_specs)
    weights = results["pixel_weight"]
    accuracy = weights["pseudo_label_accuracy"]
    assert 0 < accuracy < 1 and weights["weight_incorrect"] > 0 and weights["weight_correct"] > 0
    # Class-normalised weights average 1 over every batch, hence over the whole val set.
    assert accuracy * weights["weight_correct"] + (1 - accuracy) * weights["weight_incorrect"] == pytest.approx(
        1, abs=1e-3
    )
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert "metric_head.proxies" in state and any(k.startswith("teacher.") for k in state)
    assert not torch.equal(
        state["teacher.classifier.branches.0.weight"], state["segmenter.classifier.branches.0.weight"]
    )
    metrics = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert all(key in metrics for key in ("train/pixel_weight", "train/metric_loss", "val/weight_correct"))
    # image | ground truth | prediction | pseudo-label | weight, for the first val batch (4 images of 64 x 128).
    assert Image.open(run_dir / "predictions" / "step_000004.png").size == panel_size(5, 4, 64, 128)
    # MOCM's last mixed batch: mixed image | mixed pseudo-label | weight.
    assert Image.open(run_dir / "predictions" / "mocm_step_000004.png").size == panel_size(3, 4, 64, 128)
    aucs = [value for scores in results["reliability_auc"].values() for value in scores.values()]
    assert aucs and all(0 <= value <= 1 for value in aucs)


def test_bf16_mixed_precision_runs(run_tiny, source_ckpt):
    results, _ = run_tiny(
        "mt_metric",
        "synth2real",
        f"method.source_ckpt={source_ckpt}",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=2",
    )
    assert 0 <= results["metrics"]["mIoU"] <= 100 and results["global_step"] == 2


@pytest.mark.parametrize("metric_trains_student", [False, True])
def test_two_process_ddp_keeps_teacher_and_proxies_identical(tmp_path, source_ckpt, metric_trains_student):
    result = run_ddp(
        "mt_metric", "synth2real", tmp_path, f"method.source_ckpt={source_ckpt}",
        f"method.metric_trains_student={metric_trains_student}", "data.target.options.length=8",
        "data.val.options.length=5", "data.batch_size=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["global_step"] == 2
    assert results["ddp_replica_max_difference"] == {"teacher": 0.0, "proxies": 0.0}


def test_class_means_and_reliability_preferring_class_mix():
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 2, 2]]])
    values = torch.tensor([[[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]]])
    assert torch.allclose(class_means(values, labels, 4), torch.tensor([[0.5, 0.5, 0.2, 0.0]]))
    # Two of three present classes are pasted; a class of near-zero preference is (almost) never one of them.
    torch.manual_seed(0)
    preference = torch.tensor([[1.0, 1.0, 1e-9]]).expand(200, -1)
    masks = class_mix_masks(labels.expand(200, -1, -1), class_preference=preference)
    assert (masks.sum((1, 2)) == 4).all()  # classes 0 and 1: 4 pixels
    assert masks[:, 1].sum() == 0


def normalised(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def test_metric_guided_class_mix_pastes_the_drawn_classes_with_their_labels_and_weights(source_ckpt):
    module = build_module(source_ckpt, "method.color_jitter_p=0", "method.blur_p=0")
    images = torch.stack([normalised(torch.full((3, 2, 4), 0.2)), normalised(torch.full((3, 2, 4), 0.8))])
    labels = torch.tensor([[[0, 0, 0, 0], [0, 0, 0, 0]], [[1, 1, 2, 2], [1, 1, 2, 2]]])
    weights = torch.stack([torch.full((2, 4), 0.1), torch.full((2, 4), 0.9)])
    mixed, mixed_labels, mixed_weights = module.metric_guided_class_mix(images, TeacherTargets(labels, weights))
    # Image 0 receives one of image 1's two classes (whole), image 1 receives image 0's only class (all of it).
    pasted = (mixed[0] - images[1]).abs().amax(0) < 1e-5
    assert pasted.sum() == 4 and (mixed_labels[0][pasted] > 0).all() and len(mixed_labels[0][pasted].unique()) == 1
    assert torch.allclose(mixed[0][:, ~pasted], images[0][:, ~pasted], atol=1e-5)
    assert (mixed_weights[0][pasted] == 0.9).all() and (mixed_weights[0][~pasted] == 0.1).all()
    assert torch.allclose(mixed[1], images[0], atol=1e-5) and (mixed_labels[1] == 0).all()


def test_mocm_draws_reliable_classes_and_jitters_after_mixing(source_ckpt):
    torch.manual_seed(0)
    # Images of 2 x 4 pixels (the blur needs two rows).
    labels = torch.tensor([[[0, 0, 1, 1]], [[2, 2, 3, 3]]]).repeat(100, 1, 1).expand(-1, 2, -1)
    # In every image one class is reliable (mean weight 1) and the other not (1e-6): the reliable one is pasted.
    weights = torch.tensor([[[1.0, 1.0, 1e-6, 1e-6]], [[1e-6, 1e-6, 1.0, 1.0]]]).repeat(100, 1, 1)
    weights = weights.expand(-1, 2, -1)
    images = normalised(torch.rand(200, 3, 2, 4))
    module = build_module(source_ckpt)
    _, mixed_labels, _ = module.metric_guided_class_mix(images, TeacherTargets(labels, weights))
    received = mixed_labels[torch.arange(200) % 2 == 0]  # the even images receive from the odd (class 3 reliable)
    assert (received == 3).sum((1, 2)).float().mean() > 3.9 and (received == 2).sum() < 10
    uniform = build_module(source_ckpt, "method.mocm_draw=uniform")
    _, uniform_labels, _ = uniform.metric_guided_class_mix(images, TeacherTargets(labels, weights))
    assert (uniform_labels[torch.arange(200) % 2 == 0] == 2).sum() > 100
    # With jitter on, both halves of a mixed image share one colour transform: their ratio to the inputs is equal.
    jitter = build_module(source_ckpt, "method.color_jitter_p=1", "method.color_jitter_strength=0.5", "method.blur_p=0")
    flat = normalised(torch.full((3, 2, 4), 0.5)).expand(2, -1, -1, -1)
    mixed, _, _ = jitter.metric_guided_class_mix(flat, TeacherTargets(labels[:2], weights[:2]))
    assert torch.allclose(mixed[:, :, :, :1].expand_as(mixed), mixed, atol=1e-5) and not torch.allclose(mixed, flat)
    with pytest.raises(ValueError, match="method.mocm_draw='best'"):
        build_module(source_ckpt, "method.mocm_draw=best")


def test_mocm_pastes_only_the_pixels_at_least_as_reliable_as_their_class(source_ckpt):
    images = normalised(torch.rand(2, 3, 2, 4))
    labels = torch.tensor([[[0, 0, 0, 0]], [[5, 5, 5, 5]]]).expand(-1, 2, -1)
    # Class 5 in the batch: weights 2, 0.5, 1.5, 0 (mean 1): its first and third pixels are reliable.
    weights = torch.tensor([[[1.0, 1.0, 1.0, 1.0]], [[2.0, 0.5, 1.5, 0.0]]]).expand(-1, 2, -1)
    reliable = build_module(source_ckpt, "method.color_jitter_p=0", "method.blur_p=0")
    _, mixed_labels, mixed_weights = reliable.metric_guided_class_mix(images, TeacherTargets(labels, weights))
    assert mixed_labels[0].tolist() == [[5, 0, 5, 0]] * 2 and mixed_weights[0].tolist() == [[2.0, 1.0, 1.5, 1.0]] * 2
    whole = build_module(source_ckpt, "method.mocm_paste=whole_class")
    assert whole.metric_guided_class_mix(images, TeacherTargets(labels, weights))[1][0, 0].tolist() == [5] * 4


def test_histogram_auc_on_constructed_scores():
    # class 0: every correct score above every incorrect one; class 1: the reverse; class 2: all tied.
    scores = torch.tensor([0.95, 0.95, 0.95, 0.6, 0.2, 0.3, 0.1, 0.2, 0.8, 0.9, 0.5, 0.5, 0.5])
    correct = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    counts = correctness_histograms(scores[None], correct, labels, 4, 1000)
    assert counts.shape == (4, 1, 2, 1000) and counts.sum() == len(scores)
    auc = histogram_auc(counts[:, 0])
    assert auc[:3].tolist() == [1.0, 0.0, 0.5] and auc[3].isnan()
    # The 0/1 score 1[s >= 0.9] on class 0: 3 of 4 correct pass, no incorrect one: AUC = (1 + 0.75 - 0) / 2.
    assert histogram_auc(thresholded(counts[:, 0], 0.9))[0].item() == pytest.approx(0.875)
    # On random scores it is the exact ROC AUC up to the bin width.
    generator = torch.Generator().manual_seed(0)
    correct = torch.rand(5000, generator=generator) < 0.7
    scores = (torch.rand(5000, generator=generator) + 0.5 * correct).clamp(max=1)
    counts = correctness_histograms(scores[None], correct, torch.zeros(5000, dtype=torch.long), 1, 1000)
    assert histogram_auc(counts[:, 0])[0].item() == pytest.approx(roc_auc_score(correct, scores), abs=1e-3)


def test_metric_loss_trains_the_student_feature_space_only_when_switched_on(source_ckpt, monkeypatch):
    monkeypatch.setattr(
        lightning_modules.mt_metric, "weighted_cross_entropy", lambda logits, labels, weight: 0.0 * logits.sum()
    )
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 64)
    for trains_student in (False, True):
        module = build_module(source_ckpt, f"method.metric_trains_student={trains_student}")
        module.training_step({"tgt": {"img": images, "img_strong": images}}, 0).backward()
        backbone_grads = [p.grad.abs().sum() for p in module.segmenter.backbone.parameters() if p.grad is not None]
        assert bool(sum(backbone_grads) > 0) == trains_student
        assert module.metric_head.proxies.grad.abs().sum() > 0
        assert all(p.grad is None for p in module.teacher.parameters())


def write_cross_city_layouts(root, height=32, width=64):
    """Tiny Cityscapes (source) and NTHU Rome (target) trees in their official layouts."""
    rng = np.random.default_rng(0)
    label_ids = np.array([7, 8, 11, 21, 23, 26], np.uint8)  # road, sidewalk, building, vegetation, sky, car

    def picture(path, suffix):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path.with_suffix(suffix))

    def labels(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(rng.choice(label_ids, (height, width // 8)), 8, 1)).save(path)

    for index in range(4):
        frame = f"aachen_{index:06d}_000019"
        picture(root / "cityscapes/leftImg8bit/train/aachen" / f"{frame}_leftImg8bit", ".png")
        labels(root / "cityscapes/gtFine/train/aachen" / f"{frame}_gtFine_labelIds.png")
        picture(root / "NTHU_Datasets/Rome/Images/Train" / f"pic_{index:03d}", ".jpg")
    for index in range(2):
        picture(root / "NTHU_Datasets/Rome/Images/Test" / f"pic_{100 + index:03d}", ".jpg")
        labels(root / "NTHU_Datasets/Rome/Labels/Test" / f"pic_{100 + index:03d}_eval.png")


def test_cs2nthu_source_then_mt_metric_on_the_official_layouts(run_tiny, tmp_path):
    write_cross_city_layouts(tmp_path / "data")
    size = "[32,64]"
    data = (
        f"data.root={tmp_path / 'data'}",
        "data.batch_size=2",
        "data.crop_size=[32,32]",
        *(f"data.{stream}.resize={size}" for stream in ("source", "target", "val")),
    )
    _, source_dir = run_tiny("source_only", "cs2nthu", *data, name="source")
    results, _ = run_tiny(
        "mt_metric", "cs2nthu", *data, f"method.source_ckpt={source_dir / 'checkpoints' / 'last.ckpt'}", name="adapt"
    )
    assert set(results["metrics"]) == {"mIoU13"} and 0 <= results["metrics"]["mIoU13"] <= 100
    assert len(results["per_class_iou"]) == 13 and "terrain" not in results["per_class_iou"]
    assert set(results["reliability_auc"]) <= set(results["per_class_iou"])
    assert all(set(auc) == {"metric", "confidence", "threshold"} for auc in results["reliability_auc"].values())
