"""seco: component extraction, Pixel Semantic Aggregation, GMM split and correction on constructed inputs;
the resumable pseudo-label stage with a tiny SAM; self-training on its labels; the GMM split under DDP."""

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
    component_losses,
    connected_components,
    correct_components,
    fit_noise_gmm,
    label_confusion,
    paint_in_order,
    purest_points,
    relabel,
    semantic_alignment,
    spatial_purity,
    unclipped_boxes,
)
from lightning_modules.networks.factory import build_network
from lightning_modules.networks.sam import build_sam, save_sam_checkpoint
from lightning_modules.panels import panel_size
from tests.conftest import compose_config

IGN = IGNORE_INDEX
TINY_PSA = ["method.sam.variant=tiny", "method.psa.everything_mode.points_per_side=4"]


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
    assert set(results["metrics"]) == {"pixel", "psa", "scc"}
    assert results["metrics"]["pixel"]["labelled_pixels"] == 6 * 64 * 128
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


def test_training_stage_without_label_dir_or_base_ckpt_is_refused(pseudo_label_run, run_tiny):
    root, _, _ = pseudo_label_run
    with pytest.raises(ValueError, match="data.pseudo_label_dir"):
        run_tiny("seco", "synth2real", f"method.base_ckpt={root / 'base.ckpt'}", "trainer.max_steps=1")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", "+method=seco", "+task=synth2real", "stage=pseudo_label"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "set method.base_ckpt=PATH" in result.stderr


def test_gmm_split_is_identical_on_both_ddp_ranks(pseudo_label_run, tmp_path):
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
        r"rank (\d): GMM split of (\d+) components: (\d+) noisy, digest ([0-9a-f]{16})",
        result.stdout + "\n" + result.stderr,
    )
    assert sorted(rank for rank, *_ in splits) == ["0", "1"]
    assert splits[0][1:] == splits[1][1:] and int(splits[0][1]) > 0
    assert len(list((tmp_path / "labels").glob("*.png"))) == 5
