"""WeSAM: weakly supervised self-training of SAM with anchor regularisation (Zhang et al., CVPR 2024).

Per step (official adaptation.py):
1. Anchor = the frozen SAM (no LoRA) on the weak view: masks and embeddings, no gradient.
2. Teacher on the weak view (shared weights with the student, or an EMA of them), student (LoRA) on the
   strong view; both decode masks from the GT-derived prompts.
3. Self-training: the student learns the teacher's binarised masks (20 focal + dice + IoU-head MSE).
4. Anchor loss: dice of both views' masks to the anchor's masks. Contrastive loss: mask-pooled instance
   embeddings of the trainable weak-view network vs the anchor's (same instance = positive).

The authors adapt one model per prompt kind (``cfg.prompt``) and evaluate it with that prompt: a run with
``task.prompt_kinds=[box]`` is that; with several kinds the model trains on all of them jointly. The loss terms
are summed per image and averaged over the batch (the official batch is one image per GPU).

``method.lora.placement``: "blocks" (the paper's and code's LoRA on q, v of the encoder blocks, default) or
"output" (dual_lora_sam's LoRA after the frozen encoder), to measure what the placement alone is worth.
"""

from __future__ import annotations

from pathlib import Path

import torch

from datamodules.errors import require_choice
from lightning_modules.base import PromptedSegmentationModule
from lightning_modules.components.sam_adaptation import (
    LOSS_SCALINGS,
    self_training_loss,
    valid_region,
    wesam_regularisers,
)
from lightning_modules.networks.sam import build_configured_sam
from lightning_modules.networks.sam_lora import (
    branch_parameters,
    encode,
    inject_configured_lora,
    lora_modules,
    save_adapted_sam,
    segment,
)
from lightning_modules.optim import build_optimizer
from lightning_modules.teachers import ema_update

TEACHERS = ("shared", "ema")


class WeSAM(PromptedSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        model, method = cfg["model"], self.method
        require_choice("method.teacher", method["teacher"], TEACHERS)
        require_choice("method.loss_scaling", method["loss_scaling"], LOSS_SCALINGS)
        self.sam = build_configured_sam(model)
        self.poly_as = model["poly_as"]
        self.sam.requires_grad_(False)  # official base_config freezes image encoder, prompt encoder, mask decoder
        self.ema_teacher = method["teacher"] == "ema"
        branches = ["student", "teacher"] if self.ema_teacher else ["student"]
        inject_configured_lora(self.sam, branches, method["lora"])
        self.teacher_branch = "teacher" if self.ema_teacher else "student"
        if self.ema_teacher:
            for module in lora_modules(self.sam):
                module.branches["teacher"].load_state_dict(module.branches["student"].state_dict())
                module.branches["teacher"].requires_grad_(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.sam, self.teacher_branch, images)

    def training_step(self, batch: dict, batch_idx: int):
        method, kinds = self.method, self.prompt_kinds
        weak, strong, targets = batch["img"], batch["img_strong"], batch["targets"]
        # 1. frozen anchor on the weak view
        with torch.no_grad():
            anchor_embeddings, anchor_masks = segment(self.sam, None, weak, targets, kinds, self.poly_as)
        # 2. teacher on the weak view, student on the strong view
        with torch.set_grad_enabled(not self.ema_teacher):
            teacher_embeddings, teacher_masks = segment(
                self.sam, self.teacher_branch, weak, targets, kinds, self.poly_as
            )
        student_embeddings, student_masks = segment(self.sam, "student", strong, targets, kinds, self.poly_as)
        # With an EMA teacher the regularisers act on the student (the official code's commented alternative).
        regularised_embeddings, regularised_masks = (
            (student_embeddings, student_masks) if self.ema_teacher else (teacher_embeddings, teacher_masks)
        )
        terms = {"self": [], "anchor": [], "contrastive": []}
        for kind in kinds:
            for index, target in enumerate(targets):
                student_logits, student_iou = student_masks[kind][index]
                teacher_logits = teacher_masks[kind][index][0]
                anchor_logits = anchor_masks[kind][index][0]
                # 3. self-training
                terms["self"].append(
                    self_training_loss(
                        valid_region(student_logits, target),
                        valid_region(teacher_logits, target),
                        student_iou[:, 0],
                        method["focal_weight"],
                        method["dice_weight"],
                        method["iou_weight"],
                        method["loss_scaling"],
                    )
                )
                # 4. anchor and contrastive regularisation
                anchor, contrastive = wesam_regularisers(
                    student_logits,
                    regularised_masks[kind][index][0],
                    regularised_embeddings[index],
                    anchor_logits,
                    anchor_embeddings[index],
                    target,
                    method["loss_scaling"],
                    method["temperature"],
                )
                terms["anchor"].append(anchor)
                terms["contrastive"].append(contrastive)
        losses = {name: torch.stack(values).mean() for name, values in terms.items()}
        loss = (
            losses["self"]
            + method["anchor_weight"] * losses["anchor"]
            + method["contrastive_weight"] * losses["contrastive"]
        )
        self.log_dict({f"train/loss_{name}": value for name, value in losses.items()})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema_teacher:
            student = torch.nn.ModuleList(m.branches["student"] for m in lora_modules(self.sam))
            teacher = torch.nn.ModuleList(m.branches["teacher"] for m in lora_modules(self.sam))
            ema_update(teacher, student, self.method["ema_rate"])

    def on_fit_end(self) -> None:
        # The evaluated network: LoRA merged into a plain SAM state dict where it sits in the encoder blocks.
        if self.trainer.is_global_zero and self.hparams.get("run_dir"):
            save_adapted_sam(self.sam, self.teacher_branch, Path(self.hparams["run_dir"]))

    def configure_optimizers(self):
        return build_optimizer(
            branch_parameters(self.sam, "student"), [], self.hparams["optim"], self.trainer.max_steps
        )
