"""Dual collaborative LoRA networks for source-free SAM adaptation (Liu et al., ICML 2025).

Per step (the paper's method box):
1. alpha, beta = frozen SAM encoder gamma (perturbed) + their own LoRA; gamma is the untouched encoder.
2. The augmented target image goes through alpha and beta, the weak view through gamma; each decodes masks from
   the GT-derived prompts (``method.branch_view``: strong, three encoder passes as WeSAM's; weak, both branches on
   the weak view and the Student on the strong view in a fourth pass).
3. Foreground representation f = mean of the embedding over pixels whose mask score > T.
4. Role assignment: the branch whose f is more cosine-similar to gamma's is Teacher, the other Student; per
   image by default (f and sim are per feature map in the paper), so each step both branches learn.
5. Direct alignment (the student's masks on the strong view learn the teacher's), reverse distillation (the
   teacher's representation is pushed from the student's), triplet loss (student foreground near the
   teacher's foreground, far from its background); each switchable for the ablation table. Under all three,
   WeSAM's regularisers hold both roles to gamma (``method.anchor_regularisation``): with them, the direct
   alignment is WeSAM's self-training with its teacher (the student itself) replaced by the image's Teacher branch.
6. The branch with the better performance is the target model, saved with the SAM (merged into a plain SAM
   checkpoint where its LoRA sits in the encoder blocks). With no target labels, performance is SAM's own
   estimate: its IoU head's prediction, averaged over recent steps.

Views, prompts and loss scaling follow WeSAM's code, the framework the paper builds on and compares with
(``data.sam_views``, ``method.loss_scaling``); a run with ``task.prompt_kinds=[box]`` adapts for one prompt kind.
``method.lora.placement``: "output" (default) puts each branch's LoRA after the frozen encoder, on its output
embedding, as the slides draw it (E = perturb(E_img) + Delta E); "blocks" puts it on q, v of the encoder blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from datamodules.errors import ConfigError, require_choice
from lightning_modules.base import PromptedSegmentationModule
from lightning_modules.components.sam_adaptation import (
    LOSS_SCALINGS,
    alpha_is_teacher,
    background_representations,
    branch_similarity,
    foreground_representations,
    reverse_distillation_loss,
    self_training_loss,
    triplet_loss,
    valid_region,
    wesam_regularisers,
)
from lightning_modules.distributed import all_reduce_sum
from lightning_modules.networks.sam import build_configured_sam
from lightning_modules.networks.sam_lora import (
    branch_parameters,
    encode,
    inject_configured_lora,
    save_adapted_sam,
    segment,
)
from lightning_modules.optim import build_optimizer

BRANCHES = ("alpha", "beta")
ROLES = ("image", "batch")
SELECTIONS = ("predicted_iou", "teacher_count")
BRANCH_VIEWS = ("strong", "weak")


def other_branch(branch: str) -> str:
    return BRANCHES[1 - BRANCHES.index(branch)]


class DualLoRASAM(PromptedSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        model, method = cfg["model"], self.method
        self.sam = build_configured_sam(model)
        self.poly_as = model["poly_as"]
        self.sam.requires_grad_(False)  # prompt encoder and mask decoder stay as SAM's; only LoRA trains
        require_choice("method.loss_scaling", method["loss_scaling"], LOSS_SCALINGS)
        require_choice("method.roles", method["roles"], ROLES)
        require_choice("method.selection", method["selection"], SELECTIONS)
        require_choice("method.branch_view", method["branch_view"], BRANCH_VIEWS)
        if not any(method[term] for term in ("direct_alignment", "reverse_distillation", "triplet")):
            # WeSAM's regularisers alone would only hold both branches at gamma
            raise ConfigError(
                "method.direct_alignment, method.reverse_distillation and method.triplet are all false; "
                "enable at least one loss"
            )
        inject_configured_lora(self.sam, list(BRANCHES), method["lora"], method["perturbation"])
        # Step 6's two criteria, kept in checkpoints: images each branch taught, and the running mean of each
        # branch's predicted IoU on the branch view (an EMA from zero: its bias is the same for both branches).
        self.register_buffer("teacher_counts", torch.zeros(len(BRANCHES)))
        self.register_buffer("predicted_iou", torch.zeros(len(BRANCHES)))

    @property
    def selected_branch(self) -> str:
        scores = self.teacher_counts if self.method["selection"] == "teacher_count" else self.predicted_iou
        return BRANCHES[int(scores.argmax())]

    def track_predicted_iou(self, masks: dict) -> None:
        """EMA of each branch's mean predicted IoU over the step's instances, every rank's included."""
        predictions = [
            torch.cat([iou.detach().flatten() for per_image in masks[b].values() for _, iou in per_image])
            for b in BRANCHES
        ]
        count = predictions[0].new_tensor(predictions[0].numel())
        totals = all_reduce_sum(torch.stack([predictions[0].sum(), predictions[1].sum(), count]))
        rate = self.method["predicted_iou_ema"]
        self.predicted_iou.mul_(rate).add_((1 - rate) * totals[:2] / totals[2])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.sam, self.selected_branch, images)

    def representations(self, embeddings: torch.Tensor, masks: dict) -> tuple:
        """Foreground (f) and background (b) representations [sum N, C] over all prompt kinds and images, their
        validity [sum N] and the index of each row's image [sum N]."""
        threshold = self.method["foreground_threshold"]
        fg, bg, valid, image = [], [], [], []
        for per_image in masks.values():
            for index, (embedding, (logits, _)) in enumerate(zip(embeddings, per_image)):
                f, f_valid = foreground_representations(embedding, logits, threshold)
                b, b_valid = background_representations(embedding, logits, threshold)
                fg.append(f), bg.append(b), valid.append(f_valid & b_valid)
                image.append(torch.full_like(f_valid, index, dtype=torch.long))
        return torch.cat(fg), torch.cat(bg), torch.cat(valid), torch.cat(image)

    def role_similarities(self, sims: torch.Tensor, valid: torch.Tensor, image: torch.Tensor, images: int):
        """Step 4's sim of each branch [2, images] from per-instance sims [2, sum N].

        image: each image's instances and prompt kinds summed (f and sim are per feature map); batch: one value
        for the whole step, summed over the batch and every rank, so every rank assigns the same roles.
        """
        sims = sims * valid
        if self.method["roles"] == "batch":
            return all_reduce_sum(sims.sum(1))[:, None].expand(-1, images)
        return sims.new_zeros(len(BRANCHES), images).index_add_(1, image, sims)

    def student_masks(self, strong: torch.Tensor, masks: dict, targets: list, teacher_of: list) -> dict:
        """{image index: {kind: (mask logits, IoU predictions)}} of each image's Student on the strong view: from the
        branches' own pass (branch_view strong), or one more pass per branch on the strong view (weak)."""
        if self.method["branch_view"] == "strong":
            return {
                i: {kind: masks[other_branch(teacher)][kind][i] for kind in self.prompt_kinds}
                for i, teacher in enumerate(teacher_of)
            }
        if not (self.method["direct_alignment"] or self.method["anchor_regularisation"]):
            return {}
        by_image = {}
        for student in BRANCHES:
            taught = [i for i, teacher in enumerate(teacher_of) if teacher != student]
            if not taught:
                continue
            _, strong_masks = segment(
                self.sam, student, strong[taught], [targets[i] for i in taught], self.prompt_kinds, self.poly_as
            )
            for j, i in enumerate(taught):
                by_image[i] = {kind: strong_masks[kind][j] for kind in self.prompt_kinds}
        return by_image

    def direct_alignment(self, student_masks: dict, masks: dict, teacher_of: list, targets: list) -> torch.Tensor:
        """L_da: WeSAM's self-training loss of each image's Student (strong view) against its Teacher's binarised
        masks on the branch view, averaged over the images and prompt kinds."""
        method = self.method
        return torch.stack(
            [
                self_training_loss(
                    valid_region(student_masks[i][kind][0], target),
                    valid_region(masks[teacher_of[i]][kind][i][0], target),
                    student_masks[i][kind][1][:, 0],
                    method["focal_weight"],
                    method["dice_weight"],
                    method["iou_weight"],
                    method["loss_scaling"],
                )
                for kind in self.prompt_kinds
                for i, target in enumerate(targets)
            ]
        ).mean()

    def anchor_regularisers(
        self, student_masks, masks, embeddings, gamma_embeddings, gamma_masks, teacher_of, targets
    ) -> dict:
        """WeSAM's two regularisers with its teacher replaced by each image's Teacher branch: the anchor dice
        of the Student's strong-view and the Teacher's branch-view masks to gamma's, and the instance contrast of the
        Teacher's branch-view embedding against gamma's (WeSAM adaptation.py, weights 1 and 1)."""
        method, anchor, contrastive = self.method, [], []
        for kind in self.prompt_kinds:
            for i, target in enumerate(targets):
                image_anchor, image_contrastive = wesam_regularisers(
                    student_masks[i][kind][0],
                    masks[teacher_of[i]][kind][i][0],
                    embeddings[teacher_of[i]][i],
                    gamma_masks[kind][i][0],
                    gamma_embeddings[i],
                    target,
                    method["loss_scaling"],
                    method["temperature"],
                )
                anchor.append(image_anchor)
                contrastive.append(image_contrastive)
        return {
            "anchor": method["anchor_weight"] * torch.stack(anchor).mean(),
            "contrastive": method["contrastive_weight"] * torch.stack(contrastive).mean(),
        }

    def training_step(self, batch: dict, batch_idx: int):
        method, kinds = self.method, self.prompt_kinds
        weak, strong, targets = batch["img"], batch["img_strong"], batch["targets"]
        # 2. weak view through gamma (frozen), the branch view through the two collaborative encoders
        with torch.no_grad():
            gamma_embeddings, gamma_masks = segment(self.sam, None, weak, targets, kinds, self.poly_as)
        branch_images = strong if method["branch_view"] == "strong" else weak
        embeddings, masks = {}, {}
        for b in BRANCHES:
            embeddings[b], masks[b] = segment(self.sam, b, branch_images, targets, kinds, self.poly_as)
        self.track_predicted_iou(masks)
        # 3. foreground representations
        f_gamma, _, valid, image = self.representations(gamma_embeddings, gamma_masks)
        reps = {b: self.representations(embeddings[b], masks[b]) for b in BRANCHES}
        for b in BRANCHES:
            valid = valid & reps[b][2]
        # 4. role assignment
        sims = torch.stack([branch_similarity(reps[b][0].detach(), f_gamma) for b in BRANCHES])
        alpha_teaches = alpha_is_teacher(*self.role_similarities(sims, valid, image, len(targets)))
        teacher_images = all_reduce_sum(torch.stack([alpha_teaches.sum(), (~alpha_teaches).sum()]).float())
        self.teacher_counts += teacher_images
        teacher_of = ["alpha" if a else "beta" for a in alpha_teaches.tolist()]
        # 5. losses
        losses = {}
        student_masks = self.student_masks(strong, masks, targets, teacher_of)
        if method["direct_alignment"]:
            losses["direct"] = method["lambda_direct"] * self.direct_alignment(
                student_masks, masks, teacher_of, targets
            )
        if method["anchor_regularisation"]:
            losses.update(
                self.anchor_regularisers(
                    student_masks, masks, embeddings, gamma_embeddings, gamma_masks, teacher_of, targets
                )
            )
        row_alpha_teaches = alpha_teaches[image][:, None]
        (f_alpha, b_alpha, *_), (f_beta, b_beta, *_) = reps["alpha"], reps["beta"]
        f_teacher = torch.where(row_alpha_teaches, f_alpha, f_beta)
        b_teacher = torch.where(row_alpha_teaches, b_alpha, b_beta)
        f_student = torch.where(row_alpha_teaches, f_beta, f_alpha)
        if method["reverse_distillation"]:
            losses["reverse"] = method["lambda_reverse"] * reverse_distillation_loss(f_teacher, f_student, valid)
        if method["triplet"]:
            losses["triplet"] = method["lambda_triplet"] * triplet_loss(
                f_student, f_teacher, b_teacher, method["margin"], valid
            )
        loss = sum(losses.values())
        self.log_dict({f"train/loss_{name}": value for name, value in losses.items()})
        self.log_dict(
            {
                "train/alpha_teacher_share": teacher_images[0] / teacher_images.sum(),
                "train/alpha_teacher_rate": self.teacher_counts[0] / self.teacher_counts.sum(),
                "train/predicted_iou_alpha": self.predicted_iou[0],
                "train/predicted_iou_beta": self.predicted_iou[1],
            }
        )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_fit_end(self) -> None:
        # 6. the selected branch is the target model
        if self.trainer.is_global_zero and self.hparams.get("run_dir"):
            save_adapted_sam(self.sam, self.selected_branch, Path(self.hparams["run_dir"]))

    def configure_optimizers(self):
        trainable = [p for b in BRANCHES for p in branch_parameters(self.sam, b)]
        return build_optimizer(trainable, [], self.hparams["optim"], self.trainer.max_steps)
