"""What every method shares: evaluation, optimiser/schedule building and checkpoint loading.

Semantic tasks are scored from one confusion matrix (torchmetrics, summed over DDP ranks) as per-class
IoU and mIoU over each of the task's class subsets (19 / 16 / 13). SAM tasks are scored per prompt
kind as WeSAM does: per image the mean IoU over its instances, then the mean over images.
"""
from __future__ import annotations

import copy
import importlib
import logging
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from datamodules.datasets.base import IGNORE_INDEX
from datamodules.datasets.labels import CITYSCAPES_CLASSES
from lightning_modules.components.sam import unpadded

log = logging.getLogger(__name__)


def per_class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU_c = TP_c / (TP_c + FP_c + FN_c) from a [C, C] (true x predicted) matrix; NaN where c never occurs."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_iou(iou: torch.Tensor, classes) -> float:
    """Mean over the evaluated classes that occur in ground truth or prediction."""
    return torch.nanmean(iou[list(classes)]).item()


def instance_iou(mask_logits: torch.Tensor, instances: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of each predicted mask (logits > SAM's mask_threshold) with its ground truth, [N]."""
    predicted = mask_logits > threshold
    truth = instances > 0.5
    intersection = (predicted & truth).flatten(1).sum(1)
    union = (predicted | truth).flatten(1).sum(1)
    return intersection / union.clamp(min=1)


def poly_lr_lambda(max_steps: int, power: float, warmup_steps: int):
    """Linear warm-up, then DeepLab's poly decay (1 - t/T)^power."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1 - step / max(1, max_steps)) ** power
    return factor


def build_optimizer(backbone_params, head_params, optim: dict, max_steps: int):
    """SGD (DeepLabV2 papers) or AdamW (DAFormer family); the head runs at ``head_lr_mult`` x lr."""
    groups = [
        {"params": [p for p in backbone_params if p.requires_grad], "lr": optim["lr"]},
        {"params": [p for p in head_params if p.requires_grad], "lr": optim["lr"] * optim["head_lr_mult"]},
    ]
    groups = [g for g in groups if g["params"]]
    if optim["name"] == "sgd":
        optimizer = torch.optim.SGD(groups, lr=optim["lr"], momentum=optim["momentum"],
                                    weight_decay=optim["weight_decay"])
    elif optim["name"] == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=optim["lr"], weight_decay=optim["weight_decay"],
                                      betas=tuple(optim.get("betas", (0.9, 0.999))))
    else:
        raise ValueError(f"optim.name={optim['name']!r} is not supported; expected 'sgd' or 'adamw'")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lr_lambda(max_steps, optim["poly_power"], optim["warmup_steps"]))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def load_state_from_checkpoint(path: str, prefix: str = "") -> dict:
    """Tensors of a Lightning .ckpt (or a plain state dict) whose keys start with ``prefix``, prefix removed."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        raise KeyError(f"checkpoint {path} holds no weights under '{prefix}'; keys start with "
                       f"{sorted({k.split('.')[0] for k in state})}")
    return selected


def build_segmenter(model: dict, num_classes: int) -> nn.Module:
    """The network named by ``model.builder`` in configs/network/*.yaml.

    Contract of every segmenter: ``forward(images) -> (logits at the feature resolution, features)``
    and a ``backbone`` attribute (the parameters trained at the base learning rate).
    """
    module_path, name = model["builder"].rsplit(".", 1)
    return getattr(importlib.import_module(module_path), name)(model, num_classes)


def load_segmenter_weights(segmenter: nn.Module, path: str) -> None:
    """Start from the ``segmenter`` of another run's checkpoint (e.g. source_only's last.ckpt)."""
    segmenter.load_state_dict(load_state_from_checkpoint(path, "segmenter."))
    log.info("segmenter weights loaded from %s", path)


def labelling_mode(module: nn.Module) -> nn.Module:
    """A teacher labels as DAFormer's mean teacher does (mmseg/models/uda/dacs.py): dropout and drop-path
    off, BatchNorm normalising with the statistics of the batch being labelled, in training and in the
    validation-time measurements of its labels alike. Networks that freeze BN (the papers' DeepLabV2)
    label in plain eval mode."""
    module.eval()
    if getattr(module, "freeze_bn", False):
        return module
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            # Batch statistics without touching the running averages (those come from the student).
            layer.track_running_stats = False
            layer.train()
    return module


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Mean teacher (Tarvainen & Valpola 2017): theta_t <- m theta_t + (1 - m) theta_s; buffers copied.

    Under DDP every rank holds the same student after the gradient all-reduce (and DDP broadcasts
    buffers from rank 0), so the teachers stay identical across ranks without communication.
    """
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters()):
        teacher_param.lerp_(student_param.detach(), 1 - momentum)
    for teacher_buffer, student_buffer in zip(teacher.buffers(), student.buffers()):
        teacher_buffer.copy_(student_buffer)


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
        self.last_results = {"method": self.hparams["method"]["name"], "task": self.hparams["task"]["name"],
                             "kind": self.hparams["task"]["kind"], "seed": self.hparams["seed"],
                             "trained": self.hparams.get("train", True), "global_step": self.global_step,
                             "stage": stage, "metrics": metrics, **extra}


class SemanticSegmentationModule(EvaluationMixin, L.LightningModule):
    """Base of every semantic method: ``forward`` gives logits at input size; evaluation is shared."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.save_hyperparameters(cfg)
        task = cfg["task"]
        self.num_classes = task["num_classes"]
        self.class_names = list(CITYSCAPES_CLASSES)
        self.eval_subsets = {name: list(classes) for name, classes in task["eval_subsets"].items()}
        self.confusion = MulticlassConfusionMatrix(self.num_classes, ignore_index=IGNORE_INDEX)

    def build_segmenter(self) -> nn.Module:
        """The configured network, started from ``method.source_ckpt`` when the method has one set."""
        segmenter = build_segmenter(self.hparams["model"], self.num_classes)
        if self.hparams["method"].get("source_ckpt"):
            load_segmenter_weights(segmenter, self.hparams["method"]["source_ckpt"])
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

    def log_evaluation(self, stage: str) -> None:
        iou = per_class_iou(self.confusion.compute())
        self.confusion.reset()
        metrics = {name: 100 * mean_iou(iou, classes) for name, classes in self.eval_subsets.items()}
        evaluated = sorted({c for classes in self.eval_subsets.values() for c in classes})
        per_class = {self.class_names[c]: 100 * iou[c].item() for c in evaluated}
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False, prog_bar=True)
        self.log_dict({f"{stage}/IoU/{k}": (v if not math.isnan(v) else 0.0) for k, v in per_class.items()})
        self.record_results(stage, metrics, {"per_class_iou": per_class})
        if self.trainer.is_global_zero:
            log.info("%s: %s | per-class IoU: %s", stage, format_metrics(metrics), format_metrics(per_class))

    def configure_optimizers(self):
        backbone = list(self.segmenter.backbone.parameters())
        backbone_ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in backbone_ids]
        return build_optimizer(backbone, head, self.hparams["optim"], self.trainer.max_steps)


class PromptedSegmentationModule(EvaluationMixin, L.LightningModule):
    """Base of every SAM method: IoU per prompt kind, their average (and gain, in experiments.report)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.save_hyperparameters(cfg)
        self.prompt_kinds = list(cfg["task"]["prompt_kinds"])
        self.prompt_iou = torch.nn.ModuleDict({kind: MeanMetric() for kind in self.prompt_kinds})

    def predict(self, images: torch.Tensor, targets: list, kind: str) -> list:
        """Mask logits [N_i, S, S] per image for one prompt kind; implemented by each method."""
        raise NotImplementedError

    def evaluation_step(self, batch: dict) -> None:
        for kind in self.prompt_kinds:
            for logits, target in zip(self.predict(batch["img"], batch["targets"], kind), batch["targets"]):
                iou = instance_iou(unpadded(logits[:, 0], target), unpadded(target["instances"], target))
                self.prompt_iou[kind].update(iou.mean())

    def log_evaluation(self, stage: str) -> None:
        metrics = {kind: 100 * self.prompt_iou[kind].compute().item() for kind in self.prompt_kinds}
        for metric in self.prompt_iou.values():
            metric.reset()
        metrics["avg"] = sum(metrics.values()) / len(self.prompt_kinds)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=True)
        self.record_results(stage, metrics, {})
        if self.trainer.is_global_zero:
            log.info("%s: %s", stage, format_metrics(metrics))


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
