"""BiCL: bi-directional pixel-prototype contrastive learning (Lee, Eom, Lee, Park, Ham; ECCV 2022).

DeepLabV2; the pixel features of the contrast are its four ASPP branches' logits, concatenated (the
authors' code), or a projection head on the backbone features (``method.contrast_features``). Each step:
source CE + target CE on hybrid pseudo-labels y_T (L_base); batch prototypes rho_S (source labels) and
rho_T (y_T); forward contrast (target pixels vs rho_S) and backward contrast (source pixels vs rho_T).
y_T takes the dynamic label y_D (pixel matched to a calibrated source prototype rho_S + mu_T - mu_S above
the threshold T) and falls back to the static label y_F of the model at the start of the self-training round.

Static labels (``method.static_labels``): ``offline``, as the authors' code makes them (DASS
trainer/damnet_trainer.py gene_thres + save_pred), are written once per round before training: a first pass over
the whole target train set gives CBST class-wise thresholds (top ``cb_proportion`` of each predicted class, every
5th pixel), a second labels each image at its full size with the union of those thresholds and the image's own top
``cb_proportion`` of pixels. Training reads them through the ``pl`` stream, so no labeler runs per step. One run is
one round; ``stage=static_labels`` writes a round's labels alone. ``online`` estimates the class-wise thresholds
from the training crops seen so far this round and labels each crop by a frozen labeler's pass per step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.constants import IGNORE_INDEX
from datamodules.datasets.base import read_label
from datamodules.datasets.pseudo_labelled import pseudo_label_path
from datamodules.errors import ConfigError, require_choice
from datamodules.files import file_digest, save_json, save_label_png
from datamodules.labelling import TargetTrainImages, claim_label_dir, collate_images
from datamodules.loading import build_evaluation_loader
from lightning_modules.base import SemanticSegmentationModule
from lightning_modules.components.losses import pixel_entropy
from lightning_modules.components.ops import labels_at, pixels, upsample
from lightning_modules.components.prototypes import (
    batch_prototypes,
    calibrated_source_prototypes,
    calibration,
    class_balanced_thresholds,
    class_top_fraction_thresholds,
    confidence_histogram,
    dynamic_pseudo_labels,
    ema_prototype_memory,
    hybrid_pseudo_labels,
    image_prototypes,
    paired_prototype_contrast_loss,
    prototype_contrast_loss,
    static_pseudo_labels,
    union_static_labels,
)
from lightning_modules.distributed import all_gather_cat, all_reduce_mean, all_reduce_sum
from lightning_modules.networks.heads import ProjectionHead
from lightning_modules.panels import colourised

PSEUDO_LABEL_KINDS = ("static", "dynamic_uncalibrated", "dynamic", "hybrid")
CONTRAST_FEATURES = ("projection", "aspp")
ENTROPY_READINGS = ("paper", "code", "shannon")
# batch: prototypes of the whole batch, pooled over ranks; image: per source / target image pair (the authors' code).
PROTOTYPE_PAIRINGS = ("batch", "image")
STATIC_LABEL_MODES = ("offline", "online")
CLASS_TESTS = ("any_class", "argmax")
THRESHOLDS_FILE = "thresholds.json"
RESULTS_FILE = "static_label_results.json"
# DASS gene_thres keeps every 5th class-wise confidence of each image to bound its memory; the same sampling here.
THRESHOLD_PIXEL_STRIDE = 5


class BiCL(SemanticSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        require_choice("method.contrast_features", self.method["contrast_features"], CONTRAST_FEATURES)
        require_choice("method.entropy", self.method["entropy"], ENTROPY_READINGS)
        require_choice("method.prototype_pairing", self.method["prototype_pairing"], PROTOTYPE_PAIRINGS)
        require_choice("method.static_labels", self.method["static_labels"], STATIC_LABEL_MODES)
        require_choice("method.static_class_test", self.method["static_class_test"], CLASS_TESTS)
        self.offline = self.method["static_labels"] == "offline"
        stream = "pl" if self.offline else "tgt"
        if stream not in self.method["streams"]:
            raise ConfigError(
                f"method.static_labels={self.method['static_labels']} trains on the '{stream}' stream, but "
                f"method.streams={list(self.method['streams'])}; expected [src, {stream}]"
            )
        if self.offline and cfg["trainer"]["max_steps"] > self.method["round_steps"]:
            raise ConfigError(
                f"trainer.max_steps={cfg['trainer']['max_steps']} is more than one self-training round "
                f"(method.round_steps={self.method['round_steps']}), and offline static labels are written once per "
                "run; expected one round per run, each next round from the last one's last.ckpt as "
                "method.source_ckpt (or method.static_labels=online method.streams=[src,tgt])"
            )
        self.label_dir = Path(self.method["label_dir"])
        self.segmenter = self.build_segmenter(self.method["source_ckpt"])
        classes = self.num_classes
        self.projector = None
        if self.method["contrast_features"] == "projection":
            channels, hidden, dim = (
                self.segmenter.feature_channels,
                self.method["projection_hidden_dim"],
                self.method["projection_dim"],
            )
            self.projector = ProjectionHead(channels, hidden, dim)
            # Without either contrast nothing trains the projection (the "base" ablation row); freezing it
            # keeps DDP from waiting for its gradients.
            self.projector.requires_grad_(self.method["use_fc"] or self.method["use_bc"])
        else:
            dim = len(self.segmenter.classifier.branches) * classes
        # Static labels y_F come from the model frozen at the start of each self-training round (CBST).
        self.static_labeler = self.frozen_copy(self.segmenter)
        self.register_buffer("memory_source", torch.zeros(classes, dim))
        self.register_buffer("memory_target", torch.zeros(classes, dim))
        self.register_buffer("memory_source_seen", torch.zeros(classes, dtype=torch.bool))
        self.register_buffer("memory_target_seen", torch.zeros(classes, dtype=torch.bool))
        self.register_buffer(
            "static_confidence_histogram", torch.zeros(classes, self.method["confidence_bins"], dtype=torch.long)
        )
        # Offline: the round's class-wise thresholds k_c, as its labelling pass wrote them (inf = never labelled).
        self.register_buffer("static_thresholds", torch.full((classes,), math.inf, dtype=torch.float64))
        # Offline labelling pass: labelled truth pixels, correct ones, truth pixels (the round's label quality).
        self.register_buffer("static_label_counts", torch.zeros(3, dtype=torch.long), persistent=False)
        # Validation counts per pseudo-label kind: labelled pixels, correct pixels; plus valid pixels.
        self.register_buffer(
            "pseudo_label_counts", torch.zeros(len(PSEUDO_LABEL_KINDS), 2, dtype=torch.long), persistent=False
        )
        self.register_buffer("valid_pixel_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.pseudo_label_quality: dict = {}  # of the last evaluation, for results.json

    def embed(self, images: torch.Tensor):
        """Class logits and flattened pixel features f (L2-normalised) at the feature grid: the projected backbone
        features, or (``contrast_features=aspp``) the concatenated ASPP branch logits."""
        if self.projector is None:
            logits, features = self.segmenter.forward_branches(images)
        else:
            logits, backbone_features = self.segmenter(images)
            features = self.projector(backbone_features)
        return logits, F.normalize(pixels(features).float(), dim=1)

    @torch.no_grad()
    def static_labels(self, images: torch.Tensor, accumulate: bool) -> torch.Tensor:
        """y_F of the frozen labeler on ``images`` (flattened feature grid): offline, the round's union rule with its
        written thresholds (for the val measurements); online, CBST thresholds from the running histogram."""
        probabilities = self.static_labeler(images)[0].float().softmax(1)
        if self.offline:
            return self.union_labels(probabilities).flatten()
        probabilities = pixels(probabilities)
        if accumulate:
            histogram = all_reduce_sum(confidence_histogram(probabilities, self.method["confidence_bins"]))
            self.static_confidence_histogram += histogram
        thresholds = class_balanced_thresholds(self.static_confidence_histogram, self.method["cb_proportion"])
        return static_pseudo_labels(probabilities, thresholds)

    def union_labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        proportion, test = self.method["cb_proportion"], self.method["static_class_test"]
        return union_static_labels(probabilities, self.static_thresholds, proportion, test)

    # ----------------------------------------------------------------- offline static labels of one round
    def before_fit(self, trainer) -> None:
        """Offline: the round's labels are written (or found complete) before the training streams read them."""
        if self.offline:
            self.run_static_labels(trainer)

    def run_static_labels(self, trainer) -> dict:
        """``stage=static_labels``: pass 1 gathers the labeler's sampled (confidence, class) pairs from every rank's
        share of the target train set into CBST thresholds; pass 2 writes each image's union labels at its full
        size. Thresholds and label files are written atomically and kept, so an interrupted stage resumes."""
        claim_label_dir(self.label_dir, self.static_label_producer(), trainer)
        thresholds_path = self.label_dir / THRESHOLDS_FILE
        if not thresholds_path.is_file():
            self.labelling_pass, self.sampled_confidences = "thresholds", []
            trainer.predict(self, return_predictions=False)
            device = trainer.strategy.root_device
            # A rank with no image (more ranks than images) still joins the gather.
            local = torch.cat(self.sampled_confidences) if self.sampled_confidences else torch.zeros(0, 2)
            sampled = all_gather_cat(local.to(device))
            confidence, label = sampled[:, 0], sampled[:, 1].long()
            thresholds = class_top_fraction_thresholds(
                confidence, label, self.num_classes, self.method["cb_proportion"]
            )
            # Classes outside the task's evaluated set are absent from its source (SYNTHIA's terrain, truck,
            # train): never labelled, as DASS forces their thresholds to 1 on SYNTHIA.
            unused = torch.ones_like(thresholds, dtype=torch.bool)
            unused[self.evaluated_classes] = False
            thresholds[unused] = math.inf
            if trainer.is_global_zero:
                save_json(thresholds_path, [None if math.isinf(t) else t for t in thresholds.tolist()])
            trainer.strategy.barrier()
        written = json.loads(thresholds_path.read_text())
        self.static_thresholds.copy_(torch.tensor([math.inf if t is None else t for t in written]))
        results_path = self.label_dir / RESULTS_FILE
        if results_path.is_file():  # written after the last label: the round's labels are complete
            return json.loads(results_path.read_text())
        self.labelling_pass = "labels"
        self.static_label_counts.zero_()
        trainer.predict(self, return_predictions=False)
        labelled, correct, truth = all_reduce_sum(self.static_label_counts.to(trainer.strategy.root_device)).tolist()
        results = {
            "stage": "static_labels",
            "density": 100 * labelled / max(truth, 1),
            "accuracy": 100 * correct / max(labelled, 1),
            "thresholds": written,
        }
        trainer.strategy.barrier()  # every rank's labels are on disk before the results say so
        if trainer.is_global_zero:
            save_json(results_path, results)
        trainer.strategy.barrier()
        return results

    def static_label_producer(self) -> dict:
        """What a round's labels depend on: the labeler's weights (by content) and the labelling settings."""
        return {
            "labeler": file_digest(self.method["source_ckpt"]),
            "cb_proportion": self.method["cb_proportion"],
            "static_class_test": self.method["static_class_test"],
            "target": self.hparams["data"]["target"],
        }

    def predict_dataloader(self):
        images = TargetTrainImages(self.hparams["data"]["target"])
        rank, world = self.trainer.global_rank, self.trainer.world_size
        data = self.hparams["data"]
        mine = list(range(rank, len(images), world))
        return build_evaluation_loader(images, mine, data["batch_size"], data["num_workers"], collate_fn=collate_images)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.static_labeler(batch["img"])[0].float()
        if self.labelling_pass == "thresholds":
            # At the network's output size, as DASS gene_thres reads them: (confidence, predicted class) pairs.
            confidence, label = pixels(logits.softmax(1))[::THRESHOLD_PIXEL_STRIDE].max(1)
            self.sampled_confidences.append(torch.stack([confidence, label.float()], 1).cpu())
            return
        for i, index in enumerate(batch["index"]):
            path = pseudo_label_path(self.label_dir, index)
            if path.is_file():
                labels = torch.from_numpy(read_label(path).astype(np.int64)).to(logits.device)
            else:
                # At the image's full size: logits upsampled, then softmax and the union rule (DASS save_pred).
                full = upsample(logits[i : i + 1], batch["original_size"][i].tolist()).softmax(1)
                labels = self.union_labels(full)[0]
                save_label_png(path, labels.cpu().numpy().astype(np.uint8))
            truth = batch["mask"][i].to(logits.device)
            labels = labels_at(labels[None], truth.shape).view_as(truth)
            valid = (truth != IGNORE_INDEX) & (truth < self.num_classes)
            labelled = valid & (labels != IGNORE_INDEX)
            self.static_label_counts += torch.stack([labelled.sum(), (labelled & (labels == truth)).sum(), valid.sum()])

    def calibrated_prototypes(self, source_prototypes: torch.Tensor, source_present: torch.Tensor):
        """rho_{S->T} = rho_S + xi; classes missing from the source batch use the memory mu_S instead."""
        source = torch.where(source_present.unsqueeze(1), source_prototypes, self.memory_source)
        available = source_present | self.memory_source_seen
        if not self.method["use_calibration"]:
            return source, available
        xi = calibration(self.memory_target, self.memory_source, self.memory_target_seen, self.memory_source_seen)
        return calibrated_source_prototypes(source, xi), available

    @torch.no_grad()
    def update_memories(self, source_prototypes, source_present, target_prototypes, target_present) -> None:
        """mu_S, mu_T <- EMA of the batch prototypes; averaged over ranks so every rank holds the same memory."""
        momentum = self.method["memory_momentum"]
        memory_source, self.memory_source_seen = ema_prototype_memory(
            self.memory_source, self.memory_source_seen, source_prototypes, source_present, momentum
        )
        memory_target, self.memory_target_seen = ema_prototype_memory(
            self.memory_target, self.memory_target_seen, target_prototypes, target_present, momentum
        )
        self.memory_source.copy_(all_reduce_mean(memory_source))
        self.memory_target.copy_(all_reduce_mean(memory_target))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Online: a new self-training round re-labels the target with the current model (CBST rounds).
        if not self.offline and self.global_step > 0 and self.global_step % self.method["round_steps"] == 0:
            self.static_labeler.load_state_dict(self.segmenter.state_dict())
            self.static_confidence_histogram.zero_()

    def training_step(self, batch: dict, batch_idx: int):
        source = batch["src"]
        target = batch["pl"] if self.offline else batch["tgt"]
        # One pass over both domains: BN normalises training batches with the same mixed-domain statistics
        # its running averages hold at evaluation.
        logits, features = self.embed(torch.cat([source["img"], target["img"]]))
        logits_source, logits_target = logits.split(source["img"].shape[0])
        grid = logits_source.shape[-2:]
        labels_source = labels_at(source["mask"], grid)
        features_source, features_target = features.split(labels_source.shape[0])

        # Step 1: static labels y_F, source prototypes rho_S, dynamic labels y_D, hybrid y_T.
        static = labels_at(target["mask"], grid) if self.offline else self.static_labels(target["img"], accumulate=True)
        source_prototypes, source_present = batch_prototypes(features_source, labels_source, self.num_classes)
        if self.method["use_dynamic"]:
            calibrated, available = self.calibrated_prototypes(source_prototypes.detach(), source_present)
            dynamic = dynamic_pseudo_labels(
                features_target.detach(), calibrated, available, self.method["dynamic_label_threshold"]
            )
            labels_target = hybrid_pseudo_labels(dynamic, static)
        else:
            labels_target = static

        # Step 2: L_base = CE on source labels + CE on target pseudo-labels.
        loss_source = self.supervised_loss(logits_source, source["mask"])
        target_mask = labels_target.view(target["img"].shape[0], *grid)
        loss_target = (
            F.cross_entropy(logits_target.float(), target_mask, ignore_index=IGNORE_INDEX)
            if (target_mask != IGNORE_INDEX).any()
            else logits_target.sum() * 0.0
        )
        loss = loss_source + self.method["target_loss_weight"] * loss_target
        if self.method["entropy"] != "paper":
            # L_ent = lamb (H(p_S) + lambt H(p_T)), as the public code adds it (damnet_trainer.py iter)
            reading = self.method["entropy"]
            entropy_source, entropy_target = (
                pixel_entropy(logits_source, reading),
                pixel_entropy(logits_target, reading),
            )
            loss_entropy = entropy_source + self.method["target_loss_weight"] * entropy_target
            loss = loss + self.method["entropy_weight"] * loss_entropy
            self.log("train/loss_entropy", loss_entropy)

        # Step 3: target prototypes rho_T; forward (target -> rho_S) and backward (source -> rho_T) contrast.
        target_prototypes, target_present = batch_prototypes(features_target, labels_target, self.num_classes)
        temperature = self.method["contrast_temperature"]
        if self.method["prototype_pairing"] == "image":
            images = source["img"].shape[0]
            contrast = paired_prototype_contrast_loss
            source_contrast = image_prototypes(features_source, labels_source, self.num_classes, images)
            target_contrast = image_prototypes(features_target, labels_target, self.num_classes, images)
        else:
            contrast = prototype_contrast_loss
            source_contrast = (source_prototypes, source_present)
            target_contrast = (target_prototypes, target_present)
        if self.method["use_fc"]:
            loss_fc = contrast(features_target, labels_target, *source_contrast, temperature)
            loss = loss + self.method["forward_contrast_weight"] * loss_fc
            self.log("train/loss_fc", loss_fc)
        if self.method["use_bc"]:
            loss_bc = contrast(features_source, labels_source, *target_contrast, temperature)
            loss = loss + self.method["backward_contrast_weight"] * loss_bc
            self.log("train/loss_bc", loss_bc)

        # Step 4: prototype memories mu_S, mu_T (EMA), used for the calibration xi of the next step.
        self.update_memories(source_prototypes, source_present, target_prototypes, target_present)

        self.log_dict(
            {
                "train/loss": loss,
                "train/loss_source": loss_source,
                "train/loss_target": loss_target,
                "train/target_label_density": (labels_target != IGNORE_INDEX).float().mean(),
            },
            prog_bar=False,
        )
        return loss

    def evaluation_step(self, batch: dict) -> None:
        super().evaluation_step(batch)
        self.count_pseudo_label_quality(batch["img"], batch["mask"])

    @torch.no_grad()
    def evaluation_pseudo_labels(self, images: torch.Tensor) -> tuple[dict, tuple]:
        """The pseudo-labels each rule gives val images (flattened feature grid) and that grid's size.

        Without a source batch, the dynamic rules match against the memories: mu_S (w/o calibration)
        and mu_S + xi (w/ calibration); hybrid uses the calibrated one.
        """
        logits, features = self.embed(images)
        static = self.static_labels(images, accumulate=False)
        seen = self.memory_source_seen
        xi = calibration(self.memory_target, self.memory_source, self.memory_target_seen, seen)
        threshold = self.method["dynamic_label_threshold"]
        uncalibrated = dynamic_pseudo_labels(features, self.memory_source, seen, threshold)
        dynamic = dynamic_pseudo_labels(features, calibrated_source_prototypes(self.memory_source, xi), seen, threshold)
        labels = dict(zip(PSEUDO_LABEL_KINDS, (static, uncalibrated, dynamic, hybrid_pseudo_labels(dynamic, static))))
        return labels, tuple(logits.shape[-2:])

    def count_pseudo_label_quality(self, images: torch.Tensor, mask: torch.Tensor) -> None:
        """Seed Table 4 in miniature: the pseudo-labels each rule gives the val image, scored against its mask."""
        labels, grid = self.evaluation_pseudo_labels(images)
        truth = labels_at(mask, grid)
        valid = truth != IGNORE_INDEX
        for row, kind in enumerate(PSEUDO_LABEL_KINDS):
            labelled = valid & (labels[kind] != IGNORE_INDEX)
            self.pseudo_label_counts[row, 0] += labelled.sum()
            self.pseudo_label_counts[row, 1] += (labelled & (labels[kind] == truth)).sum()
        self.valid_pixel_count += valid.sum()

    def panel_columns(self, batch: dict) -> dict:
        """The base panel and the target pseudo-labels y_T the rule in training gives (hybrid, or static y_F
        without y_D), at the feature grid; ignored pixels black."""
        columns = super().panel_columns(batch)
        labels, grid = self.evaluation_pseudo_labels(batch["img"])
        kind = "hybrid" if self.method["use_dynamic"] else "static"
        columns["pseudo-label"] = colourised(labels[kind].view(-1, *grid))
        return columns

    def on_validation_epoch_end(self) -> None:
        self.summarise_pseudo_label_quality("val")
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self.summarise_pseudo_label_quality("test")
        super().on_test_epoch_end()

    def summarise_pseudo_label_quality(self, stage: str) -> None:
        """Density and accuracy (%) of each pseudo-label rule over the epoch's images, logged and kept for
        results.json; then the counts restart."""
        counts = all_reduce_sum(self.pseudo_label_counts).double()
        valid = all_reduce_sum(self.valid_pixel_count).double().clamp(min=1)
        self.pseudo_label_quality = {
            kind: {
                "density": (100 * counts[row, 0] / valid).item(),
                "accuracy": (100 * counts[row, 1] / counts[row, 0].clamp(min=1)).item(),
            }
            for row, kind in enumerate(PSEUDO_LABEL_KINDS)
        }
        metrics = {
            f"{stage}/pseudo_labels/{kind}_{name}": value
            for kind, quality in self.pseudo_label_quality.items()
            for name, value in quality.items()
        }
        # Memories must agree across ranks; their largest deviation from the rank mean, summed over ranks.
        memories = torch.cat([self.memory_source, self.memory_target])
        metrics[f"{stage}/memory_rank_spread"] = all_reduce_sum(
            (memories - all_reduce_mean(memories)).abs().max()
        ).item()
        self.log_dict(metrics)
        self.pseudo_label_counts.zero_()
        self.valid_pixel_count.zero_()

    def record_results(self, stage: str, metrics: dict, extra: dict) -> None:
        super().record_results(stage, metrics, {**extra, "pseudo_labels": self.pseudo_label_quality})
