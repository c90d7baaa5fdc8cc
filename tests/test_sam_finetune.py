"""The SAM baseline end to end on the procedural shapes task."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from datamodules.build import build_datamodule
from datamodules.errors import CheckpointError
from lightning_modules.components.losses import iou_prediction_loss, sam_mask_loss, sam_mask_loss_per_mask
from lightning_modules.networks.sam import build_configured_sam, predict_instances, save_sam_checkpoint
from lightning_modules.panels import panel_size
from lightning_modules.sam_finetune import SAMFinetune
from tests.conftest import compose_config


def test_sam_finetune_trains_and_reports_each_prompt_kind(run_tiny):
    results, run_dir = run_tiny("sam_finetune", "synth_shapes")
    assert set(results["metrics"]) == {"box", "point", "poly", "avg"}
    kinds = [results["metrics"][k] for k in ("box", "point", "poly")]
    assert results["metrics"]["avg"] == pytest.approx(sum(kinds) / 3)
    assert all(0 <= v <= 100 for v in kinds)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    run_model = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").model, resolve=True)
    reloaded = build_configured_sam(run_model, run_dir / "sam.pth").state_dict()
    assert all(torch.equal(trained[f"sam.{key}"], value) for key, value in reloaded.items())
    # The first val batch (2 images, 128 x 128): image | ground truth | box | point | poly.
    assert Image.open(run_dir / "predictions" / "step_000004.png").size == panel_size(5, 2, 128, 128)


def test_unadapted_evaluation_loads_the_given_sam_checkpoint(run_tiny, tmp_path):
    torch.manual_seed(1)
    checkpoint = tmp_path / "sam_tiny.pth"
    task_model = OmegaConf.to_container(compose_config("sam_finetune", "synth_shapes", tmp_path / "cfg").model)
    save_sam_checkpoint(build_configured_sam(task_model), checkpoint)
    first, run_dir = run_tiny(
        "sam_finetune", "synth_shapes", "train=false", f"model.sam_checkpoint={checkpoint}", name="a"
    )
    second, _ = run_tiny("sam_finetune", "synth_shapes", "train=false", f"model.sam_checkpoint={checkpoint}", name="b")
    assert first["metrics"] == second["metrics"]
    assert json.loads((run_dir / "results.json").read_text())["trained"] is False
    assert not (run_dir / "checkpoints").exists()


def test_missing_sam_checkpoint_is_named(run_tiny, tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pth"):
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


def test_per_mask_loss_ranks_masks_and_averages_to_the_mask_loss():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    logits = torch.stack([10 * (2 * target[0, 0] - 1), -10 * torch.ones(8, 8), 10 * torch.ones(8, 8)])[None]
    per_mask = sam_mask_loss_per_mask(logits, target, 20.0, 1.0)
    assert per_mask.shape == (1, 3) and per_mask[0].argmin() == 0
    assert torch.isclose(per_mask.mean(), sam_mask_loss(logits, target.expand_as(logits), 20.0, 1.0))


@pytest.mark.parametrize("focal_alpha, sign", [(0.25, -1), (0.75, 1), (-1.0, 0)])
def test_focal_balance_sets_where_an_ambiguous_pixel_lands(focal_alpha, sign):
    """A pixel that is object in one image and background in the other (same logit): alpha 0.25 drives its logit
    below 0 (to -0.41: the mask drops what it is unsure of), no balance leaves it at 0."""
    logit = torch.zeros(1, requires_grad=True)
    target = torch.tensor([1.0, 0.0]).view(2, 1, 1)
    optimiser = torch.optim.SGD([logit], lr=0.5)
    for _ in range(300):
        optimiser.zero_grad()
        sam_mask_loss(logit.view(1, 1, 1).expand(2, 1, 1), target, 20.0, 0.0, focal_alpha).backward()
        optimiser.step()
    assert (abs(logit.item()) < 1e-3) if sign == 0 else (logit.item() * sign > 0.3)


@pytest.mark.parametrize("train_multimask", [True, False])
def test_ambiguity_term_trains_the_multimask_outputs(tmp_path, train_multimask):
    cfg = OmegaConf.to_container(
        compose_config("sam_finetune", "synth_shapes", tmp_path, f"method.train_multimask={train_multimask}"),
        resolve=True,
    )
    module = SAMFinetune(cfg)
    module.log = module.log_dict = lambda *args, **kwargs: None
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    module.training_step(next(iter(datamodule.train_dataloader())), 0).backward()
    # Masks 1-3 come from their own hypernetwork MLPs, which only the ambiguity term reaches (for the
    # instances where that mask is the best of the three).
    reached = [
        any(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
        for mlp in module.sam.mask_decoder.output_hypernetworks_mlps[1:]
    ]
    assert any(reached) == train_multimask


def test_evaluation_encodes_a_batch_once_for_every_prompt_kind(tmp_path):
    cfg = OmegaConf.to_container(compose_config("sam_finetune", "synth_shapes", tmp_path), resolve=True)
    module = SAMFinetune(cfg).eval()
    datamodule = build_datamodule(cfg)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    calls = []
    module.sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        predictions = module.predict(batch["img"], batch["targets"])
        embeddings = module.sam.image_encoder(batch["img"])
        for kind in ("box", "point", "poly"):
            alone = predict_instances(module.sam, embeddings, batch["targets"], kind, module.poly_as)
            assert all(torch.equal(a, b) for a, b in zip(predictions[kind], alone))
    assert list(predictions) == ["box", "point", "poly"] and len(calls) == 2  # one pass for the three kinds
