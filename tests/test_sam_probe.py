"""The SAM probe: mask quality values on constructed logits, and the command on a finished run."""

import numpy as np
import pytest
import torch

from datamodules.prompts import masks_to_boxes
from experiments.sam_probe import best_threshold, box_auc, main, mask_quality, region_purity


def square(size: int, top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_mask_quality_on_constructed_masks():
    truth = torch.stack([square(16, 2, 2, 8), square(16, 4, 4, 8)]).float()
    exact = torch.where(truth > 0, 3.0, -3.0)
    half = exact.clone()
    half[1, 4:8, 4:12] = -3.0  # the second mask misses the top half of its object
    quality = mask_quality(half, truth)
    assert quality["iou"] == pytest.approx([1.0, 0.5])
    assert quality["recall"] == pytest.approx([1.0, 0.5])
    assert quality["precision"] == pytest.approx([1.0, 1.0])
    assert quality["auc"] == []  # squares fill their boxes: nothing inside the box to separate
    assert mask_quality(half, truth, threshold=5.0)["iou"] == [0.0, 0.0]  # the task's logit threshold counts


def test_best_threshold_picks_one_cut_for_all_masks():
    """Two masks: one whole above logit -1 only, one whole at every cut up to 0; one shared cut serves both best."""
    ious = {-1.0: [1.0, 1.0], 0.0: [0.5, 1.0], 0.5: [0.4, 0.9]}
    assert best_threshold(ious) == (-1.0, 1.0)
    assert best_threshold({0.0: [0.2], 0.5: [0.6]}) == (0.5, pytest.approx(0.6))


def test_box_auc_separates_object_from_the_rest_of_its_box():
    ys, xs = torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij")
    disc = (ys - 10) ** 2 + (xs - 10) ** 2 < 36
    box = masks_to_boxes(disc[None])[0]
    assert box_auc(disc.float() * 2 - 1, disc, box) == pytest.approx(1.0)
    assert box_auc(1 - disc.float() * 2, disc, box) == pytest.approx(0.0)
    assert box_auc(torch.zeros(20, 20), disc, box) == pytest.approx(0.5)  # the prompt alone: chance
    empty = torch.zeros(20, 20, dtype=torch.bool)
    assert box_auc(torch.zeros(20, 20), empty, masks_to_boxes(empty[None])[0]) is None


def test_probe_prints_every_prompt_kind_of_a_finished_run(run_tiny, capsys):
    _, run_dir = run_tiny("sam_finetune", "synth_shapes", "method.train_prompt_encoder=true")
    capsys.readouterr()
    main([str(run_dir), "--images", "2", "--view", "strong"])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| box", "| point", "| poly"]
    assert all(0 <= float(row.split(" | ")[1]) <= 100 for row in rows)
    # the best single threshold scores at least the task's own
    assert all(float(row.split(" | ")[5]) >= float(row.split(" | ")[1]) for row in rows)
    main([str(run_dir), "--images", "2", "--task", "synth_polyp"])
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert "on synth_polyp's data.target" in header and len(rows) == 3


def test_probe_names_a_run_without_a_sam(tmp_path):
    with pytest.raises(SystemExit, match="config.yaml does not exist"):
        main([str(tmp_path)])
    (tmp_path / "config.yaml").write_text("model: {variant: tiny}\ndata: {}\n")
    with pytest.raises(SystemExit, match="sam.pth"):
        main([str(tmp_path)])


def test_region_purity_counts_a_straddling_mask_against_its_best_region():
    regions = np.zeros((2, 4, 8), bool)
    regions[0, :, :4], regions[1, :, 4:] = True, True  # left and right halves
    exact_left = regions[:1]
    straddling = np.zeros((1, 4, 8), bool)
    straddling[0, :, 2:8] = True  # 8 pixels of the left region, 16 of the right
    coverage, inside, area = region_purity(np.concatenate([exact_left, straddling]), regions)
    assert coverage == 1.0
    assert (inside, area) == (16 + 16, 16 + 24)
    assert region_purity(np.zeros((0, 4, 8), bool), regions) == (0.0, 0.0, 0.0)


def test_everything_mode_scores_each_filter_setting(run_tiny, capsys):
    _, run_dir = run_tiny("sam_finetune", "synth_regions", "method.train_prompt_encoder=true")
    capsys.readouterr()
    main([str(run_dir), "--images", "2", "--everything", "0.0,0.0,0.1", "2.0,0.99,0.1"])
    rows = capsys.readouterr().out.splitlines()[2:]
    loose, impossible = (row.split(" | ") for row in rows)
    assert float(loose[1]) > 0 and 0 < float(loose[2]) <= 100  # every predicted mask passes
    assert float(impossible[1]) == 0 and float(impossible[2]) == 0  # a predicted IoU never exceeds 2
    with pytest.raises(SystemExit):
        main([str(run_dir), "--everything", "0.3,0.8"])
    with pytest.raises(SystemExit, match="--images 0: expected at least 1"):
        main([str(run_dir), "--images", "0", "--everything", "0.3,0.8,0.1"])
