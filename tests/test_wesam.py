"""WeSAM as its authors run it: the views, the poly box, the loss scaling, the metric threshold, per-prompt runs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from datamodules.datasets.synth_shapes import SyntheticShapes
from datamodules.errors import ConfigError
from datamodules.loading import item_seeds
from datamodules.prompted import PromptedDataset, PromptedTransform, wesam_strong_transform
from datamodules.prompts import derive_prompts, masks_to_boxes
from datamodules.transforms import seed_pipeline
from lightning_modules.components.losses import joint_dice_loss, symmetric_focal_loss
from lightning_modules.components.sam_adaptation import anchor_loss, pseudo_mask_loss
from lightning_modules.metrics import instance_iou
from lightning_modules.networks.sam import build_configured_sam, save_sam_checkpoint
from lightning_modules.optim import build_optimizer
from tests.conftest import compose_config, method_module


def test_strong_view_is_the_wesam_ops_applied_to_the_flipped_weak_view():
    image = np.zeros((32, 48, 3), np.uint8)
    image[2:10, 3:20] = 200  # the instance, painted in the image: the views must flip it with the mask
    image[20:30, 30:40, 1] = 90
    instances = np.zeros((1, 32, 48), np.uint8)
    instances[0, 2:10, 3:20] = 1
    transform = PromptedTransform(train=True, strong_view=True, recipe="wesam")
    assert [type(t).__name__ for t in transform.strong.transforms] == [
        "Posterize",
        "Equalize",
        "Sharpen",
        "Solarize",
        "RandomBrightnessContrast",
        "RandomShadow",
    ]
    flips = set()
    for index in range(24):
        seeds = item_seeds(0, 0, index)
        views, flipped = transform.views(image, instances, seeds)
        assert np.array_equal(views["img"][..., 0] == 200, flipped[0].astype(bool))  # the mask followed the image
        ys, xs = np.nonzero(flipped[0])
        flips.add((ys.mean() > 16, xs.mean() > 24))  # (flipped vertically, flipped horizontally)
        strong = wesam_strong_transform()
        seed_pipeline(strong, item_seeds(0, 0, index).spawn(3)[2])  # the strong view's own child of the item's seeds
        assert np.array_equal(strong(image=views["img"])["image"], views["img_strong"])
    assert len(flips) == 4  # identity, horizontal, vertical and both flips all occur


def test_prompts_follow_the_flips():
    dataset = PromptedDataset(
        SyntheticShapes(domain="diverse", length=4, size=64), 64, strong_view=True, views="wesam", seed=3
    )
    for index in range(4):
        item = dataset[(0, index)]
        assert torch.equal(item["boxes"], masks_to_boxes(item["instances"] > 0.5))
        points, labels = item["points"].long(), item["point_labels"]
        inside = item["instances"][torch.arange(len(points))[:, None], points[..., 1], points[..., 0]]
        assert (inside[labels == 1] == 1).all() and (inside[labels == 0] == 0).all()


def test_poly_box_is_the_bounding_box_of_the_approxpolydp_polygon():
    mask = np.zeros((80, 80), np.uint8)
    cv2.ellipse(mask, (40, 38), (30, 22), 20.0, 0, 360, 1, -1)
    polys = derive_prompts(mask[None], np.random.default_rng(0))["polys"]
    (contour,), _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    vertices = cv2.approxPolyDP(contour, max(0.05 * cv2.arcLength(contour, True), 3), True)[:, 0]
    expected = [vertices[:, 0].min(), vertices[:, 1].min(), vertices[:, 0].max(), vertices[:, 1].max()]
    assert masks_to_boxes(torch.from_numpy(polys) > 0).tolist() == [expected]
    assert expected != masks_to_boxes(torch.from_numpy(mask[None])).int().tolist()[0]  # coarser than the tight box


def test_code_scaling_is_the_official_call_and_paper_scaling_the_per_mask_mean():
    torch.manual_seed(0)
    logits, pseudo = torch.randn(3, 8, 8) * 3, (torch.rand(3, 8, 8) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy(logits.sigmoid(), pseudo, reduction="none")
    focal = (3 * (1 - torch.exp(-bce)) ** 2 * bce).mean()  # losses.py FocalLoss with alpha = num_masks = 3
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * pseudo).sum() + 3) / (probs.sum() + pseudo.sum() + 3)  # DiceLoss, smooth = 3
    assert torch.allclose(symmetric_focal_loss(logits, pseudo, 3), focal, atol=1e-6)
    assert torch.allclose(joint_dice_loss(logits, pseudo, 3), dice, atol=1e-6)
    assert torch.allclose(pseudo_mask_loss(logits, pseudo, 20, 1, "code"), 20 * focal + dice, atol=1e-5)
    # One instance: the code's alpha is 1; with more instances the focal term grows with their count.
    one = pseudo_mask_loss(logits[:1], pseudo[:1], 20, 0, "code")
    assert torch.allclose(one, 20 * symmetric_focal_loss(logits[:1], pseudo[:1], 1))
    assert not torch.allclose(pseudo_mask_loss(logits, pseudo, 20, 1, "paper"), 20 * focal + dice)
    assert anchor_loss(logits, logits, logits, "code") < anchor_loss(logits, logits, -logits, "code")


def test_evaluation_threshold_counts_a_mask_at_logits_above_it():
    logits = torch.tensor([[[0.3, 0.3], [0.8, 0.8]]])
    truth = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    assert instance_iou(logits, truth, 0.0).item() == 1.0 and instance_iou(logits, truth, 0.5).item() == 0.5


def test_adam_is_wesams_optimiser_with_l2_weight_decay():
    weight = torch.nn.Parameter(torch.ones(2))
    optim = {"name": "adam", "lr": 1e-4, "weight_decay": 1e-4, "head_lr_mult": 1.0, "poly_power": 0.0}
    built = build_optimizer([weight], [], {**optim, "warmup_steps": 250}, 1000)
    assert type(built["optimizer"]) is torch.optim.Adam
    schedule = built["lr_scheduler"]["scheduler"]
    for _ in range(300):
        built["optimizer"].step(), schedule.step()
    assert schedule.get_last_lr() == pytest.approx([1e-4])  # constant after the 250 warm-up steps


def test_a_per_prompt_run_trains_and_evaluates_its_prompt_only(run_tiny):
    results, _ = run_tiny("wesam", "synth_polyp", "task.prompt_kinds=[point]", "task.monitor=val/point")
    assert set(results["metrics"]) == {"point", "avg"} and results["metrics"]["avg"] == results["metrics"]["point"]


def test_wesam_adapts_a_sam_checkpoint_on_the_real_camo_layout(run_tiny, tmp_path):
    """+task=camo end to end on a tiny CAMO tree in its official layout, from a plain SAM .pth."""
    rng = np.random.default_rng(0)
    for split, stems in [("Train", range(3)), ("Test", range(3, 5))]:
        for index in stems:
            stem = f"camourflage_{index:05d}"
            image = tmp_path / "data" / "CAMO" / "Images" / split / f"{stem}.jpg"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
            gt = np.zeros((48, 64), np.uint8)
            gt[10:30, 5:25], gt[20:40, 40:60] = 128, 255
            (tmp_path / "data" / "CAMO" / "GT").mkdir(parents=True, exist_ok=True)
            Image.fromarray(gt).save(tmp_path / "data" / "CAMO" / "GT" / f"{stem}.png")
    overrides = ("model=tiny", f"data.root={tmp_path / 'data'}", "data.batch_size=2", "task.prompt_kinds=[box]")
    model = compose_config("wesam", "camo", tmp_path / "unused", *overrides).model
    checkpoint = tmp_path / "sam_tiny.pth"
    save_sam_checkpoint(build_configured_sam(OmegaConf.to_container(model, resolve=True)), checkpoint)
    results, run_dir = run_tiny(
        "wesam", "camo", *overrides, "task.monitor=val/box", f"model.sam_checkpoint={checkpoint}"
    )
    assert results["trained"] and set(results["metrics"]) == {"box", "avg"} and 0 <= results["metrics"]["box"] <= 100
    assert (run_dir / "sam.pth").is_file()


def test_wesam_runs_on_the_real_kvasir_layout_with_its_box_file(run_tiny, tmp_path):
    """+task=kvasir end to end on a tiny Kvasir-SEG tree with kavsir_bboxes.json: one instance per box."""
    rng = np.random.default_rng(0)
    root, boxes = tmp_path / "data" / "Kvasir-SEG", {}
    for index in range(6):
        stem = f"cju{index:04d}"
        for folder in ("images", "masks"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.jpg")
        mask = np.zeros((48, 64), np.uint8)
        mask[8:40, 8:56] = 255
        Image.fromarray(mask).save(root / "masks" / f"{stem}.jpg")
        corners = [(8, 8, 32, 40), (32, 8, 56, 40)]
        boxes[stem] = {"bbox": [dict(zip(("xmin", "ymin", "xmax", "ymax"), c), label="polyp") for c in corners]}
    (root / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    overrides = ("model=tiny", f"data.root={tmp_path / 'data'}", "data.batch_size=2", "task.prompt_kinds=[box]")
    results, _ = run_tiny("wesam", "kvasir", *overrides, "task.monitor=val/box")
    assert results["trained"] and set(results["metrics"]) == {"box", "avg"} and 0 <= results["metrics"]["box"] <= 100


def test_prompt_kinds_outside_box_point_poly_are_refused_when_the_module_is_built():
    for kinds in ("[]", "[box,boxes]"):
        with pytest.raises(
            ConfigError, match=r"task.prompt_kinds=.*; expected one or more of \('box', 'point', 'poly'\)"
        ):
            method_module("wesam", "synth_polyp", f"task.prompt_kinds={kinds}")


def test_wesam_with_lora_after_the_encoder_keeps_the_blocks_plain_and_saves_the_adapted_sam(run_tiny):
    results, run_dir = run_tiny(
        "wesam", "synth_polyp", "method.lora.placement=output", "task.prompt_kinds=[box]", "task.monitor=val/box"
    )
    assert set(results["metrics"]) == {"box", "avg"}
    saved = torch.load(run_dir / "adapted_sam.pt", weights_only=False)
    assert saved["selected_branch"] == "student" and not (run_dir / "sam.pth").exists()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state["sam.image_encoder.branches.student.up.embedding"].abs().sum() > 0
    assert not any(".lora" in key or "branches" in key for key in state if "blocks" in key)


def test_an_unknown_lora_placement_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"method.lora.placement='encoder'; expected one of \('blocks', 'output'\)"):
        method_module("wesam", "synth_polyp", "method.lora.placement=encoder")
