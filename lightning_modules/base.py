"""The two base classes every method subclasses: semantic segmentation (mIoU over a confusion matrix) and prompted
segmentation with SAM (IoU per prompt kind). Both evaluate the same way for every method; a method adds its
``training_step`` and, where it needs them, its own evaluation measurements.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from datamodules.constants import (
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
)
from datamodules.errors import ConfigError, DatasetLayoutError
from lightning_modules.components.ops import unpadded, upsample
from lightning_modules.metrics import instance_iou, mean_iou, per_class_iou
from lightning_modules.networks.factory import build_network, load_segmenter_weights
from lightning_modules.networks.sam import PROMPT_KINDS, predict_instances
from lightning_modules.optim import build_optimizer
from lightning_modules.panels import colourised, denormalised, instance_overlay, prompted_views
from lightning_modules.teachers import labelling_mode


class EvaluationMixin:
    """Validation and test run ``evaluation_step`` per batch and ``log_evaluation`` per epoch, both given by
    the subclass; the metrics of the last evaluation stay in ``last_results`` (experiments.run writes
    results.json)."""

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")

    def record_results(self, stage: str, metrics: dict, extra: dict) -> None:
        self.last_results = {
            "method": self.method["name"],
            "task": self.hparams["task"]["name"],
            "kind": self.hparams["task"]["kind"],
            "seed": self.hparams["seed"],
            "trained": self.hparams.get("train", True),
            "global_step": self.global_step,
            "stage": stage,
            "metrics": metrics,
            **extra,
        }


class SemanticSegmentationModule(EvaluationMixin, L.LightningModule):
    """Base of every semantic method: ``forward`` gives logits at input size; evaluation is shared."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.save_hyperparameters(cfg)
        self.method = self.hparams["method"]
        task = cfg["task"]
        self.num_classes = task["num_classes"]
        self.class_names = list(CITYSCAPES_CLASSES)
        self.eval_subsets = {name: list(classes) for name, classes in task["eval_subsets"].items()}
        self.evaluated_classes = sorted({c for classes in self.eval_subsets.values() for c in classes})
        self.confusion = MulticlassConfusionMatrix(self.num_classes, ignore_index=IGNORE_INDEX)

    def build_segmenter(self, checkpoint: str | None) -> nn.Module:
        """The configured network (``model``), started from the ``segmenter`` of ``checkpoint`` when one is given."""
        segmenter = build_network(self.hparams["model"], self.num_classes)
        if checkpoint:
            load_segmenter_weights(segmenter, checkpoint, self.hparams["model"])
        return segmenter

    def frozen_copy(self, module: nn.Module) -> nn.Module:
        """A gradient-free copy for a teacher or labeler that only predicts (see ``labelling_mode``)."""
        clone = labelling_mode(copy.deepcopy(module).requires_grad_(False))
        self._labellers = getattr(self, "_labellers", []) + [clone]
        return clone

    def train(self, mode: bool = True):
        # Lightning (>= 2.2) keeps the modes a module was built with and restores them per submodule after
        # validation, so labellers are built in their mode (frozen_copy) and kept in it here, also in eval.
        super().train(mode)
        for module in getattr(self, "_labellers", []):
            labelling_mode(module)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, _ = self.segmenter(images)
        return upsample(logits, images.shape[-2:])

    def supervised_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(upsample(logits, mask.shape[-2:]), mask, ignore_index=IGNORE_INDEX)

    def evaluation_step(self, batch: dict) -> None:
        self.confusion.update(self(batch["img"]).argmax(1), batch["mask"])

    def panel_columns(self, batch: dict) -> dict:
        """The named views of a val batch in the prediction panels (lightning_modules/panels.py), RGB [B, H, W, 3]
        each; a self-training method adds the targets it learns from to these."""
        images = batch["img"]
        return {
            "image": denormalised(images, IMAGENET_MEAN, IMAGENET_STD),
            "ground truth": colourised(batch["mask"]),
            "prediction": colourised(self(images).argmax(1)),
        }

    def log_evaluation(self, stage: str) -> None:
        confusion = self.confusion.compute()
        self.confusion.reset()
        if confusion.sum() == 0 and not self.trainer.sanity_checking:
            raise DatasetLayoutError(
                f"the {stage} split {self.hparams['data']['val']} has no pixel labelled with a class of the task "
                "(every label is ignore or outside the id table): check its label files"
            )
        iou = per_class_iou(confusion)
        metrics = {name: 100 * mean_iou(iou, classes) for name, classes in self.eval_subsets.items()}
        per_class = {self.class_names[c]: 100 * iou[c].item() for c in self.evaluated_classes}
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False, prog_bar=True)
        self.log_dict({f"{stage}/IoU/{k}": (v if not math.isnan(v) else 0.0) for k, v in per_class.items()})
        self.record_results(stage, metrics, {"per_class_iou": per_class})

    def configure_optimizers(self):
        """Backbone at lr, every other trainable parameter (head, method modules) at the head's rate; backbone
        parameters whose name holds one of ``optim.no_decay_keys`` (mmcv's ``decay_mult=0`` keys) without decay."""
        optim = self.hparams["optim"]
        exempt_keys = optim.get("no_decay_keys") or ()
        backbone, undecayed = [], []
        for name, parameter in self.segmenter.backbone.named_parameters():
            (undecayed if any(key in name for key in exempt_keys) else backbone).append(parameter)
        backbone_ids = {id(p) for p in backbone + undecayed}
        head = [p for p in self.parameters() if id(p) not in backbone_ids]
        return build_optimizer(backbone, head, optim, self.trainer.max_steps, undecayed)


class PromptedSegmentationModule(EvaluationMixin, L.LightningModule):
    """Base of every SAM method: IoU per prompt kind, their average (and gain, in experiments.report).

    A method holds its SAM as ``self.sam`` with ``self.poly_as`` and says which encoder is scored in ``embed``.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.save_hyperparameters(cfg)
        self.method = self.hparams["method"]
        self.prompt_kinds = list(cfg["task"]["prompt_kinds"])
        if not self.prompt_kinds or not set(self.prompt_kinds) <= set(PROMPT_KINDS):
            raise ConfigError(f"task.prompt_kinds={self.prompt_kinds}; expected one or more of {PROMPT_KINDS}")
        self.logit_threshold = cfg["task"]["logit_threshold"]
        self.prompt_iou = torch.nn.ModuleDict({kind: MeanMetric() for kind in self.prompt_kinds})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, C, h, w] of the evaluated SAM (``self.sam``); implemented by each method."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor, targets: list) -> dict:
        """{kind: mask logits [N_i, 1, S, S] per image} for every prompt kind, from one encoder pass."""
        embeddings = self.embed(images)
        return {
            kind: predict_instances(self.sam, embeddings, targets, kind, self.poly_as) for kind in self.prompt_kinds
        }

    def evaluation_step(self, batch: dict) -> None:
        for kind, predictions in self.predict(batch["img"], batch["targets"]).items():
            for logits, target in zip(predictions, batch["targets"]):
                iou = instance_iou(
                    unpadded(logits[:, 0], target), unpadded(target["instances"], target), self.logit_threshold
                )
                self.prompt_iou[kind].update(iou.mean())

    def panel_columns(self, batch: dict) -> dict:
        """The named views of a val batch in the prediction panels: the ground-truth instances, then per prompt kind
        the predicted masks with the prompts drawn (RGB [B, S, S, 3] each, padding included)."""
        images, targets = denormalised(batch["img"], SAM_PIXEL_MEAN, SAM_PIXEL_STD, peak=255), batch["targets"]
        columns = {
            "image": images,
            "ground truth": np.stack([instance_overlay(i, t["instances"] > 0.5) for i, t in zip(images, targets)]),
        }
        for kind, predictions in self.predict(batch["img"], targets).items():
            masks = [logits[:, 0] > self.logit_threshold for logits in predictions]
            columns[kind] = prompted_views(images, targets, masks, kind)
        return columns

    def log_evaluation(self, stage: str) -> None:
        metrics = {kind: 100 * self.prompt_iou[kind].compute().item() for kind in self.prompt_kinds}
        for metric in self.prompt_iou.values():
            metric.reset()
        metrics["avg"] = sum(metrics.values()) / len(self.prompt_kinds)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=True)
        self.record_results(stage, metrics, {})
