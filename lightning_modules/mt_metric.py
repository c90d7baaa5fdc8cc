"""Self-training via metric learning (STvM; Akkaya & Halici, arXiv 2212.04227), source-free.

Student and teacher start from the source model; the teacher is the EMA of the student. Per step:
1. the teacher predicts pseudo-labels for every pixel of the weak view of a target batch;
2. a metric network on the teacher's encoder features, with one proxy per class, is trained with a
   proxy-based metric loss on those pseudo-labels (``method.metric_trains_student``: on the student's
   features, so the loss also trains them), and scores each pseudo-label's reliability;
3. the student learns on the strong view from all pixels, each pixel's loss weighted by that reliability
   (divided by the mean reliability of its pseudo-class, so it ranks pixels within their class);
   with MOCM the strong views are first ClassMixed, the pasted classes drawn by their mean reliability;
4. the teacher takes the EMA of the student.
``method.weighting=threshold`` swaps step 2 for the confidence-threshold self-training baseline, and
``method.weighting=uniform`` for weight 1 on every pixel (the mean teacher without any weighting).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from datamodules.constants import IGNORE_INDEX
from datamodules.errors import ConfigError
from lightning_modules.base import SemanticSegmentationModule
from lightning_modules.components.metric_learning import (
    class_normalised_weight,
    confidence_threshold_weight,
    proxy_anchor_loss,
    reliability_weight,
    weighted_cross_entropy,
)
from lightning_modules.components.ops import class_means, labels_at, upsample
from lightning_modules.components.self_training import class_mix_masks, mix
from lightning_modules.distributed import all_gather_cat, all_reduce_mean, all_reduce_sum
from lightning_modules.networks.heads import MetricHead
from lightning_modules.panels import colourised, grey
from lightning_modules.teachers import ema_update

log = logging.getLogger(__name__)
WEIGHTINGS = ("metric", "threshold", "uniform")


class TeacherTargets(NamedTuple):
    pseudo_label: torch.Tensor  # [B, H, W] at input size
    weight: torch.Tensor  # [B, H, W] reliability of each pseudo-label
    features: torch.Tensor | None = None  # [B, D, h, w] the teacher's encoder features
    feature_labels: torch.Tensor | None = None  # [B, h, w] its pseudo-labels at feature resolution


class MTMetric(SemanticSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        method = self.method
        if method["weighting"] not in WEIGHTINGS:
            raise ConfigError(
                f"method.weighting={method['weighting']!r} is not supported; expected one of {WEIGHTINGS}"
            )
        self.segmenter = self.build_segmenter(method["source_ckpt"])
        self.teacher = self.frozen_copy(self.segmenter)
        self.metric_head = None
        if method["weighting"] == "metric":
            self.metric_head = MetricHead(
                self.segmenter.feature_channels, self.num_classes, method["hidden_dim"], method["embedding_dim"]
            )
        # [sum of weights, count] of correct and of incorrect teacher pseudo-labels on the target val set
        self.weight_by_correctness = torch.zeros(4)
        self.pixel_weight_summary: dict = {}
        self.replica_difference: dict = {}

    def teacher_targets(self, images: torch.Tensor, across_ranks: bool = True) -> TeacherTargets:
        """The teacher's pseudo-label for every pixel of ``images`` and its reliability weight."""
        method = self.method
        with torch.no_grad():
            logits, features = self.teacher(images)
            probabilities = upsample(logits.float(), images.shape[-2:]).softmax(1)
            pseudo_label = probabilities.argmax(1)
            if method["weighting"] == "uniform":
                return TeacherTargets(pseudo_label, torch.ones_like(pseudo_label, dtype=probabilities.dtype))
            if method["weighting"] == "threshold":
                return TeacherTargets(
                    pseudo_label, confidence_threshold_weight(probabilities, method["confidence_threshold"])
                )
            similarity = upsample(self.metric_head(features), images.shape[-2:])
            weight = reliability_weight(similarity, pseudo_label, method["reliability_scale"])
            if method["class_normalised"]:
                weight = class_normalised_weight(weight, pseudo_label, self.num_classes, across_ranks)
        return TeacherTargets(pseudo_label, weight, features, logits.argmax(1))

    def training_step(self, batch: dict, batch_idx: int):
        method = self.method
        target = batch["tgt"]
        # 1-2. Teacher pseudo-labels on the weak view, weighted by their reliability.
        teacher = self.teacher_targets(target["img"])
        # 3. The student learns on the strong view from every pixel.
        images, pseudo_label, weight = target["img_strong"], teacher.pseudo_label, teacher.weight
        if self.metric_head is not None and method["mocm"]:
            images, pseudo_label, weight = self.metric_guided_class_mix(images, teacher)
        student_logits, student_features = self.segmenter(images)
        losses = {
            "self_training": weighted_cross_entropy(
                upsample(student_logits, pseudo_label.shape[-2:]), pseudo_label, weight
            )
        }
        if self.metric_head is not None:
            # The metric network learns its embedding and proxies on the teacher's (slowly moving) features,
            # or on the student's, where the metric loss also trains the student's feature space.
            features, labels = (
                (student_features, labels_at(pseudo_label, student_features.shape[-2:]))
                if method["metric_trains_student"]
                else (teacher.features, teacher.feature_labels)
            )
            losses["metric"] = proxy_anchor_loss(
                self.metric_head(features), labels, method["proxy_anchor_scale"], method["proxy_anchor_margin"]
            )
        loss = sum(losses.values())
        self.log_dict({f"train/{name}_loss": value for name, value in losses.items()})
        self.log("train/pixel_weight", teacher.weight.mean(), sync_dist=True)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def metric_guided_class_mix(self, images: torch.Tensor, teacher: TeacherTargets):
        """MOCM: each image receives half of the pseudo-classes of the previous image in the batch, drawn with
        probability proportional to their mean reliability; labels and weights are mixed alike."""

        def partner(tensor):
            return tensor.roll(1, 0)

        reliability = class_means(teacher.weight, teacher.pseudo_label, self.num_classes)
        mask = class_mix_masks(partner(teacher.pseudo_label), class_preference=partner(reliability))
        pasted = mask.bool()
        return (
            mix(mask, partner(images), images),
            torch.where(pasted, partner(teacher.pseudo_label), teacher.pseudo_label),
            torch.where(pasted, partner(teacher.weight), teacher.weight),
        )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # 4. Mean teacher: theta_t <- m theta_t + (1 - m) theta_s.
        ema_update(self.teacher, self.segmenter, self.method["ema_momentum"])
        # BN statistics are rank-local (no SyncBatchNorm): average them so every rank holds the same teacher.
        for buffer in self.teacher.buffers():
            if buffer.is_floating_point():
                buffer.copy_(all_reduce_mean(buffer))

    def on_train_end(self) -> None:
        self.replica_difference = {"teacher": max_rank_difference(parameter_fingerprint(self.teacher))}
        if self.metric_head is not None:
            self.replica_difference["proxies"] = max_rank_difference(self.metric_head.proxies.detach().flatten())
        if self.trainer.is_global_zero:
            log.info("largest difference between ranks after training: %s", self.replica_difference)

    def accumulate_weight_by_correctness(self, batch: dict) -> None:
        # Evaluation shards differ in batch count between ranks, so no per-batch collective here.
        teacher = self.teacher_targets(batch["img"], across_ranks=False)
        valid = batch["mask"] != IGNORE_INDEX
        correct = (teacher.pseudo_label == batch["mask"]) & valid
        incorrect = valid & ~correct
        self.weight_by_correctness = (
            self.weight_by_correctness.to(self.device)
            + torch.stack(
                [(teacher.weight * correct).sum(), correct.sum(), (teacher.weight * incorrect).sum(), incorrect.sum()]
            ).float()
        )

    def evaluation_step(self, batch: dict) -> None:
        super().evaluation_step(batch)
        self.accumulate_weight_by_correctness(batch)

    def panel_columns(self, batch: dict) -> dict:
        """The base panel, the teacher's pseudo-labels and their weights (white = the largest in the panel)."""
        columns = super().panel_columns(batch)
        teacher = self.teacher_targets(batch["img"], across_ranks=False)
        columns["pseudo-label"] = colourised(teacher.pseudo_label)
        columns["weight"] = grey(teacher.weight / teacher.weight.max().clamp(min=1e-12))
        return columns

    def log_evaluation(self, stage: str) -> None:
        weight_correct, correct, weight_incorrect, incorrect = all_reduce_sum(
            self.weight_by_correctness.to(self.device)
        )
        self.weight_by_correctness = torch.zeros(4)
        self.pixel_weight_summary = {
            "weight_correct": (weight_correct / correct.clamp(min=1)).item(),
            "weight_incorrect": (weight_incorrect / incorrect.clamp(min=1)).item(),
            "pseudo_label_accuracy": (correct / (correct + incorrect).clamp(min=1)).item(),
        }
        self.log_dict({f"{stage}/{name}": value for name, value in self.pixel_weight_summary.items()})
        if self.trainer.is_global_zero:
            log.info("%s teacher pseudo-labels: %s", stage, self.pixel_weight_summary)
        super().log_evaluation(stage)

    def record_results(self, stage: str, metrics: dict, extra: dict) -> None:
        super().record_results(
            stage,
            metrics,
            {**extra, "pixel_weight": self.pixel_weight_summary, "ddp_replica_max_difference": self.replica_difference},
        )


def parameter_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """Sum and position-weighted sum of each parameter and buffer: a few numbers that change with any weight."""
    tensors = [t.detach().double().flatten() for t in (*module.parameters(), *module.buffers())]
    return torch.stack(
        [
            torch.stack([t.sum(), (t * torch.linspace(1, 2, t.numel(), dtype=t.dtype, device=t.device)).sum()])
            for t in tensors
        ]
    ).flatten()


def max_rank_difference(values: torch.Tensor) -> float:
    """Largest absolute difference of ``values`` between any rank and rank 0 (0.0 in one process)."""
    gathered = all_gather_cat(values.unsqueeze(0))
    return (gathered - gathered[0]).abs().max().item()
