"""SeCo: Connectivity-Driven Pseudo-Labeling (Zhao et al., NeurIPS 2024), a plug-in for any base model.

Two stages, both from a base checkpoint (``method.base_ckpt``: source_only, bicl, mt_metric, ...):

``stage=pseudo_label`` refines the base model's pixel pseudo-labels on the target train images and writes
them to ``method.label_dir``:
  1. pixel pseudo-labels y = argmax p of the base model in labelling mode (PSA's input);
  2. Pixel Semantic Aggregation: one SAM image-encoder pass per image; "stuff" classes by semantic
     alignment of SAM's everything-mode masks, "things" by one batched box + point prompt call over the
     class's connected components, painted over ignore (v1) or over the pixel labels (SeCoV2);
  3. Semantic Connectivity Correction: every connected component of the aggregated labels is a sample. A
     region classifier (official v1 ``SCC/``) is trained on windows around the components, its component mask
     applied to its stem features (gradients averaged over DDP ranks); its per-component loss, gathered over
     ranks, splits kept from dropped components (v1 loss quantile, SeCoV2 per-class keep ratio, or the slides'
     GMM), and kept components take its prediction. ``method.scc.scorer=segmenter`` scores with the base
     model's mask-pooled logits instead.
``method.labels=pixel`` skips PSA and SCC and writes the base model's own thresholded pixel labels: the
self-training the plug-in claim compares against, on the same base and budget. ``method.labels=psa`` writes the
PSA labels with no SCC (the paper's PSA-only ablation).
Per image the PSA result is cached (atomically) so an interrupted run resumes; final labels are written
to a temporary name and renamed, and finished files are never rewritten. Pixel accuracy / mIoU of the
labels before PSA, after PSA and after SCC are measured against the target train labels where the
dataset has them (measurement only; the labels never use them).

``stage=train`` (default) self-trains the base model on the written labels, plus source cross-entropy when
``method.streams`` holds "src" (UDA; ``[pl]`` = source-free). ``method.final=ce``: cross-entropy on the labels.
``method.final=unimatch`` (the official pipeline's final stage): the labelled pixels train by cross-entropy on the
weak view; the unlabelled pixels learn the weak view's confident predictions from two strong CutMix views and
from the weak features under dropout (Yang et al., CVPR 2023, Eq. 3-5).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules.constants import IGNORE_INDEX
from datamodules.datasets.pseudo_labelled import pseudo_label_path
from datamodules.errors import ConfigError, require_choice
from datamodules.files import file_digest, save_label_png, save_npz, write_atomically
from datamodules.labelling import TargetTrainImages, claim_label_dir, collate_images
from datamodules.loading import build_evaluation_loader
from lightning_modules.base import SemanticSegmentationModule
from lightning_modules.components.connectivity import (
    Components,
    class_rank_keep,
    classifier_scores,
    component_losses,
    connected_components,
    correct_components,
    crop_windows,
    fit_noise_gmm,
    kept_components,
    label_confusion,
    paint_in_order,
    pixel_pseudo_labels,
    precision_at_density,
    purest_points,
    quantile_keep,
    region_windows,
    relabel,
    semantic_alignment,
    smoothed_cross_entropy,
    spatial_purity,
    unclipped_boxes,
)
from lightning_modules.components.metric_learning import correctness_histograms
from lightning_modules.components.ops import upsample
from lightning_modules.components.self_training import consistency_loss, cutmix_boxes, mix, strong_photometric
from lightning_modules.distributed import all_gather_cat, all_reduce_mean, all_reduce_sum
from lightning_modules.metrics import mean_iou, per_class_iou
from lightning_modules.networks.region_classifier import RegionClassifier, build_region_classifier
from lightning_modules.networks.sam import SharedEmbeddingPredictor, build_sam
from lightning_modules.panels import colourised, grid, publish
from lightning_modules.progress import time_left
from lightning_modules.teachers import labelling_mode

log = logging.getLogger(__name__)
LABEL_STAGES = ("pixel", "psa", "scc")
HISTOGRAM_BINS = 1000  # of the base model's confidence, for its labels at SeCo's density
PROGRESS_SECONDS = 30  # PSA logs images done / total at most this often


class SeCo(SemanticSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        require_choice("method.final", self.method["final"], ("ce", "unimatch"))
        self.segmenter = self.build_segmenter(self.method["base_ckpt"])
        if self.method["final"] == "unimatch" and not hasattr(self.segmenter, "decode"):
            raise ConfigError(
                "method.final=unimatch perturbs the features between backbone and head, which "
                f"{self.hparams['model']['name']} does not expose; expected a network with decode(features), e.g. "
                "DeepLabV2 (arch=deeplabv2)"
            )
        self.label_dir = Path(self.method["label_dir"] or Path(cfg["run_dir"]) / "pseudo_labels")
        self.cache_dir = self.label_dir / "psa"
        self.scc_dir = self.label_dir / "scc"
        self.psa_tools: dict = {}
        self.timing = {"images": 0, "seconds": 0.0, "encoder_seconds": 0.0}

    # ----------------------------------------------------------------- stage=train: self-training
    def training_step(self, batch: dict, batch_idx: int):
        method = self.method
        target = batch["pl"]
        with_source = "src" in method["streams"]
        # With source data, one pass over both domains: BN trains on the mixed statistics it evaluates with.
        images = torch.cat([target["img"], batch["src"]["img"]]) if with_source else target["img"]
        logits, features = self.segmenter(images)
        count = target["img"].shape[0]
        losses = {}
        if method["final"] == "unimatch":
            losses.update(self.unimatch_losses(target, logits[:count], features[:count]))
        else:
            losses["loss_target"] = method["lambda_target"] * self.labelled_loss(logits[:count], target["mask"])
        if with_source:
            losses["loss_source"] = self.supervised_loss(logits[count:], batch["src"]["mask"])
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def labelled_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # A batch whose pseudo-labels are all ignored (every component dropped) contributes no target loss;
        # mean cross-entropy over zero pixels would be NaN.
        return self.supervised_loss(logits, labels) if bool((labels != IGNORE_INDEX).any()) else logits.sum() * 0

    def unimatch_losses(self, target: dict, logits: torch.Tensor, features: torch.Tensor) -> dict:
        """UniMatch on the target: SeCo's labelled pixels are the labelled part, the rest the unlabelled part."""
        unimatch, labels = self.method["unimatch"], target["mask"]
        probabilities = upsample(logits.detach(), labels.shape[-2:]).float().softmax(1)
        confidence, weak_label = probabilities.max(1)
        confident = confidence >= unimatch["confidence_threshold"]
        unlabelled = labels == IGNORE_INDEX
        # Feature perturbation (Eq. 4): the weak view's features under channel dropout, decoded.
        perturbed = self.segmenter.decode(F.dropout2d(features, unimatch["feature_dropout"]))
        losses = {
            "loss_labelled": self.labelled_loss(logits, labels),
            "loss_feature_perturbation": consistency_loss(perturbed, weak_label, confident, unlabelled),
        }
        # Two strong views (Eq. 5), each photometric + CutMix with another image of the batch.
        strong_images, strong_targets = [], []
        for _ in range(2):
            strong = strong_photometric(target["img"], **unimatch["strong"])
            box = cutmix_boxes(len(strong), *labels.shape[-2:], unimatch["cutmix_p"], device=strong.device)
            partner = torch.roll(torch.arange(len(strong), device=strong.device), 1)
            strong_images.append(mix(box.float(), strong[partner], strong))
            strong_targets.append(
                [torch.where(box, value[partner], value) for value in (weak_label, confident, unlabelled)]
            )
        both, _ = self.segmenter(torch.cat(strong_images))
        for view, (view_logits, (label, view_confident, region)) in enumerate(zip(both.chunk(2), strong_targets)):
            losses[f"loss_strong_{view + 1}"] = consistency_loss(view_logits, label, view_confident, region)
        # L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 (UniMatch's unimatch.py)
        weights = {
            "loss_labelled": 0.5,
            "loss_strong_1": 0.125,
            "loss_strong_2": 0.125,
            "loss_feature_perturbation": 0.25,
        }
        return {name: weights[name] * value for name, value in losses.items()}

    # ----------------------------------------------------------------- stage=pseudo_label
    def run_pseudo_label(self, trainer) -> dict:
        method = self.method
        require_choice("method.labels", method["labels"], ("seco", "psa", "pixel"))
        require_choice("method.scc.scorer", method["scc"]["scorer"], ("classifier", "segmenter"))
        require_choice("method.scc.split", method["scc"]["split"], ("quantile", "class_rank", "gmm"))
        if self.method["psa"]["everything_mode"].get("crop_n_layers", 0) != 0:
            raise ConfigError(
                "method.psa.everything_mode.crop_n_layers must be 0: PSA encodes each image once and "
                "shares that embedding between everything-mode and the thing prompts"
            )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        claim_label_dir(self.label_dir, self.producer(), trainer)
        trainer.predict(self, return_predictions=False)
        self.drop_stale_scores(trainer)
        self.semantic_connectivity_correction()
        self.publish_label_stages(trainer)
        return self.pseudo_label_results

    def drop_stale_scores(self, trainer) -> None:
        """The region classifier and its scores are trained on every image's components: when this run computed
        any PSA cache anew (a resumed stage), on any rank, they are recomputed too."""
        recomputed = all_reduce_sum(torch.tensor(self.psa_todo, device=trainer.strategy.root_device)).item()
        if recomputed and trainer.is_global_zero and self.scc_dir.is_dir():
            shutil.rmtree(self.scc_dir)
        trainer.strategy.barrier()

    def producer(self) -> dict:
        """What the labels depend on: the base model's and SAM's weights (by content) and every setting used."""
        sam = self.method["sam"]
        return {
            "base_ckpt": file_digest(self.method["base_ckpt"]),
            "sam_checkpoint": file_digest(sam["checkpoint"]) if sam.get("checkpoint") else None,
            "sam": {key: sam.get(key) for key in ("variant", "image_size", "tiny")},
            "labels": self.method["labels"],
            "pixel_threshold": self.method["pixel_threshold"],
            "psa": self.method["psa"],
            "scc": self.method["scc"],
            "target": self.hparams["data"]["target"],
        }

    def predict_dataloader(self) -> DataLoader:
        images = TargetTrainImages(self.hparams["data"]["target"])
        rank, world = self.trainer.global_rank, self.trainer.world_size
        todo = [i for i in range(rank, len(images), world) if not self.cache_path(i).is_file()]
        log.info(
            "rank %d: PSA for %d of its %d target images (the rest are cached in %s)",
            rank,
            len(todo),
            len(range(rank, len(images), world)),
            self.cache_dir,
        )
        self.psa_todo = len(todo)
        data = self.hparams["data"]
        return build_evaluation_loader(images, todo, data["batch_size"], data["num_workers"], collate_fn=collate_images)

    def on_predict_start(self) -> None:
        labelling_mode(self.segmenter)
        self.psa_started = self.last_progress_line = time.monotonic()
        if self.method["labels"] == "pixel":
            return
        sam_cfg, psa = self.method["sam"], self.method["psa"]
        require_choice("method.psa.canvas", psa["canvas"], ("ignore", "pixel_labels"))
        sam = build_sam(sam_cfg["variant"], sam_cfg.get("checkpoint"), sam_cfg.get("image_size"), sam_cfg.get("tiny"))
        sam.to(self.device).eval().requires_grad_(False)
        predictor = SharedEmbeddingPredictor(sam)
        everything = SamAutomaticMaskGenerator(sam, **psa["everything_mode"])
        everything.predictor = predictor
        self.psa_tools = {
            "predictor": predictor,
            "everything": everything,
            "stuff_classes": self.classes_for_task(psa["stuff_classes"], "method.psa.stuff_classes"),
            "thing_classes": self.classes_for_task(psa["thing_classes"], "method.psa.thing_classes"),
        }

    def classes_for_task(self, lists: dict, key: str) -> list[int]:
        """PSA's class lists are given per class count (19 Cityscapes, 16 SYNTHIA); the task's count picks one."""
        by_count = {int(count): classes for count, classes in lists.items()}
        if self.num_classes not in by_count:
            raise ConfigError(
                f"{key} has lists for {sorted(by_count)} classes; this task has {self.num_classes}: "
                f"add {key}.{self.num_classes}=[...]"
            )
        return list(by_count[self.num_classes])

    def cache_path(self, index: int) -> Path:
        return self.cache_dir / f"{index:06d}.npz"

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> None:
        method = self.method
        logits = self(batch["img"])
        probabilities = logits.softmax(1)
        pixel_labels = pixel_pseudo_labels(probabilities, method["pixel_threshold"]).cpu().numpy()
        pixel_confidence, pixel_prediction = probabilities.max(1)
        for i, index in enumerate(batch["index"]):
            started = time.perf_counter()
            psa_labels = (
                pixel_labels[i]
                if method["labels"] == "pixel"
                else self.pixel_semantic_aggregation(batch["image"][i], pixel_labels[i])
            )
            self.timing["seconds"] += time.perf_counter() - started
            self.timing["images"] += 1
            self.log_psa_progress()
            components = connected_components(psa_labels, min_area=method["scc"]["min_component_area"])
            losses, prediction, confidence = component_losses(logits[i], components)
            truth = batch["mask"][i].numpy()
            save_npz(
                self.cache_path(index),
                psa=psa_labels.astype(np.uint8),
                index=components.index.astype(np.int32),
                classes=components.classes,
                boxes=components.boxes,
                losses=losses.cpu().numpy(),
                prediction=prediction.cpu().numpy(),
                confidence=confidence.cpu().numpy(),
                original_size=batch["original_size"][i],
                confusion_pixel=label_confusion(pixel_labels[i], truth, self.num_classes),
                confusion_psa=label_confusion(psa_labels, truth, self.num_classes),
                truth_pixels=int(((truth != IGNORE_INDEX) & (truth < self.num_classes)).sum()),
                confidence_histogram=self.confidence_histogram(
                    pixel_confidence[i], pixel_prediction[i], batch["mask"][i]
                ),
            )

    def confidence_histogram(
        self, confidence: torch.Tensor, prediction: torch.Tensor, truth: torch.Tensor
    ) -> np.ndarray:
        """Counts [2, bins] of the base model's confidence on the pixels with a true label, incorrect / correct
        argmax: the labels a confidence threshold gives at any density are read from it."""
        truth = truth.to(prediction.device)
        valid = (truth != IGNORE_INDEX) & (truth < self.num_classes)
        counts = correctness_histograms(
            confidence[valid][None],
            prediction[valid] == truth[valid],
            torch.zeros_like(truth[valid]),
            1,
            HISTOGRAM_BINS,
        )
        return counts[0, 0].cpu().numpy()

    def log_psa_progress(self) -> None:
        """Every PROGRESS_SECONDS and at the last image: images done / total on this rank, rate and time left."""
        done, total, now = self.timing["images"], self.psa_todo, time.monotonic()
        if done < total and now - self.last_progress_line < PROGRESS_SECONDS:
            return
        self.last_progress_line, elapsed = now, now - self.psa_started
        log.info(
            "rank %d: PSA %d/%d images, %.2f images/s, %s",
            self.global_rank,
            done,
            total,
            done / max(elapsed, 1e-9),
            time_left(done, total, elapsed),
        )

    def pixel_semantic_aggregation(self, image: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Stuff by semantic alignment of everything-mode masks, then things by box + point prompts."""
        psa = self.method["psa"]
        predictor, everything = self.psa_tools["predictor"], self.psa_tools["everything"]
        started = time.perf_counter()
        predictor.set_image(image)
        self.timing["encoder_seconds"] += time.perf_counter() - started
        masks = np.stack([m["segmentation"] for m in everything.generate(image)] or [np.zeros(labels.shape, bool)])
        canvas = labels.copy() if psa["canvas"] == "pixel_labels" else np.full(labels.shape, IGNORE_INDEX, np.int64)
        stuff_classes, thing_classes = self.psa_tools["stuff_classes"], self.psa_tools["thing_classes"]
        aggregated = paint_in_order(
            masks, semantic_alignment(masks, labels, stuff_classes, psa["stuff_align_threshold"]), canvas
        )
        things = connected_components(labels, thing_classes, psa["min_thing_pixels"])
        if len(things):
            aggregated = paint_in_order(self.prompt_things(things, labels), things.classes, aggregated)
        predictor.release()
        return aggregated

    def prompt_things(self, things: Components, labels: np.ndarray) -> np.ndarray:
        """One batched SAM decoder call: every thing component's unclipped box + its purest points."""
        psa, predictor = self.method["psa"], self.psa_tools["predictor"]
        height, width = labels.shape
        purity = spatial_purity(labels, self.num_classes, psa["purity_radius"])
        points = purest_points(things, purity, psa["points_per_thing"])
        boxes = unclipped_boxes(things, psa["unclip_ratio"], height, width)
        transform, device = predictor.transform, predictor.device
        masks, _, _ = predictor.predict_torch(
            point_coords=transform.apply_coords_torch(torch.from_numpy(points).to(device), (height, width)),
            point_labels=torch.ones(points.shape[:2], dtype=torch.int, device=device),
            boxes=transform.apply_boxes_torch(torch.from_numpy(boxes).to(device), (height, width)),
            multimask_output=False,
        )
        return masks[:, 0].cpu().numpy()

    def semantic_connectivity_correction(self) -> None:
        """Semantic Connectivity Correction over every image's components, then the final labels."""
        self.trainer.strategy.barrier()
        device = self.trainer.strategy.root_device
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = list(range(rank, len(TargetTrainImages(self.hparams["data"]["target"])), world))
        local = self.component_scores(mine)
        counts = all_gather_cat(torch.tensor([len(local["classes"])], device=device)).cpu().numpy()
        scores = {
            name: all_gather_cat(torch.from_numpy(value).to(device)).cpu().numpy() for name, value in local.items()
        }
        final = self.split_components(**scores)
        log.info(
            "rank %d: SCC over %d components: %d kept, %d relabelled, digest %s",
            rank,
            len(final),
            int((final != IGNORE_INDEX).sum()),
            int(((final != IGNORE_INDEX) & (final != scores["classes"])).sum()),
            hashlib.sha1(final.tobytes()).hexdigest()[:16],
        )
        start = int(counts[:rank].sum())
        local_final = final[start : start + len(local["classes"])]
        confusions = {stage: np.zeros((self.num_classes, self.num_classes), np.int64) for stage in LABEL_STAGES}
        truth_pixels, offset, written = 0, 0, 0
        histogram = np.zeros((2, HISTOGRAM_BINS))
        for index in mine:
            cache = np.load(self.cache_path(index))
            count = len(cache["classes"])
            path = pseudo_label_path(self.label_dir, index)
            if not path.is_file():
                labels = relabel(cache["index"], local_final[offset : offset + count])
                height, width = (int(v) for v in cache["original_size"])
                save_label_png(path, cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST))
                written += 1
            offset += count
            confusions["pixel"] += cache["confusion_pixel"]
            confusions["psa"] += cache["confusion_psa"]
            truth_pixels += int(cache["truth_pixels"])
            histogram += cache["confidence_histogram"]
        self.trainer.strategy.barrier()
        images = TargetTrainImages(self.hparams["data"]["target"])
        labelled_and_total = np.zeros(2, np.int64)
        for index in mine:
            truth = images[index]["mask"].numpy()
            labels = self.written_labels(index)
            labelled_and_total += ((labels != IGNORE_INDEX).sum(), labels.size)
            labels = at_size(labels, truth.shape)
            confusions["scc"] += label_confusion(labels, truth, self.num_classes)
        self.require_labels(all_reduce_sum(torch.from_numpy(labelled_and_total).to(device)).tolist())
        total_truth = int(all_reduce_sum(torch.tensor(truth_pixels, device=device)).item())
        histogram = all_reduce_sum(torch.from_numpy(histogram).to(device)).cpu().numpy()
        self.report_pseudo_labels(confusions, scores["classes"], final, total_truth, histogram, written)

    def component_scores(self, mine: list[int]) -> dict:
        """This rank's components in the order of ``mine``: label, loss, prediction and confidence of the scorer."""
        caches = [np.load(self.cache_path(index)) for index in mine]
        classes = np.concatenate([c["classes"] for c in caches] or [np.zeros(0, np.int64)]).astype(np.int64)
        if self.method["labels"] == "seco" and self.method["scc"]["scorer"] == "classifier":
            return {"classes": classes, **self.region_classifier_scores(mine, len(classes))}
        joined = {
            name: np.concatenate([c[name] for c in caches] or [np.zeros(0, dtype)])
            for name, dtype in (("losses", np.float32), ("prediction", np.int64), ("confidence", np.float32))
        }
        return {"classes": classes, **joined}

    def split_components(
        self, classes: np.ndarray, losses: np.ndarray, prediction: np.ndarray, confidence: np.ndarray
    ) -> np.ndarray:
        """The final class of every component (ignore = dropped) under ``method.scc.split``."""
        scc = self.method["scc"]
        if self.method["labels"] in ("pixel", "psa"):
            return classes
        if scc["split"] == "quantile":
            rule = scc["quantile"]
            require_choice("method.scc.quantile.scope", rule["scope"], ("global", "class", "class_or_global"))
            keep = quantile_keep(losses, prediction, rule["keep_ratio"], rule["scope"])
            return kept_components(classes, keep, prediction, confidence, rule["relabel_threshold"])
        if scc["split"] == "class_rank":
            rule = scc["class_rank"]
            keep = class_rank_keep(losses, classes, rule["keep_ratio"])
            return kept_components(classes, keep, prediction, confidence, rule["relabel_threshold"])
        rule = scc["gmm"]
        noisy = fit_noise_gmm(losses, rule["max_iter"], rule["tol"], rule["reg_covar"], seed=self.hparams["seed"])
        return correct_components(
            classes, noisy, prediction, confidence, rule["noise_threshold"], rule["correction_threshold"]
        )

    # ----------------------------------------------------------------- SCC's region classifier
    def region_classifier_scores(self, mine: list[int], local: int) -> dict:
        """Train the region classifier (or load it), then score this rank's ``local`` components; cached per rank."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        path = self.scc_dir / f"scores-rank{rank}-of{world}.npz"
        if path.is_file():
            return dict(np.load(path))
        classifier = self.train_region_classifier(mine, local)
        classifier.eval()
        rules, device = self.method["scc"]["classifier"], self.device
        parts = []
        size = rules["network"]["input_size"]
        with torch.no_grad():
            for items in self.component_images(mine, order=None):
                images, components = component_table(items, device)
                logits = torch.cat(
                    [
                        classifier(windows["img"], windows["mask"])
                        for windows in (
                            crop_components(images, chunk, size, device)
                            for chunk in split_table(components, rules["batch_size"])
                        )
                    ]
                    or [torch.zeros(0, self.num_classes, device=device)]
                )
                parts.append(classifier_scores(logits, components["label"].to(device)))
        losses, prediction, confidence = (
            torch.cat([part[i] for part in parts]).cpu().numpy() if parts else np.zeros(0) for i in range(3)
        )
        scores = {
            "losses": losses.astype(np.float32),
            "prediction": prediction.astype(np.int64),
            "confidence": confidence.astype(np.float32),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npz(path, **scores)
        return scores

    def train_region_classifier(self, mine: list[int], local: int) -> RegionClassifier:
        """SeCo v1 ``SCC/train_src.py``: label-smoothed CE on the component windows, random mirror, SGD (nesterov)
        with the backbone at 0.1 x lr and lr_t = lr (1 + 10 t / T)^-0.75, for ``epochs`` passes over the largest
        rank's components. Gradients are averaged over DDP ranks, so every rank holds the same classifier."""
        rules, device = self.method["scc"]["classifier"], self.device
        classifier = build_region_classifier(rules["network"], self.num_classes).to(device)
        path = self.scc_dir / "classifier.pt"
        if path.is_file():
            classifier.load_state_dict(torch.load(path, map_location=device))
            return classifier
        largest = int(all_gather_cat(torch.tensor([local], device=device)).max())
        steps = rules["epochs"] * math.ceil(largest / rules["batch_size"])
        optimizer = torch.optim.SGD(
            [
                {"params": classifier.backbone_parameters(), "lr": rules["lr"] * rules["backbone_lr_mult"]},
                {"params": classifier.head_parameters(), "lr": rules["lr"]},
            ],
            lr=rules["lr"],
            momentum=rules["momentum"],
            weight_decay=rules["weight_decay"],
            nesterov=rules["nesterov"],
        )
        initial_rates = [group["lr"] for group in optimizer.param_groups]
        generator = torch.Generator().manual_seed(self.hparams["seed"] * 1000 + self.trainer.global_rank)
        batches = self.component_batches(mine, rules["batch_size"], generator) if local else None
        classifier.train()
        log.info("SCC region classifier: %d steps over %d components on this rank", steps, local)
        for step in range(steps):
            for group, rate in zip(optimizer.param_groups, initial_rates):
                group["lr"] = rate * (1 + rules["lr_gamma"] * step / steps) ** -rules["lr_power"]
            if batches is None:  # a rank without components still takes part in every gradient average
                loss = sum(parameter.sum() for parameter in classifier.parameters()) * 0
            else:
                images, components = next(batches)
                windows = crop_components(images, components, rules["network"]["input_size"], device)
                flip = (torch.rand(len(components["label"]), generator=generator) < 0.5).to(device)[:, None, None, None]
                loss = smoothed_cross_entropy(
                    classifier(
                        torch.where(flip, windows["img"].flip(-1), windows["img"]),
                        torch.where(flip, windows["mask"].flip(-1), windows["mask"]),
                    ),
                    windows["label"],
                    rules["label_smoothing"],
                )
            optimizer.zero_grad()
            loss.backward()
            for parameter in classifier.parameters():
                if parameter.grad is not None:
                    parameter.grad = all_reduce_mean(parameter.grad)
            optimizer.step()
        for buffer in classifier.buffers():  # BN statistics of every rank's components, as one process would hold
            if buffer.is_floating_point():
                buffer.copy_(all_reduce_mean(buffer))
        if self.trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda temporary: torch.save(classifier.state_dict(), temporary))
        self.trainer.strategy.barrier()
        return classifier

    def component_images(self, mine: list[int], order: torch.Tensor | None):
        """Lists of ``images_per_batch`` ComponentImages items of ``mine``'s images (in ``order`` of positions, or as
        listed): the loader's workers read the images and their component tables in parallel."""
        rules = self.method["scc"]["classifier"]
        dataset = ComponentImages(
            TargetTrainImages(self.hparams["data"]["target"]),
            [self.cache_path(index) for index in mine],
            mine,
            rules["window_fraction"],
        )
        positions = list(range(len(mine))) if order is None else order.tolist()
        return DataLoader(
            Subset(dataset, positions),
            batch_size=rules["images_per_batch"],
            num_workers=self.hparams["data"]["num_workers"],
            collate_fn=list,
        )

    def component_batches(self, mine: list[int], batch_size: int, generator: torch.Generator):
        """Endless training batches of ``batch_size`` components, the images reshuffled every pass."""
        return pooled_batches(
            lambda: self.component_images(mine, torch.randperm(len(mine), generator=generator)),
            batch_size,
            generator,
            self.device,
        )

    def publish_label_stages(self, trainer) -> None:
        """A panel of the label stages on rank 0's first target train images: image | ground truth | pixel | PSA |
        SCC (run_dir/predictions/pseudo_label_stages.png, W&B pseudo_label/stages). PSA and SCC are read back; the
        pixel labels are recomputed on the first loader batch, so BatchNorm sees the batch the stage labelled."""
        panels = self.hparams["logger"]["panels"]
        if not panels["enabled"] or not trainer.is_global_zero:
            return
        images = TargetTrainImages(self.hparams["data"]["target"])
        first = list(range(0, len(images), trainer.world_size))[: self.hparams["data"]["batch_size"]]
        batch = collate_images([images[index] for index in first])
        with torch.no_grad():
            probabilities = self(batch["img"].to(self.device)).softmax(1)
        shown, size = first[: panels["images"]], batch["mask"].shape[-2:]
        columns = {
            "image": np.stack(batch["image"][: len(shown)]),
            "ground truth": colourised(batch["mask"][: len(shown)]),
            "pixel": colourised(pixel_pseudo_labels(probabilities, self.method["pixel_threshold"])[: len(shown)]),
            "PSA": colourised(torch.stack([torch.from_numpy(np.load(self.cache_path(i))["psa"]) for i in shown])),
            "SCC": colourised(torch.from_numpy(np.stack([at_size(self.written_labels(i), size) for i in shown]))),
        }
        path = Path(self.hparams["run_dir"]) / "predictions" / "pseudo_label_stages.png"
        publish(trainer, "pseudo_label/stages", grid(columns), path)

    def written_labels(self, index: int) -> np.ndarray:
        """The final label file of an image, at the image's original size."""
        return cv2.imread(str(pseudo_label_path(self.label_dir, index)), cv2.IMREAD_UNCHANGED)

    def require_labels(self, labelled_and_total: list[int]) -> None:
        """An (almost) empty label set would self-train on nothing: one error instead of a silent no-op run."""
        labelled, total = labelled_and_total
        minimum = self.method["scc"]["min_labelled_fraction"]
        if labelled < minimum * max(total, 1):
            raise ConfigError(
                f"the pseudo-labels under {self.label_dir} label {100 * labelled / max(total, 1):.2f}% of the target "
                f"pixels (method.scc.min_labelled_fraction={minimum}): the base model, SAM or PSA settings give no "
                "usable labels"
            )

    def report_pseudo_labels(
        self,
        confusions: dict,
        classes: np.ndarray,
        final: np.ndarray,
        truth_pixels: int,
        histogram: np.ndarray,
        written: int,
    ) -> None:
        """Precision (pixel accuracy), mIoU and density (labelled share of the pixels that have a true label) of the
        labels before PSA, after PSA and after SCC (summed over ranks), and the precision of the base model's own
        most confident pixels at SCC's density (its thresholded labels at equal density)."""
        device = self.trainer.strategy.root_device
        metrics = {}
        for stage, confusion in confusions.items():
            total = all_reduce_sum(torch.from_numpy(confusion).to(device)).cpu()
            iou = per_class_iou(total)
            subset = next(iter(self.eval_subsets.values()))
            miou = mean_iou(iou, subset)
            # No labelled pixel at a stage leaves its mIoU undefined: null in the JSON, not NaN.
            metrics[stage] = {
                "pixel_accuracy": 100 * (total.diag().sum() / total.sum().clamp(min=1)).item(),
                "mIoU": None if math.isnan(miou) else 100 * miou,
                "labelled_pixels": int(total.sum()),
                "density": 100 * int(total.sum()) / max(truth_pixels, 1),
            }
        precision, density = precision_at_density(histogram, metrics["scc"]["density"] / 100)
        metrics["base_at_scc_density"] = {"pixel_accuracy": precision, "density": density}
        timing = (
            all_reduce_sum(
                torch.tensor(
                    [self.timing["images"], self.timing["seconds"], self.timing["encoder_seconds"]],
                    dtype=torch.float64,
                    device=device,
                )
            )
            .cpu()
            .tolist()
        )
        self.pseudo_label_results = {
            "method": self.method["name"],
            "task": self.hparams["task"]["name"],
            "stage": "pseudo_label",
            "label_dir": str(self.label_dir),
            "metrics": metrics,
            "components": {
                "total": int(len(classes)),
                "kept": int((final != IGNORE_INDEX).sum()),
                "relabelled": int(((final != IGNORE_INDEX) & (final != classes)).sum()),
            },
            "psa_images": int(timing[0]),
            "psa_images_per_second": timing[0] / max(timing[1], 1e-9),
            "psa_seconds_per_encoder_second": timing[1] / max(timing[2], 1e-9),
            "labels_written_by_rank0": written,
        }
        if self.trainer.is_global_zero:
            for stage in (*LABEL_STAGES, "base_at_scc_density"):
                log.info(
                    "pseudo-labels %-5s: precision %.2f, density %.2f, mIoU %s",
                    stage,
                    metrics[stage]["pixel_accuracy"],
                    metrics[stage]["density"],
                    metrics[stage].get("mIoU"),
                )
            run_dir = Path(self.hparams["run_dir"])
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "pseudo_label_results.json").write_text(json.dumps(self.pseudo_label_results, indent=2))


class ComponentImages(Dataset):
    """Per target train image (a position in ``indices``): the image, its PSA component-index map, and each
    component's window and label. The windows are cut per batch (``crop_components``), so what an item holds does
    not grow with the number of its components (an image can have thousands)."""

    def __init__(self, images: TargetTrainImages, caches: list[Path], indices: list[int], window_fraction):
        self.images, self.caches, self.indices = images, caches, indices
        self.window_fraction = tuple(window_fraction)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        cache = np.load(self.caches[position])
        index_map = cache["index"]
        return {
            "img": self.images[self.indices[position]]["img"],
            "index": torch.from_numpy(index_map),
            "windows": torch.from_numpy(region_windows(cache["boxes"], index_map.shape, self.window_fraction)).float(),
            "label": torch.from_numpy(cache["classes"].astype(np.int64)),
        }


def component_table(items: list[dict], device, first_slot: int = 0) -> tuple[dict, dict]:
    """The components of ComponentImages ``items`` as one table (per component: its image's slot, its id in that
    image's index map, its window and label) and the slots' (image, index map as float), moved to ``device`` once
    for every batch cut from them."""
    images = {
        first_slot + i: (item["img"].to(device), item["index"].to(device, torch.float32))
        for i, item in enumerate(items)
    }
    components = {
        "slot": torch.cat([torch.full((len(item["label"]),), first_slot + i) for i, item in enumerate(items)]),
        "component": torch.cat([torch.arange(1, len(item["label"]) + 1) for item in items]),
        "window": torch.cat([item["windows"] for item in items]),
        "label": torch.cat([item["label"] for item in items]),
    }
    return images, components


def split_table(components: dict, size: int):
    for start in range(0, len(components["label"]), size):
        yield {name: value[start : start + size] for name, value in components.items()}


def crop_components(images: dict, components: dict, size, device) -> dict:
    """The region classifier's input for a table of components (images from ``component_table``, already on
    ``device``): each window of its image resized to ``size`` (bilinear) and the component's mask inside it
    (nearest on the index map), in table order."""
    pictures, masks, rows = [], [], []
    for slot in components["slot"].unique().tolist():
        chosen = torch.nonzero(components["slot"] == slot)[:, 0]
        picture, index_map = images[slot]
        windows = components["window"][chosen].to(device)
        pictures.append(crop_windows(picture, windows, size, "bilinear"))
        ids = crop_windows(index_map[None], windows, size, "nearest")
        masks.append(ids == components["component"][chosen].to(device, torch.float32)[:, None, None, None])
        rows.append(chosen)
    in_table_order = torch.argsort(torch.cat(rows)).to(device)
    return {
        "img": torch.cat(pictures)[in_table_order],
        "mask": torch.cat(masks)[in_table_order],
        "label": components["label"].to(device),
    }


def pooled_batches(new_pass, batch_size: int, generator: torch.Generator, device):
    """Endless batches of ``batch_size`` components from passes over the data (``new_pass()`` iterates lists of
    ComponentImages items): the components of consecutive lists are pooled and shuffled together, and the
    remainder is carried to the next batch. A batch is ``component_table``'s pair, to be cut by
    ``crop_components``; the pool keeps only the images its components still need."""
    images, pool, slots = {}, None, 0
    while True:
        for items in new_pass():
            new_images, new_components = component_table(items, device, slots)
            slots += len(items)
            images.update(new_images)
            pool = (
                new_components
                if pool is None
                else {name: torch.cat([pool[name], new_components[name]]) for name in pool}
            )
            shuffled = torch.randperm(len(pool["label"]), generator=generator)
            pool = {name: value[shuffled] for name, value in pool.items()}
            while len(pool["label"]) >= batch_size:
                batch = {name: value[:batch_size] for name, value in pool.items()}
                yield {slot: images[slot] for slot in batch["slot"].unique().tolist()}, batch
                pool = {name: value[batch_size:] for name, value in pool.items()}
            images = {slot: images[slot] for slot in pool["slot"].unique().tolist()}


def at_size(labels: np.ndarray, size) -> np.ndarray:
    """A label map resized to ``size`` (H, W), nearest neighbour."""
    return cv2.resize(labels, tuple(size)[::-1], interpolation=cv2.INTER_NEAREST)
