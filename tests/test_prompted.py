"""Ground-truth prompts and the SAM input geometry of datamodules.prompted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from segment_anything.utils.transforms import ResizeLongestSide

from datamodules.constants import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from datamodules.datasets.synth_shapes import SyntheticShapes
from datamodules.errors import ConfigError, DatasetLayoutError
from datamodules.prompted import PromptedDataModule, PromptedDataset, build_prompted_datamodule, collate_prompted
from datamodules.prompts import derive_prompts, masks_to_boxes
from lightning_modules.networks.sam import build_sam
from tests.conftest import prompted_datamodule_config


def rectangles() -> np.ndarray:
    instances = np.zeros((2, 40, 60), np.uint8)
    instances[0, 5:15, 10:30] = 1  # rows 5..14, cols 10..29
    instances[1, 20:39, 40:41] = 1  # a one-pixel-wide bar
    return instances


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_boxes_are_tight_inclusive_xyxy():
    prompts = derive_prompts(rectangles(), np.random.default_rng(0))
    np.testing.assert_array_equal(prompts["boxes"], [[10, 5, 29, 14], [40, 20, 40, 38]])
    assert prompts["boxes"].dtype == np.float32


def test_boxes_equal_torchvision_on_random_masks():
    masks = torch.rand(16, 30, 50, generator=torch.Generator().manual_seed(0)) > 0.995
    masks[:, 7, 11] = True  # no empty mask: torchvision's version raises on those
    torch.testing.assert_close(masks_to_boxes(masks), torchvision.ops.masks_to_boxes(masks))


def test_positive_points_inside_negative_points_outside():
    instances = rectangles()
    prompts = derive_prompts(instances, np.random.default_rng(1), num_positive=5, num_negative=5)
    assert prompts["points"].shape == (2, 10, 2) and prompts["point_labels"].dtype == np.int64
    np.testing.assert_array_equal(prompts["point_labels"], [[1] * 5 + [0] * 5] * 2)
    xs, ys = prompts["points"][..., 0].astype(int), prompts["points"][..., 1].astype(int)
    hits = instances[np.arange(2)[:, None], ys, xs]
    assert hits[:, :5].all() and not hits[:, 5:].any()
    # Distinct positives while the instance has enough pixels.
    assert len({tuple(p) for p in prompts["points"][0, :5]}) == 5


def test_tiny_instance_repeats_pixels_and_full_instance_pads_negatives():
    instances = np.zeros((2, 8, 8), np.uint8)
    instances[0, 3, 4] = 1
    instances[1] = 1
    prompts = derive_prompts(instances, np.random.default_rng(0))
    np.testing.assert_array_equal(prompts["points"][0, :5], [[4, 3]] * 5)
    np.testing.assert_array_equal(prompts["point_labels"][1, 5:], [-1] * 5)


def test_polygon_of_rectangle_and_disk():
    ys, xs = np.mgrid[:96, :96]
    disk = ((xs - 48) ** 2 + (ys - 50) ** 2 < 30**2).astype(np.uint8)
    rectangle = np.zeros((96, 96), np.uint8)
    rectangle[10:60, 20:80] = 1
    polys = derive_prompts(np.stack([rectangle, disk]), np.random.default_rng(0))["polys"]
    assert polys.dtype == np.uint8 and polys.shape == (2, 96, 96)
    assert iou(polys[0], rectangle) > 0.95
    # WeSAM's epsilon (0.05 x arc length, ~9 px here) leaves a coarse inscribed quad/pentagon of the disk
    # (area ratio 2/pi .. 0.76); a finer epsilon follows the outline closely.
    assert 0.6 < iou(polys[1], disk) < 0.8 and (polys[1] & ~disk.astype(bool)).sum() < 0.02 * disk.sum()
    fine = derive_prompts(disk[None], np.random.default_rng(0), poly_epsilon=0.005, poly_min_epsilon=0)["polys"][0]
    assert iou(fine, disk) > 0.95


def test_geometry_and_normalisation_equal_sam_preprocess():
    shapes = SyntheticShapes(split="val", domain="clear", length=2, size=64)
    item = PromptedDataset(shapes, image_size=128, train=False)[0]
    raw = shapes[0]
    sam = build_sam("tiny", image_size=128)
    resized = ResizeLongestSide(128).apply_image(raw["image"])
    expected = sam.preprocess(torch.from_numpy(resized).permute(2, 0, 1).float()[None])[0]
    torch.testing.assert_close(item["img"], expected)
    assert item["input_size"] == (128, 128) and item["original_size"] == (64, 64)
    n = len(raw["instances"])
    assert item["instances"].shape == item["polys"].shape == (n, 128, 128)
    assert item["boxes"].shape == (n, 4) and item["points"].shape == (n, 10, 2)


def test_unit_input_is_the_image_over_255_as_wesam_feeds_it():
    image = np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    instances = np.zeros((1, 30, 60), np.uint8)
    instances[0, 10:20, 5:40] = 1
    items = [{"image": image, "instances": instances, "meta": {"path": "x.png"}}]
    unit = PromptedDataset(items, image_size=60, train=False, input_scale="unit")[0]
    MEAN, STD = (torch.tensor(stat)[:, None, None] for stat in (SAM_PIXEL_MEAN, SAM_PIXEL_STD))
    normalised = PromptedDataset(items, image_size=60, train=False)[0]
    expected = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(unit["img"][:, :30], expected)
    assert (unit["img"][:, 30:] == 0).all()  # padding stays zero (black on this scale)
    torch.testing.assert_close(unit["img"][:, :30] * 255, normalised["img"][:, :30] * STD + MEAN)
    assert torch.equal(unit["boxes"], normalised["boxes"]) and torch.equal(unit["points"], normalised["points"])
    with pytest.raises(ConfigError, match="data.sam_input"):
        PromptedDataset(items, image_size=60, train=False, input_scale="imagenet")


def test_non_square_image_is_padded_bottom_right():
    image = np.full((30, 60, 3), 200, np.uint8)
    instances = np.zeros((1, 30, 60), np.uint8)
    instances[0, 10:20, 0:60] = 1
    item = PromptedDataset(
        [{"image": image, "instances": instances, "meta": {"path": "x.png"}}], image_size=64, train=False
    )[0]
    assert item["input_size"] == (32, 64)
    assert (item["img"][:, 32:] == 0).all() and (item["img"][:, :32] != 0).all()
    assert item["instances"][0, :32].sum() > 0 and item["instances"][0, 32:].sum() == 0
    np.testing.assert_allclose(item["boxes"][0].numpy(), [0, 11, 63, 20], atol=1)


def test_zero_instances_names_the_path():
    item = {
        "image": np.zeros((8, 8, 3), np.uint8),
        "instances": np.zeros((0, 8, 8), np.uint8),
        "meta": {"path": "empty/img_7.png"},
    }
    with pytest.raises(DatasetLayoutError, match="empty/img_7.png"):
        PromptedDataset([item], image_size=16, train=False)[0]


def test_training_keeps_a_random_subset_of_max_instances():
    instances = np.zeros((6, 16, 16), np.uint8)
    for i in range(6):
        instances[i, i * 2 : i * 2 + 2, :] = 1
    items = [{"image": np.zeros((16, 16, 3), np.uint8), "instances": instances, "meta": {"path": "p"}}]
    train_item = PromptedDataset(items, image_size=16, train=True, max_instances=3, strong_view=True)[(0, 0)]
    assert train_item["instances"].shape == (3, 16, 16) and train_item["img_strong"].shape == (3, 16, 16)
    assert len(PromptedDataset(items, image_size=16, train=False, max_instances=3)[0]["instances"]) == 6


def test_eval_prompts_identical_for_same_seed():
    shapes = SyntheticShapes(split="val", domain="camouflaged", length=3, size=64)
    first, second = (PromptedDataset(shapes, image_size=64, train=False, seed=5) for _ in range(2))
    for index in (2, 0):
        a, b = first[index], second[index]
        for key in ("boxes", "points", "point_labels", "polys", "img"):
            assert torch.equal(a[key], b[key])
    assert not torch.equal(PromptedDataset(shapes, image_size=64, train=False, seed=6)[2]["points"], first[2]["points"])


def test_collate_and_datamodule_loaders():
    shapes = SyntheticShapes(split="train", domain="clear", length=5, size=32)
    module = PromptedDataModule(
        shapes,
        SyntheticShapes(split="val", domain="clear", length=3, size=32),
        image_size=32,
        batch_size=2,
        num_workers=0,
        strong_view=True,
    )
    batch = next(iter(module.train_dataloader()))
    assert batch["img"].shape == batch["img_strong"].shape == (2, 3, 32, 32)
    assert len(batch["targets"]) == 2 and "img" not in batch["targets"][0]
    assert len(module.train_dataloader()) == 2
    assert sum(len(b["targets"]) for b in module.val_dataloader()) == 3
    single = collate_prompted([module.val_set[0]])
    assert single["img"].shape == (1, 3, 32, 32) and "img_strong" not in single


def test_build_from_config_streams():
    spec = {"name": "synth_shapes", "split": "train", "options": {"domain": "clear", "length": 4, "size": 32}}
    cfg = prompted_datamodule_config(spec, {**spec, "split": "val"})
    module = build_prompted_datamodule(cfg)
    assert "instances" not in module.train_set[(0, 0)] and "instances" in module.val_set[0]
    cfg["method"]["streams"] = ["src"]
    assert "instances" in build_prompted_datamodule(cfg).train_set[(0, 0)]
    cfg["data"]["labelled_domain"] = "source"
    with pytest.raises(ValueError, match="no source dataset"):
        build_prompted_datamodule(cfg)
