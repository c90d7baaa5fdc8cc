"""Supervised SAM fine-tuning with prompts derived from ground truth (box, point, poly).

Each step encodes every image once and decodes all of its instances for each prompt kind in one
batched call; the loss is SAM's focal + dice mask loss against the instance masks plus the MSE of its
IoU prediction.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_modules.base import PromptedSegmentationModule
from lightning_modules.components.losses import iou_prediction_loss, sam_mask_loss, sam_mask_loss_per_mask
from lightning_modules.components.ops import unpadded
from lightning_modules.networks.sam import build_configured_sam, decode_batch, predict_instances, save_sam_checkpoint
from lightning_modules.optim import build_optimizer


class SAMFinetune(PromptedSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        model = cfg["model"]
        self.sam = build_configured_sam(model)
        self.poly_as = model["poly_as"]
        self.sam.prompt_encoder.requires_grad_(self.method["train_prompt_encoder"])
        self.sam.image_encoder.requires_grad_(self.method["train_image_encoder"])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(images)

    def training_step(self, batch: dict, batch_idx: int):
        method = self.method
        embeddings = self.sam.image_encoder(batch["img"])
        losses = {}
        for kind in self.prompt_kinds:
            per_image = []
            predictions = predict_instances(self.sam, embeddings, batch["targets"], kind, self.poly_as, with_iou=True)
            for (logits, iou), target in zip(predictions, batch["targets"]):
                logits, instances = unpadded(logits[:, 0], target), unpadded(target["instances"], target)
                per_image.append(
                    sam_mask_loss(
                        logits, instances, method["focal_weight"], method["dice_weight"], method["focal_alpha"]
                    )
                    + method["iou_weight"] * iou_prediction_loss(iou[:, 0], logits, instances)
                )
            losses[kind] = torch.stack(per_image).mean()
        if method["train_multimask"]:
            losses["ambiguous_point"] = self.ambiguous_point_loss(embeddings, batch["targets"])
        loss = sum(losses.values()) / len(losses)
        self.log_dict({f"train/loss_{kind}": value for kind, value in losses.items()})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def ambiguous_point_loss(self, embeddings: torch.Tensor, targets: list) -> torch.Tensor:
        """SAM's ambiguity-aware term (Kirillov et al. 2023, Sec. 3): one positive point per instance, three
        output masks, only the lowest mask loss back-propagated, the IoU head trained on all three. It trains
        the multimask outputs that SAM's everything mode (SeCo's PSA) decodes."""
        method, per_image, prompts = self.method, [], []
        for target in targets:
            points = target["points"][:, :1].to(self.device)
            prompts.append(
                self.sam.prompt_encoder(
                    points=(points, torch.ones_like(points[..., 0], dtype=torch.int)), boxes=None, masks=None
                )
            )
        for (logits, iou), target in zip(decode_batch(self.sam, embeddings, prompts, multimask_output=True), targets):
            logits, instances = unpadded(logits, target), unpadded(target["instances"][:, None], target)
            mask_losses = sam_mask_loss_per_mask(
                logits, instances, method["focal_weight"], method["dice_weight"], method["focal_alpha"]
            )
            per_image.append(
                mask_losses.min(1).values.mean() + method["iou_weight"] * iou_prediction_loss(iou, logits, instances)
            )
        return torch.stack(per_image).mean()

    def on_fit_end(self) -> None:
        # A plain SAM state dict (official format): the "Source" SAM that adaptation methods start from
        # through model.sam_checkpoint, loadable by segment-anything's own registry too.
        if self.trainer.is_global_zero and self.hparams.get("run_dir"):
            save_sam_checkpoint(self.sam, Path(self.hparams["run_dir"]) / "sam.pth")

    def configure_optimizers(self):
        prompt_and_mask = [*self.sam.prompt_encoder.parameters(), *self.sam.mask_decoder.parameters()]
        return build_optimizer(
            self.sam.image_encoder.parameters(), prompt_and_mask, self.hparams["optim"], self.trainer.max_steps
        )
