"""Prediction panels on constructed batches: size, layout, the Cityscapes palette and the SAM prompts drawn."""

import numpy as np
import pytest
import torch

from datamodules.constants import CITYSCAPES_PALETTE, IGNORE_INDEX, SAM_PIXEL_MEAN
from lightning_modules.base import PromptedSegmentationModule
from lightning_modules.panels import GAP, HEADER, INSTANCE_COLOURS, OVERLAY_ALPHA, grid
from tests.conftest import method_module

ROAD, CAR = 0, 13


def tile(panel: np.ndarray, row: int, column: int, height: int, width: int) -> np.ndarray:
    top, left = HEADER + row * (height + GAP), column * (width + GAP)
    return panel[top : top + height, left : left + width]


def test_semantic_panel_is_image_truth_prediction_per_row_in_the_cityscapes_palette(tmp_path):
    module = method_module("source_only", "synth2real", run_dir=tmp_path).eval()
    mask = torch.full((2, 32, 64), ROAD)
    mask[:, :, 32:] = CAR
    mask[1, :4, :4] = IGNORE_INDEX
    images = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        columns = module.panel_columns({"img": images, "mask": mask})
        prediction = module(images).argmax(1)
    panel = grid(columns)

    assert list(columns) == ["image", "ground truth", "prediction"]
    assert panel.shape == (HEADER + 2 * 32 + GAP, 3 * 64 + 2 * GAP, 3)  # (80, 196, 3)
    truth = tile(panel, 1, 1, 32, 64)
    assert tuple(truth[10, 10]) == CITYSCAPES_PALETTE[ROAD] == (128, 64, 128)
    assert tuple(truth[10, 50]) == CITYSCAPES_PALETTE[CAR] == (0, 0, 142)
    assert tuple(truth[0, 0]) == (0, 0, 0)  # ignore is black
    assert tuple(tile(panel, 0, 1, 32, 64)[0, 0]) == CITYSCAPES_PALETTE[ROAD]
    assert np.array_equal(tile(panel, 0, 2, 32, 64), np.asarray(CITYSCAPES_PALETTE, np.uint8)[prediction[0].numpy()])
    assert (panel[:HEADER] < 128).any()  # the column names
    assert (panel[HEADER + 32 : HEADER + 32 + GAP] == 255).all()  # a white gap between the rows


class Echo(PromptedSegmentationModule):
    """Predicts each instance's ground truth, whatever the prompt."""

    def predict(self, images, targets):
        return {kind: [target["instances"][:, None] * 2 - 1 for target in targets] for kind in self.prompt_kinds}


def square_target(top: int, left: int, size: int = 32) -> dict:
    instances = torch.zeros(1, size, size)
    instances[0, top : top + 8, left : left + 8] = 1
    return {
        "instances": instances,
        "boxes": torch.tensor([[left, top, left + 7, top + 7]], dtype=torch.float32),
        "points": torch.tensor([[[left + 4, top + 4], [0, 0]]], dtype=torch.float32),
        "point_labels": torch.tensor([[1, -1]]),
        "polys": instances.clone(),
        "input_size": (size, size),
    }


def test_sam_panel_overlays_masks_and_draws_each_prompt_kind():
    module = Echo(
        {"method": {"name": "echo"}, "task": {"prompt_kinds": ["box", "point", "poly"], "logit_threshold": 0.0}}
    )
    batch = {"img": torch.zeros(2, 3, 32, 32), "targets": [square_target(4, 4), square_target(16, 12)]}
    columns = module.panel_columns(batch)
    panel = grid(columns)

    assert list(columns) == ["image", "ground truth", "box", "point", "poly"]
    assert panel.shape == (HEADER + 2 * 32 + GAP, 5 * 32 + 4 * GAP, 3)  # (80, 168, 3)
    mean = np.round(np.asarray(SAM_PIXEL_MEAN)).astype(np.uint8)  # zero input = the mean colour
    colour = INSTANCE_COLOURS[0]
    blended = np.round((1 - OVERLAY_ALPHA) * mean + OVERLAY_ALPHA * colour)
    second = {name: tile(panel, 1, column, 32, 32) for column, name in enumerate(columns)}
    assert tuple(second["image"][0, 0]) == tuple(mean)
    assert second["ground truth"][20, 16] == pytest.approx(blended, abs=1)
    assert tuple(second["ground truth"][0, 0]) == tuple(mean)
    assert tuple(second["box"][16, 12]) == tuple(colour)  # the box's corner
    assert tuple(second["point"][20, 16]) == tuple(colour)  # the positive point, filled
    assert tuple(second["poly"][16, 15]) == tuple(colour)  # the polygon's outline
    assert second["poly"][20, 16] == pytest.approx(blended, abs=1)  # its inside: the predicted mask
