"""The procedural tasks: deterministic from the seed, the intended label space, a real domain shift."""

import numpy as np
import pytest
import torch

from datamodules.datasets.synth_shapes import SyntheticShapes
from datamodules.datasets.synth_streets import STREET_CLASSES, SyntheticStreets
from datamodules.errors import DatasetLayoutError
from datamodules.loading import item_seeds
from datamodules.transforms import SemanticTransform


def test_streets_are_a_pure_function_of_seed_and_index():
    first, again = SyntheticStreets(domain="real", seed=3)[5], SyntheticStreets(domain="real", seed=3)[5]
    other_seed = SyntheticStreets(domain="real", seed=4)[5]
    assert np.array_equal(first["image"], again["image"]) and np.array_equal(first["mask"], again["mask"])
    assert not np.array_equal(first["mask"], other_seed["mask"])


def test_streets_use_only_the_drawn_train_ids():
    labels = np.concatenate([SyntheticStreets(domain="synthetic", length=20)[i]["mask"].ravel() for i in range(20)])
    assert set(np.unique(labels)) == set(STREET_CLASSES)


def test_domains_share_layout_statistics_but_differ_in_appearance():
    source, target = SyntheticStreets(domain="synthetic", length=30), SyntheticStreets(domain="real", length=30)
    source_freq = np.bincount(np.concatenate([source[i]["mask"].ravel() for i in range(30)]), minlength=19)
    target_freq = np.bincount(np.concatenate([target[i]["mask"].ravel() for i in range(30)]), minlength=19)
    assert np.abs(source_freq / source_freq.sum() - target_freq / target_freq.sum()).max() < 0.05
    road = [d[0]["image"][d[0]["mask"] == 0].std(axis=0).mean() for d in (source, target)]
    assert road[1] > 2 * road[0]  # the real domain is textured, the synthetic one flat


def test_diverse_streets_draw_a_new_look_per_image_over_the_same_layouts():
    diverse = SyntheticStreets(domain="diverse", length=6)
    road_colours = np.stack([item["image"][item["mask"] == 0].mean(0) for item in (diverse[i] for i in range(6))])
    assert road_colours.std(0).mean() > 20  # a fresh palette per image, unlike the fixed source / target ones
    labels = np.concatenate([diverse[i]["mask"].ravel() for i in range(6)])
    assert set(np.unique(labels)) <= set(STREET_CLASSES)


def test_shapes_give_nonempty_instances_and_camouflage_lowers_contrast():
    def contrast(item):
        inside = item["instances"].any(0)
        return np.abs(item["image"][inside].mean(0) - item["image"][~inside].mean(0)).sum()

    clear, camouflaged = SyntheticShapes(domain="clear", length=20), SyntheticShapes(domain="camouflaged", length=20)
    for i in range(20):
        assert clear[i]["instances"].shape[0] >= 1 and clear[i]["instances"].sum((1, 2)).min() > 0
    assert np.mean([contrast(camouflaged[i]) for i in range(20)]) < np.mean([contrast(clear[i]) for i in range(20)])


def test_unknown_domain_and_split_are_named():
    with pytest.raises(DatasetLayoutError, match="mars"):
        SyntheticStreets(domain="mars")
    with pytest.raises(DatasetLayoutError, match="holdout"):
        SyntheticShapes(domain="clear", split="holdout")


def test_strong_view_is_pixel_aligned_with_the_weak_view():
    item = SyntheticStreets(domain="real")[0]
    transform = SemanticTransform(resize=(32, 64), crop=(24, 24), train=True, strong_view=True)
    sample = transform(item, item_seeds(0, 0, 0))
    assert sample["img"].shape == sample["img_strong"].shape == (3, 24, 24)
    assert sample["mask"].shape == (24, 24) and sample["mask"].dtype == torch.long
    # Same crop: the strong view is a photometric change of the weak one, so the two stay correlated.
    weak, strong = sample["img"].flatten(), sample["img_strong"].flatten()
    assert torch.corrcoef(torch.stack([weak, strong]))[0, 1] > 0.5


def test_unlabelled_stream_carries_no_mask_and_draws_the_labelled_crop():
    item = SyntheticStreets(domain="real")[0]
    sample = SemanticTransform(train=True, labelled=False)(item, item_seeds(0, 0, 0))
    assert "mask" not in sample
    # An item read without its label (an unlabelled stream's dataset) gets the same crop and flip.
    geometry = {"resize": (32, 64), "crop": (24, 24), "train": True}
    without_label = SemanticTransform(**geometry, labelled=False)({"image": item["image"]}, item_seeds(0, 0, 5))
    with_label = SemanticTransform(**geometry, labelled=True)(item, item_seeds(0, 0, 5))
    assert torch.equal(without_label["img"], with_label["img"]) and "mask" in with_label


def test_diverse_source_never_camouflages_and_polyp_target_is_one_or_two_blobs():
    def contrast(item):
        inside = item["instances"].any(0)
        return np.abs(item["image"][inside].mean(0) - item["image"][~inside].mean(0)).sum()

    diverse = SyntheticShapes(domain="diverse", length=30, size=64)
    camouflaged = SyntheticShapes(domain="camouflaged", length=30, size=64)
    polyp = SyntheticShapes(domain="polyp", length=30, size=64)
    assert np.array_equal(diverse[3]["image"], SyntheticShapes(domain="diverse", length=30, size=64)[3]["image"])
    assert np.median([contrast(diverse[i]) for i in range(30)]) > np.median(
        [contrast(camouflaged[i]) for i in range(30)]
    )
    counts = [len(polyp[i]["instances"]) for i in range(30)]
    assert set(counts) <= {1, 2} and counts.count(1) > counts.count(2)
    reds = [polyp[i]["image"][..., 0].mean() - polyp[i]["image"][..., 2].mean() for i in range(30)]
    assert min(reds) > 20  # reddish tissue in every image
