"""The SAM baseline end to end on the procedural shapes task."""
import json

import pytest
import torch

from lightning_modules.components.losses import iou_prediction_loss
from lightning_modules.components.sam import build_sam, save_sam_checkpoint


def test_sam_finetune_trains_and_reports_each_prompt_kind(run_tiny):
    results, run_dir = run_tiny("sam_finetune", "synth_shapes")
    assert set(results["metrics"]) == {"box", "point", "poly", "avg"}
    kinds = [results["metrics"][k] for k in ("box", "point", "poly")]
    assert results["metrics"]["avg"] == pytest.approx(sum(kinds) / 3)
    assert all(0 <= v <= 100 for v in kinds)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    reloaded = build_sam("tiny", run_dir / "sam.pth", image_size=128).state_dict()
    assert all(torch.equal(trained[f"sam.{key}"], value) for key, value in reloaded.items())


def test_unadapted_evaluation_loads_the_given_sam_checkpoint(run_tiny, tmp_path):
    torch.manual_seed(1)
    checkpoint = tmp_path / "sam_tiny.pth"
    save_sam_checkpoint(build_sam("tiny", image_size=128), checkpoint)
    first, run_dir = run_tiny("sam_finetune", "synth_shapes", "train=false", f"model.sam_checkpoint={checkpoint}",
                              name="a")
    second, _ = run_tiny("sam_finetune", "synth_shapes", "train=false", f"model.sam_checkpoint={checkpoint}", name="b")
    assert first["metrics"] == second["metrics"]
    assert json.loads((run_dir / "results.json").read_text())["trained"] is False
    assert not (run_dir / "checkpoints").exists()


def test_missing_sam_checkpoint_is_named(run_tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        run_tiny("sam_finetune", "synth_shapes", f"model.sam_checkpoint={tmp_path / 'nowhere.pth'}")


def test_target_row_trains_on_target_labels(run_tiny):
    results, run_dir = run_tiny("sam_finetune", "synth_shapes", "data.labelled_domain=target")
    assert "labelled_domain: target" in (run_dir / "config.yaml").read_text()
    assert results["trained"] is True


def test_iou_prediction_loss_is_mse_to_the_binarised_masks_iou():
    target = torch.zeros(2, 4, 4)
    target[:, :2] = 1  # 8 pixels
    logits = torch.full((2, 4, 4), -5.0)
    logits[0, :2] = 5.0  # exact: IoU 1
    logits[1, :1] = 5.0  # 4 of 8: IoU 0.5
    assert iou_prediction_loss(torch.tensor([1.0, 0.5]), logits, target) == 0
    assert torch.isclose(iou_prediction_loss(torch.tensor([0.0, 0.5]), logits, target), torch.tensor(0.5))
