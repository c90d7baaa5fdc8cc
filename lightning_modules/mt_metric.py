"""Self-training via metric learning (STvM; Akkaya & Halici, arXiv 2212.04227), source-free.

Student and teacher start from the source model; the teacher is the EMA of the student. Per step:
1. the teacher predicts pseudo-labels for every pixel of the weak view of a target batch;
2. a metric network on the teacher's encoder features, with one proxy per class, is trained with a
   proxy-based metric loss on those pseudo-labels (``method.metric_trains_student``: on the student's
   features, so the loss also trains them), and scores each pseudo-label's reliability;
3. the student learns on the strong view from all pixels, each pixel's loss weighted by that reliability
   (divided by the mean reliability of its pseudo-class, so it ranks pixels within their class);
   with MOCM (on by default) the student's input is instead a ClassMix of the batch's weak views: classes drawn
   by their mean reliability, of each only its reliable pixels pasted, DACS's strong transform after the mix;
4. the teacher takes the EMA of the student.
``method.weighting=threshold`` swaps step 2 for the confidence-threshold self-training baseline, and
``method.weighting=uniform`` for weight 1 on every pixel (the mean teacher without any weighting).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch

from datamodules.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from datamodules.errors import require_choice
from lightning_modules.base import SemanticSegmentationModule
from lightning_modules.components.metric_learning import (
    class_normalised_weight,
    confidence_threshold_weight,
    correctness_histograms,
    histogram_auc,
    normalised_softmax_loss,
    proxy_anchor_loss,
    proxy_nca_loss,
    reliability_weight,
    thresholded,
    weighted_cross_entropy,
)
from lightning_modules.components.ops import class_means, labels_at, upsample
from lightning_modules.components.self_training import class_mix_masks, mix, strong_photometric
from lightning_modules.distributed import all_gather_cat, all_reduce_mean, all_reduce_sum
from lightning_modules.networks.heads import MetricHead
from lightning_modules.panels import colourised, denormalised, grid, publish, relative_grey
from lightning_modules.teachers import ema_update

log = logging.getLogger(__name__)
WEIGHTINGS = ("metric", "threshold", "uniform")
METRIC_LOSSES = ("proxy_anchor", "normalised_softmax", "proxy_nca")
MOCM_DRAWS = ("reliability", "uniform")
MOCM_PASTES = ("reliable", "whole_class")
# Score bins of the reliability AUC: thresholds with three decimals (the 0.9 of the threshold baseline) fall on a
# bin edge, so the thresholded score's AUC is exact.
AUC_BINS = 1000


class TeacherTargets(NamedTuple):
    pseudo_label: torch.Tensor  # [B, H, W] at input size
    weight: torch.Tensor  # [B, H, W] the weight of each pseudo-label in the student's loss
    confidence: torch.Tensor | None = None  # [B, H, W] the teacher's max class probability
    reliability: torch.Tensor | None = None  # [B, H, W] the metric reliability before class normalisation
    features: torch.Tensor | None = None  # [B, D, h, w] the teacher's encoder features
    feature_labels: torch.Tensor | None = None  # [B, h, w] its pseudo-labels at feature resolution


class MTMetric(SemanticSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        method = self.method
        require_choice("method.weighting", method["weighting"], WEIGHTINGS)
        require_choice("method.metric_loss", method["metric_loss"], METRIC_LOSSES)
        require_choice("method.mocm_draw", method["mocm_draw"], MOCM_DRAWS)
        require_choice("method.mocm_paste", method["mocm_paste"], MOCM_PASTES)
        self.segmenter = self.build_segmenter(method["source_ckpt"])
        self.teacher = self.frozen_copy(self.segmenter)
        self.metric_head = None
        if method["weighting"] == "metric":
            self.metric_head = MetricHead(
                self.segmenter.feature_channels, self.num_classes, method["hidden_dim"], method["embedding_dim"]
            )
        # [sum of weights, count] of correct and of incorrect teacher pseudo-labels on the target val set
        self.weight_by_correctness = torch.zeros(4)
        # per pseudo-class, histograms of the metric reliability and the teacher's confidence, by correctness
        self.correctness_counts = torch.zeros(self.num_classes, 2, 2, AUC_BINS, dtype=torch.float64)
        self.pixel_weight_summary: dict = {}
        self.reliability_auc: dict = {}
        self.last_mix: tuple | None = None  # the latest MOCM batch (images, labels, weights), drawn at evaluation
        self.replica_difference: dict = {}

    def teacher_targets(self, images: torch.Tensor, across_ranks: bool = True) -> TeacherTargets:
        """The teacher's pseudo-label for every pixel of ``images``, its weight, confidence and reliability."""
        method = self.method
        with torch.no_grad():
            logits, features = self.teacher(images)
            probabilities = upsample(logits.float(), images.shape[-2:]).softmax(1)
            confidence, pseudo_label = probabilities.max(1)
            reliability = None
            if self.metric_head is not None:
                similarity = upsample(self.metric_head(features), images.shape[-2:])
                reliability = reliability_weight(similarity, pseudo_label, method["reliability_scale"])
            if method["weighting"] == "uniform":
                weight = torch.ones_like(confidence)
            elif method["weighting"] == "threshold":
                weight = confidence_threshold_weight(probabilities, method["confidence_threshold"])
            elif method["class_normalised"]:
                weight = class_normalised_weight(reliability, pseudo_label, self.num_classes, across_ranks)
            else:
                weight = reliability
        return TeacherTargets(pseudo_label, weight, confidence, reliability, features, logits.argmax(1))

    def training_step(self, batch: dict, batch_idx: int):
        method = self.method
        target = batch["tgt"]
        # 1-2. Teacher pseudo-labels on the weak view, weighted by their reliability.
        teacher = self.teacher_targets(target["img"])
        # 3. The student learns on the strong view (with MOCM: a strong view of the mixed batch) from every pixel.
        images, pseudo_label, weight = target["img_strong"], teacher.pseudo_label, teacher.weight
        if method["mocm"]:
            images, pseudo_label, weight = self.metric_guided_class_mix(target["img"], teacher)
            self.last_mix = (images.detach(), pseudo_label, weight)
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
            losses["metric"] = self.metric_loss(self.metric_head(features), labels)
        loss = sum(losses.values())
        self.log_dict({f"train/{name}_loss": value for name, value in losses.items()})
        self.log("train/pixel_weight", teacher.weight.mean(), sync_dist=True)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def metric_loss(self, similarity: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        method = self.method
        if method["metric_loss"] == "proxy_anchor":
            return proxy_anchor_loss(similarity, labels, method["proxy_anchor_scale"], method["proxy_anchor_margin"])
        if method["metric_loss"] == "normalised_softmax":
            return normalised_softmax_loss(similarity, labels, method["softmax_loss_scale"])
        return proxy_nca_loss(similarity, labels, method["softmax_loss_scale"])

    def metric_guided_class_mix(self, weak_images: torch.Tensor, teacher: TeacherTargets):
        """MOCM: each weak view receives pixels of half of the pseudo-classes of the previous image in the batch.
        The classes are drawn with probability proportional to their mean weight, the reliability
        (``mocm_draw=uniform``: uniformly); of a drawn class only its reliable pixels are pasted, those weighing at
        least their class's mean (``mocm_paste=whole_class``: all of them, as ClassMix). Labels and weights are
        mixed alike, and the mixed image then gets the strong transform, in DACS's order: mixing two strong views
        jittered apart instead pastes each class under another image's colours."""
        method = self.method

        def partner(tensor):
            return tensor.roll(1, 0)

        preference = None
        if method["mocm_draw"] == "reliability":
            preference = partner(class_means(teacher.weight, teacher.pseudo_label, self.num_classes))
        mask = class_mix_masks(partner(teacher.pseudo_label), class_preference=preference)
        if method["mocm_paste"] == "reliable":
            # M(x) = 1[ŷ(x) drawn] · 1[w(x) >= mean{w(x') : ŷ(x') = ŷ(x)}]
            # (the tolerance keeps a class of equal weights, e.g. the unweighted teacher's, whole despite rounding)
            reliable = class_normalised_weight(teacher.weight, teacher.pseudo_label, self.num_classes) > 1 - 1e-6
            mask = mask * partner(reliable)
        pasted = mask.bool()
        mixed = strong_photometric(
            mix(mask, partner(weak_images), weak_images),
            method["color_jitter_p"],
            method["color_jitter_strength"],
            method["blur_p"],
            method["blur_sigma"],
        )
        return (
            mixed,
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
        reliability = teacher.reliability if teacher.reliability is not None else torch.zeros_like(teacher.confidence)
        scores = torch.stack([reliability[valid], teacher.confidence[valid]])
        self.correctness_counts = self.correctness_counts.to(self.device) + correctness_histograms(
            scores, correct[valid], teacher.pseudo_label[valid], self.num_classes, AUC_BINS
        )

    def summarise_reliability_auc(self) -> dict:
        """Per evaluated class, the AUC of each score for telling correct from incorrect teacher pseudo-labels: the
        metric reliability, the teacher's confidence and the threshold baseline's 0/1 weight."""
        counts = all_reduce_sum(self.correctness_counts.to(self.device))
        self.correctness_counts = torch.zeros_like(self.correctness_counts)
        auc = {
            "confidence": histogram_auc(counts[:, 1]),
            "threshold": histogram_auc(thresholded(counts[:, 1], self.method["confidence_threshold"])),
        }
        if self.metric_head is not None:
            auc["metric"] = histogram_auc(counts[:, 0])
        return {
            self.class_names[c]: {score: values[c].item() for score, values in auc.items()}
            for c in self.evaluated_classes
            if not auc["confidence"][c].isnan()
        }

    def evaluation_step(self, batch: dict) -> None:
        super().evaluation_step(batch)
        self.accumulate_weight_by_correctness(batch)

    def panel_columns(self, batch: dict) -> dict:
        """The base panel, the teacher's pseudo-labels and their weights (white = the largest in the panel)."""
        columns = super().panel_columns(batch)
        teacher = self.teacher_targets(batch["img"], across_ranks=False)
        columns["pseudo-label"] = colourised(teacher.pseudo_label)
        columns["weight"] = relative_grey(teacher.weight)
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
        self.reliability_auc = self.summarise_reliability_auc()
        for score in ("metric", "confidence", "threshold"):
            values = [per_score[score] for per_score in self.reliability_auc.values() if score in per_score]
            if values:
                self.log(f"{stage}/reliability_auc_{score}", sum(values) / len(values))
        if self.trainer.is_global_zero:
            log.info("%s teacher pseudo-labels: %s", stage, self.pixel_weight_summary)
            self.publish_mix_panel()
        super().log_evaluation(stage)

    def publish_mix_panel(self) -> None:
        """What MOCM fed the student last: mixed image | mixed pseudo-label | weight (white = the panel's largest),
        as run_dir/predictions/mocm_step_NNNNNN.png and W&B train/mocm."""
        panels = self.hparams["logger"]["panels"]
        if not panels["enabled"] or self.last_mix is None:
            return
        images, labels, weights = (tensor[: panels["images"]] for tensor in self.last_mix)
        columns = {
            "mixed image": denormalised(images, IMAGENET_MEAN, IMAGENET_STD),
            "mixed pseudo-label": colourised(labels),
            "weight": relative_grey(weights),
        }
        path = Path(self.hparams["run_dir"]) / "predictions" / f"mocm_step_{self.global_step:06d}.png"
        publish(self.trainer, "train/mocm", grid(columns), path)

    def record_results(self, stage: str, metrics: dict, extra: dict) -> None:
        super().record_results(
            stage,
            metrics,
            {
                **extra,
                "pixel_weight": self.pixel_weight_summary,
                "reliability_auc": self.reliability_auc,
                "ddp_replica_max_difference": self.replica_difference,
            },
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
