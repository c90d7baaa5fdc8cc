"""seco: component extraction, Pixel Semantic Aggregation, the region classifier, the quantile / class-rank / GMM
splits and correction on constructed inputs; the resumable pseudo-label stage with a tiny SAM; the base model's own
labels; self-training (cross-entropy and UniMatch) on the labels; SCC under DDP."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.constants import IGNORE_INDEX
from datamodules.errors import ConfigError
from lightning_modules.components.connectivity import (
    class_rank_keep,
    classifier_scores,
    component_losses,
    connected_components,
    correct_components,
    crop_windows,
    fit_noise_gmm,
    kept_components,
    label_confusion,
    paint_in_order,
    purest_points,
    quantile_keep,
    region_windows,
    relabel,
    semantic_alignment,
    smoothed_cross_entropy,
    spatial_purity,
    unclipped_boxes,
)
from lightning_modules.components.self_training import consistency_loss, cutmix_boxes
from lightning_modules.networks.factory import build_network
from lightning_modules.networks.region_classifier import RegionClassifier
from lightning_modules.networks.sam import build_sam, save_sam_checkpoint
from lightning_modules.panels import panel_size
from tests.conftest import compose_config, method_module

IGN = IGNORE_INDEX
TINY_PSA = [
    "method.sam.variant=tiny",
    "method.psa.everything_mode.points_per_side=4",
    "method.scc.classifier.epochs=1",
]


def two_squares_and_a_bar() -> np.ndarray:
    labels = np.full((8, 10), IGN, dtype=np.int64)
    labels[0:2, 0:2] = 1  # component A (class 1), area 4
    labels[5:8, 6:9] = 1  # component B (class 1), area 9
    labels[3, 0:10] = 2  # component C (class 2), area 10
    labels[7, 0] = 2  # component D (class 2), area 1
    return labels


def test_connected_components_of_each_class_with_areas_and_boxes():
    components = connected_components(two_squares_and_a_bar())
    assert sorted(zip(components.classes.tolist(), components.areas.tolist())) == [(1, 4), (1, 9), (2, 1), (2, 10)]
    b = int(np.flatnonzero(components.areas == 9)[0])
    assert components.boxes[b].tolist() == [6, 5, 8, 7]
    assert (components.index[5:8, 6:9] == b + 1).all() and (components.index[two_squares_and_a_bar() == IGN] == 0).all()
    filtered = connected_components(two_squares_and_a_bar(), classes=[2], min_area=2)
    assert filtered.classes.tolist() == [2] and filtered.areas.tolist() == [10]


def test_semantic_alignment_votes_share_of_labelled_pixels_and_later_masks_win():
    labels = np.full((4, 4), IGN, dtype=np.int64)
    labels[:, :2] = 0
    labels[0, 2] = 8
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0] = True  # labelled: 8 road + 1 veg -> road (8/9)
    masks[1, :, 2:] = True  # labelled: 1 veg of 1 -> vegetation
    masks[2, 3, 3] = True  # no labelled pixel -> ignore
    classes = semantic_alignment(masks, labels, stuff_classes=[0, 8], threshold=0.2)
    assert classes.tolist() == [0, 8, IGN]
    painted = paint_in_order(masks, classes, np.full((4, 4), IGN, dtype=np.int64))
    assert (painted[:, :2] == 0).all() and (painted[:, 2:] == 8).all()
    assert semantic_alignment(masks[:1], labels, [0, 8], threshold=0.95).tolist() == [IGN]


class OneMaskSam:
    """A SAM stand-in for PSA: everything mode returns one mask over the left half; no encoder work."""

    def __init__(self, shape):
        self.mask = np.zeros(shape, bool)
        self.mask[:, : shape[1] // 2] = True

    def set_image(self, image):
        pass

    def release(self):
        pass

    def generate(self, image):
        return [{"segmentation": self.mask}]


@pytest.mark.parametrize("release, right_half", [("v1", IGN), ("v2", 3)])
def test_psa_paints_masks_over_ignore_in_v1_and_over_the_pixel_labels_in_v2(release, right_half):
    """v1 (PSA/seco_sam.py) starts from 255, SeCoV2 (PSA/seco_psa_v2.py) from a copy of the pixel labels."""
    seco = method_module("seco", "synth2real", f"seco_psa={release}", "method.psa.stuff_align_threshold=0.5")
    labels = np.full((4, 6), 3, dtype=np.int64)
    labels[:, :2] = 0  # the mask's majority (2 of its 3 columns) is road
    sam = OneMaskSam(labels.shape)
    seco.psa_tools = {"predictor": sam, "everything": sam, "stuff_classes": [0, 3], "thing_classes": []}
    aggregated = seco.pixel_semantic_aggregation(np.zeros((4, 6, 3), np.uint8), labels)
    assert (aggregated[:, :3] == 0).all() and (aggregated[:, 3:] == right_half).all()


def test_psa_class_lists_follow_the_tasks_class_count_and_an_unknown_count_is_refused():
    seco = method_module("seco", "synth2real", "seco_psa=v2")
    lists = {"19": [0, 1], "16": [2]}
    assert seco.classes_for_task(lists, "method.psa.stuff_classes") == [0, 1]
    with pytest.raises(ConfigError, match=r"method.psa.stuff_classes has lists for \[16\] classes; this task has 19"):
        seco.classes_for_task({16: [2]}, "method.psa.stuff_classes")


def test_thing_prompts_are_inside_their_component_and_boxes_grow_by_unclip():
    labels = np.full((20, 20), IGN, dtype=np.int64)
    labels[2:6, 2:12] = 5
    labels[10:18, 14:18] = 5
    things = connected_components(labels, classes=[5])
    points = purest_points(things, spatial_purity(labels, 19, radius=2), points_per_component=2)
    for k in range(len(things)):
        xs, ys = points[k, :, 0].astype(int), points[k, :, 1].astype(int)
        assert (things.index[ys, xs] == k + 1).all()
        assert len({tuple(p) for p in points[k].tolist()}) == 2
    wide = int(np.flatnonzero(things.areas == 40)[0])
    grow = 1.25 * 10 * 4 / (2 * 14)
    assert np.allclose(unclipped_boxes(things, 1.25, 20, 20)[wide], [2 - grow, 2 - grow, 11 + grow, 5 + grow])


def test_component_loss_is_cross_entropy_of_the_mask_pooled_logits():
    labels = two_squares_and_a_bar()
    components = connected_components(labels)
    logits = torch.randn(3, *labels.shape)
    losses, prediction, confidence = component_losses(logits, components)
    for k in range(len(components)):
        pooled = logits[:, torch.from_numpy(components.index == k + 1)].mean(1)
        expected = F.cross_entropy(pooled[None], torch.tensor([components.classes[k]]))
        assert torch.isclose(losses[k], expected, atol=1e-5)
        assert prediction[k] == pooled.argmax() and torch.isclose(confidence[k], pooled.softmax(0).max())


def test_gmm_marks_the_high_loss_mode_noisy_and_correction_relabels_or_ignores():
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(0.2, 0.05, 60), rng.normal(2.0, 0.1, 12)])
    noisy = fit_noise_gmm(losses, max_iter=10, tol=1e-2, reg_covar=5e-4)
    assert (noisy[:60] < 0.5).all() and (noisy[60:] > 0.5).all()
    assert (fit_noise_gmm(np.ones(5), 10, 1e-2, 5e-4) == 0).all()
    corrected = correct_components(
        classes=np.array([1, 1, 2]),
        noisy_probability=np.array([0.1, 0.9, 0.9]),
        prediction=np.array([3, 4, 5]),
        confidence=np.array([0.99, 0.99, 0.5]),
        noise_threshold=0.5,
        correction_threshold=0.95,
    )
    assert corrected.tolist() == [1, 4, IGN]
    components = connected_components(two_squares_and_a_bar())
    relabelled = relabel(components.index, np.arange(len(components)))
    assert (relabelled[two_squares_and_a_bar() == IGN] == IGN).all()
    assert label_confusion(np.array([[0, 1, IGN]]), np.array([[0, 0, 1]]), 2).tolist() == [[1, 1], [0, 0]]


def test_region_windows_follow_the_official_patch_rule():
    # A quarter of each side, centred on the box, shifted inside the image; a larger box grows the window.
    boxes = np.array([[10, 5, 20, 8], [100, 40, 127, 63], [0, 0, 63, 47]], np.float32)
    windows = region_windows(boxes, (64, 128), (0.25, 0.25))
    # 16 x 32 at the corner; a 24 x 28 box grows it 1.5x and it is shifted left; a 48 x 64 box grows it 3x.
    assert windows.tolist() == [[0, 16, 0, 32], [40, 64, 80, 128], [0, 48, 0, 96]]
    planes = torch.arange(64 * 128, dtype=torch.float32).reshape(1, 64, 128)
    crops = crop_windows(planes, torch.from_numpy(windows).float(), (16, 32), "nearest")
    assert torch.equal(crops[0, 0], planes[0, :16, :32])
    assert torch.equal(crops[2, 0], planes[0, 1:48:3, 1:96:3])  # nearest samples at the 3x cells' centres


def test_quantile_rule_keeps_exactly_the_ratio_and_class_scope_thresholds_each_class():
    losses = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05])
    assert quantile_keep(losses, np.zeros(10), 0.5, "global").sum() == 5
    assert (quantile_keep(losses, np.zeros(10), 0.5, "global") == (losses <= 0.4)).all()
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])  # each class keeps its own lower half
    per_class = quantile_keep(losses, groups, 0.5, "class")
    assert per_class.tolist() == [False, True, False, True, False, True, False, True, False, True]
    either = quantile_keep(losses, groups, 0.5, "class_or_global")
    assert (either >= per_class).all()
    # SeCoV2: per label class the ceil(ratio n) lowest (ratio 0.6: 2 of 3, 2 of 2); kept ones relabelled when confident.
    keep = class_rank_keep(losses[:5], np.array([3, 3, 3, 4, 4]), 0.6)
    assert keep.tolist() == [False, True, True, True, True]
    final = kept_components(np.array([3, 3, 3, 4, 4]), keep, np.full(5, 7), np.array([1, 1, 0.5, 0.96, 0.9]), 0.95)
    assert final.tolist() == [IGN, 7, 3, 7, 4]


def test_region_classifier_flags_the_wrongly_labelled_component():
    """Red windows are class 1, blue windows class 2; one red component carries label 2. Trained with the official
    label-smoothed loss on all components (the wrong one included), the classifier gives the wrong one the highest
    loss; the quantile rule drops it, and would relabel it to class 1 if kept."""
    torch.manual_seed(0)
    colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])
    true_class = torch.arange(40) % 2
    images = colours[true_class][:, :, None, None] + 0.3 * torch.randn(40, 3, 16, 32)
    masks = torch.zeros(40, 1, 16, 32)
    masks[:, :, 4:12, 8:24] = 1
    labels = true_class + 1
    labels[6] = 2  # component 6 is red (class 1) but labelled 2
    classifier = RegionClassifier(4, "resnet18", backbone_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8})
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    for _ in range(8):
        for batch in torch.randperm(40).split(8):
            loss = smoothed_cross_entropy(classifier(images[batch], masks[batch]), labels[batch], 0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        losses, prediction, confidence = (t.numpy() for t in classifier_scores(classifier(images, masks), labels))
    assert losses.argmax() == 6 and prediction[6] == 1
    keep = quantile_keep(losses, prediction, 0.5, "global")
    assert not keep[6] and keep.sum() == 20
    assert kept_components(labels.numpy(), np.ones(40, bool), prediction, confidence, 0.0)[6] == 1


def test_precision_at_density_reads_the_most_confident_pixels():
    from lightning_modules.components.connectivity import precision_at_density

    counts = np.zeros((2, 10))  # incorrect / correct pixels per confidence bin
    counts[1, 9], counts[0, 5], counts[1, 5] = 50, 30, 20
    assert precision_at_density(counts, 0.5) == (100.0, 50.0)  # the top bin alone
    assert precision_at_density(counts, 0.6) == (70.0, 100.0)  # whole bins: the next one comes in full


def test_pooled_batches_cut_every_component_with_its_mask_and_label():
    from lightning_modules.seco import crop_components, pooled_batches

    def image(start: int, count: int) -> dict:
        """Component k holds the top half of columns 2k, 2k + 1; the picture there is its label start + k."""
        labels = torch.arange(start, start + count)
        index = torch.zeros(8, 2 * count, dtype=torch.int32)
        index[:4] = torch.arange(1, count + 1).repeat_interleave(2).int()
        picture = labels.repeat_interleave(2).float()[None, None].expand(3, 8, -1)
        windows = torch.tensor([[0.0, 8.0, 2 * k, 2 * k + 2] for k in range(count)])
        return {"img": picture, "index": index, "windows": windows, "label": labels}

    def new_pass():  # two loader batches: images with 5 and 3 components, then one with 9
        yield [image(0, 5), image(5, 3)]
        yield [image(8, 9)]

    batches = pooled_batches(new_pass, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    seen = []
    for _ in range(8):  # two passes of 17 components: the remainder is carried over
        images, components = next(batches)
        windows = crop_components(images, components, (4, 2), torch.device("cpu"))
        assert len(windows["label"]) == 4 and set(images) == set(components["slot"].tolist())
        assert torch.equal(windows["img"].amin((1, 2, 3)).long(), windows["label"])
        assert torch.equal(windows["img"].amax((1, 2, 3)).long(), windows["label"])
        expected_mask = torch.tensor([True, True, False, False])[None, None, :, None].expand(4, 1, 4, 2)
        assert torch.equal(windows["mask"], expected_mask)
        seen += windows["label"].tolist()
    assert sorted(seen[:16]) != list(range(16)) and set(seen) == set(range(17))


def test_unimatch_pieces_cutmix_box_and_consistency_on_constructed_inputs():
    torch.manual_seed(0)
    boxes = cutmix_boxes(2000, 32, 64, p=0.5)
    share = boxes.float().mean((1, 2))
    assert 0.4 < (share > 0).float().mean() < 0.6
    assert share[share > 0].min() >= 0.005 and share.max() <= 0.45
    assert (boxes.sum(1).amax(1)[share > 0] > 0).all()  # one rectangle: every box row is a run
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 5.0
    label = torch.tensor([[[1, 1], [2, 0]]])
    confident = torch.tensor([[[True, True], [True, False]]])
    region = torch.tensor([[[True, False], [True, True]]])
    per_pixel = F.cross_entropy(logits, label, reduction="none")[0]
    expected = (per_pixel[0, 0] + per_pixel[1, 0]) / 3
    assert torch.isclose(consistency_loss(logits, label, confident, region), expected)


@pytest.fixture(scope="module")
def pseudo_label_run(tmp_path_factory):
    """A base checkpoint, a tiny SAM checkpoint and one finished pseudo-label stage on 6 target images."""
    from experiments.run import execute

    root = tmp_path_factory.mktemp("seco")
    cfg = compose_config(
        "seco", "synth2real", root / "pl", "stage=pseudo_label", "data.target.options.length=6", *TINY_PSA
    )
    segmenter = build_network(dict(cfg.model), 19)
    torch.save({"state_dict": {f"segmenter.{k}": v for k, v in segmenter.state_dict().items()}}, root / "base.ckpt")
    save_sam_checkpoint(build_sam("tiny"), root / "sam.pth")
    overrides = [
        "stage=pseudo_label",
        "data.target.options.length=6",
        *TINY_PSA,
        f"method.base_ckpt={root / 'base.ckpt'}",
        f"method.sam.checkpoint={root / 'sam.pth'}",
        f"method.label_dir={root / 'labels'}",
    ]
    results = execute(compose_config("seco", "synth2real", root / "pl", *overrides))
    return root, overrides, results


def test_pseudo_label_stage_writes_every_label_and_measures_each_step(pseudo_label_run):
    root, _, results = pseudo_label_run
    labels = sorted((root / "labels").glob("*.png"))
    assert [p.name for p in labels] == [f"{i:06d}.png" for i in range(6)]
    assert set(results["metrics"]) == {"pixel", "psa", "scc", "base_at_scc_density"}
    assert results["metrics"]["pixel"]["labelled_pixels"] == 6 * 64 * 128
    assert results["metrics"]["pixel"]["density"] == 100.0  # pixel_threshold 0: every pixel labelled
    # the base's most confident pixels at SCC's density: whole confidence bins, so at least that density
    assert results["metrics"]["base_at_scc_density"]["density"] >= results["metrics"]["scc"]["density"] - 1e-9
    assert results["psa_images"] == 6 and results["psa_images_per_second"] > 0
    assert json.loads((root / "pl" / "pseudo_label_results.json").read_text())["components"]["total"] > 0
    # image | ground truth | pixel | PSA | SCC for the first 4 target images (64 x 128).
    assert Image.open(root / "pl" / "predictions" / "pseudo_label_stages.png").size == panel_size(5, 4, 64, 128)


def test_interrupted_pseudo_label_stage_resumes_without_rewriting_finished_files(pseudo_label_run):
    from experiments.run import execute

    root, overrides, _ = pseudo_label_run
    (root / "labels" / "000002.png").unlink()  # the interrupted image: no final label,
    (root / "labels" / "psa" / "000002.npz").unlink()  # no PSA cache,
    (root / "labels" / ".000002.tmp.png").write_bytes(b"partial")  # and a half-written temp file
    finished = {p: p.stat().st_mtime_ns for p in (root / "labels").glob("0*.png")}
    results = execute(compose_config("seco", "synth2real", root / "pl2", *overrides))
    assert results["psa_images"] == 1 and results["labels_written_by_rank0"] == 1
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())
    assert (root / "labels" / "000002.png").is_file() and not list((root / "labels").rglob(".*tmp*"))


def test_a_finished_stage_reuses_its_region_classifier_and_scores(pseudo_label_run):
    from experiments.run import execute

    root, overrides, _ = pseudo_label_run
    scc = {p: p.stat().st_mtime_ns for p in (root / "labels" / "scc").iterdir()}
    assert {p.name for p in scc} == {"classifier.pt", "scores-rank0-of1.npz"}
    results = execute(compose_config("seco", "synth2real", root / "pl_again", *overrides))
    assert results["psa_images"] == 0 and results["labels_written_by_rank0"] == 0
    assert {p: p.stat().st_mtime_ns for p in (root / "labels" / "scc").iterdir()} == scc


def test_pixel_labels_are_the_base_models_own_labels_unchanged(pseudo_label_run, tmp_path):
    """labels=pixel (the plug-in claim's baseline) writes the thresholded pixel labels: no PSA, no SCC."""
    from experiments.run import execute

    root, overrides, _ = pseudo_label_run
    pixel = [o for o in overrides if not o.startswith("method.label_dir")]
    pixel += [f"method.label_dir={tmp_path / 'labels'}", "method.labels=pixel"]
    results = execute(compose_config("seco", "synth2real", tmp_path / "run", *pixel))
    metrics = results["metrics"]
    assert metrics["pixel"] == metrics["psa"] == metrics["scc"] and metrics["scc"]["density"] == 100.0
    assert metrics["base_at_scc_density"]["pixel_accuracy"] == pytest.approx(metrics["scc"]["pixel_accuracy"])
    assert results["components"]["kept"] == results["components"]["total"] > 0
    assert results["components"]["relabelled"] == 0 and not (tmp_path / "labels" / "scc").exists()


def test_psa_labels_are_written_without_scc(pseudo_label_run, tmp_path):
    """labels=psa (the paper's PSA-only ablation) writes PSA's labels: every component kept as labelled, no
    region classifier."""
    from experiments.run import execute

    root, overrides, _ = pseudo_label_run
    psa_only = [o for o in overrides if not o.startswith("method.label_dir")]
    psa_only += [f"method.label_dir={tmp_path / 'labels'}", "method.labels=psa"]
    results = execute(compose_config("seco", "synth2real", tmp_path / "run", *psa_only))
    metrics = results["metrics"]
    assert metrics["psa"] == metrics["scc"] and results["psa_images"] == 6
    assert results["components"]["kept"] == results["components"]["total"] > 0
    assert results["components"]["relabelled"] == 0 and not (tmp_path / "labels" / "scc").exists()


def test_a_label_dir_of_another_producer_is_refused_and_empty_labels_fail(pseudo_label_run, tmp_path):
    from experiments.run import execute

    root, overrides, _ = pseudo_label_run
    other_base = tmp_path / "other_base.ckpt"
    state = torch.load(root / "base.ckpt", weights_only=False)
    state["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, other_base)
    stale = [*overrides, f"method.base_ckpt={other_base}", "method.psa.unclip_ratio=2.0"]
    with pytest.raises(ConfigError, match=r"labels made with a different base_ckpt, psa; set a new method.label_dir"):
        execute(compose_config("seco", "synth2real", root / "pl3", *stale))
    fresh = [*overrides, f"method.label_dir={tmp_path / 'labels'}", "method.scc.min_labelled_fraction=1.01"]
    with pytest.raises(ConfigError, match=r"label \d+\.\d+% of the target pixels .*min_labelled_fraction=1.01"):
        execute(compose_config("seco", "synth2real", root / "pl4", *fresh))


def test_self_training_on_the_written_labels_uda_and_source_free(pseudo_label_run, run_tiny):
    root, _, _ = pseudo_label_run
    common = [
        f"method.base_ckpt={root / 'base.ckpt'}",
        f"method.label_dir={root / 'labels'}",
        "data.target.options.length=6",
        "trainer.max_steps=2",
    ]
    results, _ = run_tiny("seco", "synth2real", *common, name="uda")
    assert results["global_step"] == 2 and results["method"] == "seco"
    results, _ = run_tiny(
        "seco", "synth2real", *common, "method.streams=[pl]", "trainer.precision=bf16-mixed", name="sfda"
    )
    assert results["global_step"] == 2
    unimatch = ("method.final=unimatch", "trainer.log_every_n_steps=1")
    results, run_dir = run_tiny("seco", "synth2real", *common, *unimatch, name="unimatch")
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for term in ("labelled", "strong_1", "strong_2", "feature_perturbation"):
        assert f"train/loss_{term}" in logged


def test_training_stage_without_label_dir_or_base_ckpt_is_refused(pseudo_label_run, run_tiny):
    root, _, _ = pseudo_label_run
    with pytest.raises(ConfigError, match=r"method.final='plain'; expected one of \('ce', 'unimatch'\)"):
        run_tiny("seco", "synth2real", f"method.base_ckpt={root / 'base.ckpt'}", "method.final=plain", name="final")
    with pytest.raises(ValueError, match="data.pseudo_label_dir"):
        run_tiny("seco", "synth2real", f"method.base_ckpt={root / 'base.ckpt'}", "trainer.max_steps=1")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", "+method=seco", "+task=synth2real", "stage=pseudo_label"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "set method.base_ckpt=PATH" in result.stderr


def test_region_classifier_and_split_are_identical_on_both_ddp_ranks(pseudo_label_run, tmp_path):
    """The region classifier trains on both ranks' components with averaged gradients and the split runs on the
    gathered losses: both ranks reach the same final class for every component."""
    root, _, _ = pseudo_label_run
    # Unbuffered: the two ranks share the pipes, and each log record must reach them as one write.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "+method=seco",
            "+task=synth2real",
            "stage=pseudo_label",
            f"run_dir={tmp_path / 'run'}",
            f"method.label_dir={tmp_path / 'labels'}",
            "logger=csv",
            f"method.base_ckpt={root / 'base.ckpt'}",
            f"method.sam.checkpoint={root / 'sam.pth'}",
            *TINY_PSA,
            "data.target.options.length=5",
            "data.num_workers=0",
            "data.batch_size=2",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.enable_progress_bar=false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    splits = re.findall(
        r"rank (\d): SCC over (\d+) components: (\d+) kept, (\d+) relabelled, digest ([0-9a-f]{16})",
        result.stdout + "\n" + result.stderr,
    )
    assert sorted(rank for rank, *_ in splits) == ["0", "1"]
    assert splits[0][1:] == splits[1][1:] and int(splits[0][1]) > 0
    assert len(list((tmp_path / "labels").glob("*.png"))) == 5
