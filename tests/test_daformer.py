"""tmt's DAFormer base (rare class sampling, the balanced source crop, ClassMix's batch classes, pseudo-label crop,
thing-class feature distance, DACS jitter, the optimiser's decay exemptions and warm-up) and the fine-tuning
setting's labelled target fraction."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from datamodules.build import build_datamodule
from datamodules.datasets.cityscapes import Cityscapes
from datamodules.errors import ConfigError
from datamodules.rare_class_sampling import RareClassSampled, class_probabilities, class_statistics
from datamodules.transforms import CROP_REDRAWS, SemanticTransform, crop_is_balanced
from datamodules.uda import LabelledFraction, UDADataModule, labelled_indices
from lightning_modules.components.self_training import (
    class_mix_masks,
    downscale_labels,
    ignore_border_rows,
    masked_feature_distance,
    strong_photometric,
)
from lightning_modules.optim import build_optimizer, poly_lr_lambda
from lightning_modules.tmt import TMT
from tests.conftest import compose_config, method_module


class ClassBlocks(Dataset):
    """Procedural 8 x 8 images whose pixel value is their index; image i holds the classes of ``layouts[i]``,
    each on ``pixels`` pixels (rest class 0)."""

    procedural = True

    def __init__(self, layouts: list[list[int]], pixels: int = 16):
        self.layouts, self.pixels = layouts, pixels

    def __len__(self) -> int:
        return len(self.layouts)

    def train_ids(self, index: int) -> np.ndarray:
        mask = np.zeros(64, np.uint8)
        for slot, c in enumerate(self.layouts[index]):
            mask[slot * self.pixels : (slot + 1) * self.pixels] = c
        return mask.reshape(8, 8)

    def __getitem__(self, index: int) -> dict:
        return {"image": np.full((8, 8, 3), index, np.uint8), "mask": self.train_ids(index)}


def drawn_images(dataset: RareClassSampled, draws: int) -> np.ndarray:
    """How often each source image was drawn, from its index painted into the image."""
    std = 0.229 * 255
    drawn = [round(float(dataset[(0, p)]["img"][0, 0, 0]) * std + 0.485 * 255) for p in range(draws)]
    return np.bincount(drawn, minlength=len(dataset.dataset)) / draws


def test_rare_class_sampling_draws_images_as_its_formula_says():
    # Class 3 is in one image, class 2 in two, class 1 in five: the rarer the class, the more its images are drawn.
    layouts = [[1, 2, 3], [1, 2], [1], [1], [1], [0], [0], [0]]
    dataset = ClassBlocks(layouts)
    settings = {"min_pixels": 0, "class_temp": 0.05, "min_crop_ratio": 0.0}
    sampled = RareClassSampled(dataset, SemanticTransform(train=True), 0, 4, settings)
    counts, areas = class_statistics(dataset, 4, None)
    assert counts[0].tolist() == [16, 16, 16, 16] and areas.tolist() == [64] * 8
    classes, probabilities = class_probabilities(counts, 0.05)
    frequency = counts.sum(0) / counts.sum()
    expected_class = np.exp((1 - frequency) / 0.05) / np.exp((1 - frequency) / 0.05).sum()
    assert np.allclose(probabilities, expected_class[classes])
    # P(image) = sum over its classes of P(c) / |images holding c|.
    holders = [np.flatnonzero(counts[:, c] > 0) for c in range(4)]
    expected = np.zeros(8)
    for c in range(4):
        expected[holders[c]] += expected_class[c] / len(holders[c])
    observed = drawn_images(sampled, 3000)
    assert np.abs(observed - expected).max() < 0.03
    assert observed[0] > 2 * observed[5]  # the image of the rarest class beats a background-only one
    # A pure function of (seed, epoch, position): the same key, the same item.
    assert torch.equal(sampled[(1, 7)]["img"], sampled[(1, 7)]["img"])


def test_rare_class_sampling_skips_images_below_min_pixels_and_redraws_crops():
    dataset = ClassBlocks([[0, 1], [0, 0, 0, 1]], pixels=16)  # class 1 on two full rows of each
    # min_pixels is scaled to the 8 x 8 label: 16 x 1914 x 1052 / 64 at GTA5 size is 16 here; > 16 excludes both.
    too_strict = {"min_pixels": 16 * 1914 * 1052 / 64, "class_temp": 0.01, "min_crop_ratio": 0.0}
    only_background = RareClassSampled(dataset, SemanticTransform(train=True), 0, 2, too_strict)
    assert only_background.classes.tolist() == [0]
    # A 2 x 2 crop lies inside class 1's rows 1 time in 7: with min_crop_ratio the crop is redrawn until it does.
    settings = {"min_pixels": 3 * 1914 * 1052 / 64, "class_temp": 0.0001, "min_crop_ratio": 1.0}
    cropped = RareClassSampled(dataset, SemanticTransform(crop=(2, 2), train=True), 0, 2, settings)
    plain = RareClassSampled(
        dataset, SemanticTransform(crop=(2, 2), train=True), 0, 2, {**settings, "min_crop_ratio": 0}
    )
    with_class = [bool((cropped[(0, p)]["mask"] == 1).sum() > 3) for p in range(200)]
    without = [bool((plain[(0, p)]["mask"] == 1).sum() > 3) for p in range(200)]
    assert np.mean(with_class) > np.mean(without) + 0.3


def test_rare_class_counts_are_cached_beside_the_data(tmp_path):
    for index in range(2):
        frame = f"aachen_{index:06d}_000019"
        path = tmp_path / "cs" / f"leftImg8bit/train/aachen/{frame}_leftImg8bit.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.zeros((4, 6, 3), np.uint8))
        label = tmp_path / "cs" / f"gtFine/train/aachen/{frame}_gtFine_labelIds.png"
        label.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(label), np.full((4, 6), 7 if index else 26, np.uint8))  # road / car
    dataset = Cityscapes(tmp_path / "cs", "train")
    counts, _ = class_statistics(dataset, 19, str(tmp_path))
    assert counts[0, 13] == 24 and counts[1, 0] == 24
    (cached,) = (tmp_path / ".verify_cache").glob("rcs-Cityscapes-*.npy")
    np.save(cached, np.zeros((2, 20), np.int64))  # the cache is what a second run reads
    assert class_statistics(dataset, 19, str(tmp_path))[0].sum() == 0


def test_crop_is_balanced_as_mmseg_random_crop_tests_it():
    assert crop_is_balanced(np.array([[1, 1, 2, 2]]), 0.75)
    assert not crop_is_balanced(np.array([[1, 1, 1, 2]]), 0.75)  # one class on 75% of the labelled pixels
    assert crop_is_balanced(np.array([[1, 1, 1, 2, 255, 255]]), 0.8)  # ignore is not counted
    assert not crop_is_balanced(np.array([[3, 3, 255, 255]]), 0.75)  # a single class
    assert not crop_is_balanced(np.full((2, 2), 255), 0.75)


def test_cat_max_ratio_redraws_unbalanced_source_crops_and_keeps_the_last_draw():
    # Class 1 on the left half of a 16 x 16 label, class 2 on the right: a 4 x 4 crop holds both classes, at most
    # 3 of its columns one class, only when it straddles the middle (3 of 13 positions).
    mask = np.ones((16, 16), np.uint8)
    mask[:, 8:] = 2
    item = {"image": np.zeros((16, 16, 3), np.uint8), "mask": mask}
    balanced = SemanticTransform(crop=(4, 4), train=True, cat_max_ratio=0.8)
    plain = SemanticTransform(crop=(4, 4), train=True)

    def crop(transform, position):  # a SeedSequence counts its spawns: each call gets a fresh one
        return transform(item, np.random.SeedSequence([0, 0, position]))["mask"].numpy()

    share_balanced = np.mean([crop_is_balanced(crop(balanced, p), 0.8) for p in range(300)])
    share_plain = np.mean([crop_is_balanced(crop(plain, p), 0.8) for p in range(300)])
    # One draw passes with p = 3/13; eleven draws with 1 - (10/13)^11 = 0.94.
    assert share_plain == pytest.approx(3 / 13, abs=0.07)
    assert share_balanced == pytest.approx(1 - (10 / 13) ** (CROP_REDRAWS + 1), abs=0.05)
    # The first draw is the plain transform's: a balanced first crop is not redrawn.
    first_passes = [p for p in range(40) if crop_is_balanced(crop(plain, p), 0.8)]
    assert first_passes and all(np.array_equal(crop(balanced, p), crop(plain, p)) for p in first_passes)
    # No crop can pass (one class): the transform still returns a crop after its redraws.
    single_class = {"image": item["image"], "mask": np.ones((16, 16), np.uint8)}
    assert balanced(single_class, np.random.SeedSequence(0))["mask"].shape == (4, 4)
    # Unlabelled streams and evaluation are untouched.
    assert not SemanticTransform(crop=(4, 4), train=True, labelled=False, cat_max_ratio=0.8).balances_crops
    assert not SemanticTransform(crop=(4, 4), train=False, cat_max_ratio=0.8).balances_crops


def test_tmt_balances_its_source_crops_and_no_other_stream(tmp_path):
    cfg = OmegaConf.to_container(compose_config("tmt", "synth2real", tmp_path, "data.crop_size=[32,32]"), resolve=True)
    assert cfg["method"]["cat_max_ratio"] == 0.75
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    assert datamodule.train_sets["src"].transform.cat_max_ratio == 0.75
    assert datamodule.train_sets["src"].transform.balances_crops
    assert not datamodule.train_sets["tgt"].transform.balances_crops


def test_cat_max_ratio_outside_a_share_is_refused():
    with pytest.raises(ConfigError, match=r"method.cat_max_ratio=1.5; expected a share in \(0, 1\] or null"):
        UDADataModule(source={}, target={}, val={}, cat_max_ratio=1.5)


def test_class_mix_from_the_batch_draws_half_of_the_batch_classes_for_each_image():
    """DAFormer's get_class_masks: the candidates are the batch's classes and ignore, half drawn per image."""
    torch.manual_seed(0)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, :, 2:] = 1
    labels[1] = 2
    labels[1, 0] = 255  # the batch's candidates: 0, 1, 2 and ignore; two are drawn per image
    masks = class_mix_masks(labels.repeat(500, 1, 1), classes_from="batch")
    pasted_classes = [
        frozenset(label[mask.bool()].unique().tolist()) for label, mask in zip(labels.repeat(500, 1, 1), masks)
    ]
    for label, mask in zip(labels.repeat(500, 1, 1), masks):  # whole classes or nothing of a class
        for c in label.unique():
            assert mask[label == c].sum() in (0, (label == c).sum())
    image0 = pasted_classes[0::2]
    # Image 0 holds 0 and 1: both pasted when {0, 1} is drawn (1 of 6 pairs), nothing when {2, ignore} is.
    assert np.mean([s == {0, 1} for s in image0]) == pytest.approx(1 / 6, abs=0.05)
    assert np.mean([not s for s in image0]) == pytest.approx(1 / 6, abs=0.05)
    # Image 1 holds 2 and ignore: ignore is pasted when drawn (1 pair in 2).
    assert np.mean([255 in s for s in pasted_classes[1::2]]) == pytest.approx(0.5, abs=0.07)
    with pytest.raises(ValueError, match="classes_from='nearby'"):
        class_mix_masks(labels, classes_from="nearby")


def test_an_unknown_class_mix_source_is_refused():
    with pytest.raises(ConfigError, match="method.class_mix_classes"):
        method_module("tmt", "synth2real", "method.class_mix_classes=nearby")


def test_pseudo_label_crop_zeroes_the_border_rows_scaled_to_the_image():
    weight = ignore_border_rows(torch.ones(1, 10, 4), 2, 3)
    assert weight[0, :, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    # DAFormer's 15 / 120 rows of a 512-row crop are 2 / 15 rows of a 64-row image.
    module = SimpleNamespace(method={"pseudo_label_crop": {"top": 15, "bottom": 120, "reference_height": 512}})
    cropped = TMT.cropped_pseudo_weight(module, torch.tensor(0.5), torch.Size([2, 64, 8]))
    rows = cropped[0, :, 0]
    assert rows[:2].sum() == 0 and rows[-15:].sum() == 0 and (rows[2:-15] == 0.5).all()


def test_feature_distance_is_masked_to_thing_cells():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 13  # a car fills the top-left 2 x 2 cell
    labels[0, 2:, 2:] = torch.tensor([[13, 13], [13, 0]])  # 3 / 4 car: kept at min_ratio 0.75
    labels[0, :2, 2:] = torch.tensor([[11, 0], [0, 0]])  # 3 / 4 road (0), a person pixel
    cells = downscale_labels(labels, 2, 0.75, 19)
    assert cells[0].tolist() == [[13, 0], [0, 13]]
    assert downscale_labels(labels, 2, 0.8, 19)[0].tolist() == [[13, 255], [0, 255]]
    features, reference = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    features[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])  # distance 5 in the car cell
    features[0, :, 1, 0] = 100.0  # a road cell: outside the mask
    things = torch.isin(cells, torch.tensor([11, 13])).float()
    assert masked_feature_distance(features, reference, things).item() == pytest.approx(2.5)
    assert masked_feature_distance(features, reference, torch.zeros_like(things)).item() == 0


def test_feature_distance_skips_the_reference_pass_only_when_no_cell_is_a_thing():
    """A batch without a thing cell gives the loss and gradient of the full computation (0) without the pass."""
    module = method_module("tmt", "synth2real", "method.transferability_guidance=false")
    passes = []
    module.reference_encoder.register_forward_hook(lambda *args: passes.append(1))
    images = torch.randn(2, 3, 64, 128)
    features = module.segmenter.backbone(images)[-1]
    road = torch.zeros(2, 64, 128, dtype=torch.long)
    skipped = module.thing_feature_distance(images, road, features)
    assert passes == [] and skipped.item() == 0
    with torch.no_grad():
        reference = module.reference_encoder(images)[-1]
    full = masked_feature_distance(features, reference, torch.zeros_like(features[:, 0]))
    (gradient,) = torch.autograd.grad(full, features, retain_graph=True)
    assert full.item() == 0 and not gradient.any()
    passes.clear()
    cars = torch.full((2, 64, 128), 13, dtype=torch.long)
    # the reference is the initial encoder (no ImageNet weights), so a moved student is what it measures
    assert module.thing_feature_distance(images, cars, features + 1).item() > 0 and passes == [1]


def test_dacs_jitter_runs_with_probability_0_8_with_hue():
    torch.manual_seed(0)
    images = torch.zeros(4000, 3, 2, 2) + torch.tensor([0.3, -0.2, 0.5])[:, None, None]
    # Hue alone (no brightness / contrast / saturation, no blur): an image changes exactly when the jitter runs.
    out = strong_photometric(images, 0.8, 0.0, 0.0, (0.15, 1.15), hue_strength=0.2, jitter_together=True)
    changed = (out - images).abs().flatten(1).amax(1) > 1e-4
    assert changed.float().mean().item() == pytest.approx(0.8, abs=0.03)


def test_norm_layers_get_no_weight_decay_and_warm_up_follows_mmcv():
    cfg = compose_config("tmt", "synth2real", "unused", "trainer.max_steps=2")
    module = TMT(cfg)
    module.trainer = SimpleNamespace(max_steps=100)
    optimizer = module.configure_optimizers()["optimizer"]
    undecayed = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    names = {id(p): n for n, p in module.named_parameters()}
    assert undecayed and all("norm" in names[id(p)] for g in undecayed for p in g["params"])
    norm_count = sum(1 for n, _ in module.segmenter.backbone.named_parameters() if "norm" in n)
    assert sum(len(g["params"]) for g in undecayed) == norm_count
    # mmcv's linear warm-up: lr x poly(t) x (1 - (1 - t / W)(1 - r)).
    factor = poly_lr_lambda(1000, 1.0, 100, 1e-6)
    assert factor(0) == pytest.approx(1e-6) and factor(50) == pytest.approx(0.95 * (0.5 + 0.5e-6))
    assert factor(100) == pytest.approx(0.9)
    weight = torch.nn.Parameter(torch.zeros(1))
    plain = build_optimizer([weight], [], {**cfg.optim, "warmup_ratio": None, "warmup_steps": 4}, 10)
    assert plain["lr_scheduler"]["scheduler"].lr_lambdas[0](0) == pytest.approx(0.25)


class CountingCityscapes(Cityscapes):
    read: list = []

    def read_raw_label(self, path: Path) -> np.ndarray:
        CountingCityscapes.read.append(path.name)
        return super().read_raw_label(path)


def test_fine_tuning_reads_only_the_labelled_fraction_of_the_target_labels(tmp_path, monkeypatch):
    assert labelled_indices(10, 0.3) == [0, 4, 9] and labelled_indices(5, 1.0) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="target_labelled_fraction"):
        labelled_indices(10, 0.0)
    for index in range(10):
        frame = f"aachen_{index:06d}_000019"
        image = tmp_path / f"leftImg8bit/train/aachen/{frame}_leftImg8bit.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(image), np.zeros((4, 6, 3), np.uint8))
        label = tmp_path / f"gtFine/train/aachen/{frame}_gtFine_labelIds.png"
        label.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(label), np.full((4, 6), 7, np.uint8))
    monkeypatch.setattr("datamodules.uda.build_from_spec", lambda spec, split: CountingCityscapes(tmp_path, split))
    spec = {"name": "cityscapes", "split": "train"}
    data = UDADataModule(
        spec, spec, spec, streams=("tgt_labelled",), batch_size=1, num_workers=0, verify=False,
        target_labelled_fraction=0.3,
    )  # fmt: skip
    data.setup("fit")
    CountingCityscapes.read.clear()
    stream = data.train_sets["tgt_labelled"]
    items = [stream[(0, i)] for i in range(len(stream))]
    assert len(items) == 3 and all((item["mask"] == 0).all() for item in items)
    assert sorted(set(CountingCityscapes.read)) == [f"aachen_{i:06d}_000019_gtFine_labelIds.png" for i in (0, 4, 9)]
    assert isinstance(stream.dataset, LabelledFraction)
    with pytest.raises(ConfigError, match="target_labelled_fraction"):
        UDADataModule(spec, spec, spec, streams=("tgt_labelled",))


def test_tmt_fine_tuning_runs_guided_and_refuses_without_target_labels(run_tiny):
    # 16 target images at 10% leave 2 labelled ones, fewer than a batch of 4: one sentence, not a hang.
    with pytest.raises(ConfigError, match="'tgt_labelled' training stream has 2 items"):
        run_tiny("tmt_finetune", "synth2real", "trainer.max_steps=2", name="too_few")
    results, run_dir = run_tiny(
        "tmt_finetune", "synth2real", "data.target_labelled_fraction=0.5", "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
    )  # fmt: skip
    assert 0 <= results["metrics"]["mIoU"] <= 100 and results["method"] == "tmt_finetune"
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_domain" in header and "train/pseudo_quality" not in header
    with pytest.raises(ConfigError, match="tgt_labelled"):
        method_module("tmt_finetune", "synth2real", "method.streams=[src,tgt]")
