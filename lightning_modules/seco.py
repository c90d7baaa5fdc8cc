"""SeCo: Connectivity-Driven Pseudo-Labeling (Zhao et al., NeurIPS 2024), a plug-in for any base model.

Two stages, both from a base checkpoint (``method.base_ckpt``: source_only, bicl, mt_metric, ...):

``stage=pseudo_label`` refines the base model's pixel pseudo-labels on the target train images and writes
them to ``method.label_dir``:
  1. pixel pseudo-labels y = argmax p of the base model in labelling mode (PSA's input);
  2. Pixel Semantic Aggregation: one SAM image-encoder pass per image; "stuff" classes by semantic
     alignment of SAM's everything-mode masks, "things" by one batched box + point prompt call over the
     class's connected components;
  3. Semantic Connectivity Correction: per connected component of the aggregated labels, the loss of the
     base model's mask-pooled prediction; a two-component GMM on all components' losses (gathered over
     DDP ranks) marks the noisy ones, which are relabelled when the prediction is confident, else ignored.
Per image the PSA result is cached (atomically) so an interrupted run resumes; final labels are written
to a temporary name and renamed, and finished files are never rewritten. Pixel accuracy / mIoU of the
labels before PSA, after PSA and after SCC are measured against the target train labels where the
dataset has them (measurement only; the labels never use them).

``stage=train`` (default) self-trains the base model on the refined labels: cross-entropy on the target
pseudo-labels, plus source cross-entropy when ``method.streams`` holds "src" (UDA; ``[pl]`` = source-free).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from torch.utils.data import DataLoader

from datamodules.constants import IGNORE_INDEX
from datamodules.datasets.pseudo_labelled import pseudo_label_path
from datamodules.errors import ConfigError
from datamodules.files import file_digest, save_json, save_label_png, save_npz
from datamodules.labelling import TargetTrainImages, collate_images
from datamodules.loading import build_evaluation_loader
from lightning_modules.base import SemanticSegmentationModule
from lightning_modules.components.connectivity import (
    Components,
    component_losses,
    connected_components,
    correct_components,
    fit_noise_gmm,
    label_confusion,
    paint_in_order,
    pixel_pseudo_labels,
    purest_points,
    relabel,
    semantic_alignment,
    spatial_purity,
    unclipped_boxes,
)
from lightning_modules.distributed import all_gather_cat, all_reduce_sum
from lightning_modules.metrics import mean_iou, per_class_iou
from lightning_modules.networks.sam import SharedEmbeddingPredictor, build_sam
from lightning_modules.panels import colourised, grid, publish
from lightning_modules.progress import time_left
from lightning_modules.teachers import labelling_mode

log = logging.getLogger(__name__)
LABEL_STAGES = ("pixel", "psa", "scc")
PRODUCER_FILE = "producer.json"
PROGRESS_SECONDS = 30  # PSA logs images done / total at most this often


class SeCo(SemanticSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.segmenter = self.build_segmenter(self.method["base_ckpt"])
        self.label_dir = Path(self.method["label_dir"] or Path(cfg["run_dir"]) / "pseudo_labels")
        self.cache_dir = self.label_dir / "psa"
        self.psa_tools: dict = {}
        self.timing = {"images": 0, "seconds": 0.0, "encoder_seconds": 0.0}

    # ----------------------------------------------------------------- stage=train: self-training
    def training_step(self, batch: dict, batch_idx: int):
        method = self.method
        target = batch["pl"]
        with_source = "src" in method["streams"]
        # With source data, one pass over both domains: BN trains on the mixed statistics it evaluates with.
        images = torch.cat([target["img"], batch["src"]["img"]]) if with_source else target["img"]
        logits, _ = self.segmenter(images)
        logits, source_logits = logits.split(target["img"].shape[0]) if with_source else (logits, None)
        # A batch whose pseudo-labels are all ignored (every component filtered) contributes no target loss;
        # mean cross-entropy over zero pixels would be NaN.
        labelled = bool((target["mask"] != IGNORE_INDEX).any())
        loss_target = self.supervised_loss(logits, target["mask"]) if labelled else logits.sum() * 0
        losses = {"loss_target": method["lambda_target"] * loss_target}
        if with_source:
            losses["loss_source"] = self.supervised_loss(source_logits, batch["src"]["mask"])
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ----------------------------------------------------------------- stage=pseudo_label
    def run_pseudo_label(self, trainer) -> dict:
        if self.method["psa"]["everything_mode"].get("crop_n_layers", 0) != 0:
            raise ConfigError(
                "method.psa.everything_mode.crop_n_layers must be 0: PSA encodes each image once and "
                "shares that embedding between everything-mode and the thing prompts"
            )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.claim_label_dir(trainer)
        trainer.predict(self, return_predictions=False)
        self.semantic_connectivity_correction()
        self.publish_label_stages(trainer)
        return self.pseudo_label_results

    def producer(self) -> dict:
        """What the labels depend on: the base model's and SAM's weights (by content) and every setting used."""
        sam = self.method["sam"]
        return {
            "base_ckpt": file_digest(self.method["base_ckpt"]),
            "sam_checkpoint": file_digest(sam["checkpoint"]) if sam.get("checkpoint") else None,
            "sam": {key: sam.get(key) for key in ("variant", "image_size", "tiny")},
            "pixel_threshold": self.method["pixel_threshold"],
            "psa": self.method["psa"],
            "scc": self.method["scc"],
            "target": self.hparams["data"]["target"],
        }

    def claim_label_dir(self, trainer) -> None:
        """Labels and caches are reused only by the producer that made them: a label_dir written from another
        base model, SAM or setting is refused, since none of its files would be recomputed."""
        path = self.label_dir / PRODUCER_FILE
        producer = json.loads(json.dumps(self.producer()))  # as JSON holds it: tuples become lists
        if path.is_file():
            recorded = json.loads(path.read_text())
            changed = sorted(key for key in producer.keys() | recorded.keys() if producer.get(key) != recorded.get(key))
            if changed:
                raise ConfigError(
                    f"method.label_dir={self.label_dir} holds labels made with a different {', '.join(changed)}; "
                    "set a new method.label_dir (or delete that folder) to make labels for this base model and SAM"
                )
        elif trainer.is_global_zero:
            save_json(path, producer)
        trainer.strategy.barrier()

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
        sam_cfg, psa = self.method["sam"], self.method["psa"]
        sam = build_sam(sam_cfg["variant"], sam_cfg.get("checkpoint"), sam_cfg.get("image_size"), sam_cfg.get("tiny"))
        sam.to(self.device).eval().requires_grad_(False)
        predictor = SharedEmbeddingPredictor(sam)
        everything = SamAutomaticMaskGenerator(sam, **psa["everything_mode"])
        everything.predictor = predictor
        self.psa_tools = {"predictor": predictor, "everything": everything}
        labelling_mode(self.segmenter)
        self.psa_started = self.last_progress_line = time.monotonic()

    def cache_path(self, index: int) -> Path:
        return self.cache_dir / f"{index:06d}.npz"

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> None:
        method = self.method
        logits = self(batch["img"])
        pixel_labels = pixel_pseudo_labels(logits.softmax(1), method["pixel_threshold"]).cpu().numpy()
        for i, index in enumerate(batch["index"]):
            started = time.perf_counter()
            psa_labels = self.pixel_semantic_aggregation(batch["image"][i], pixel_labels[i])
            self.timing["seconds"] += time.perf_counter() - started
            self.timing["images"] += 1
            self.log_psa_progress()
            components = connected_components(psa_labels)
            losses, prediction, confidence = component_losses(logits[i], components)
            truth = batch["mask"][i].numpy()
            save_npz(
                self.cache_path(index),
                psa=psa_labels.astype(np.uint8),
                index=components.index.astype(np.int32),
                classes=components.classes,
                losses=losses.cpu().numpy(),
                prediction=prediction.cpu().numpy(),
                confidence=confidence.cpu().numpy(),
                original_size=batch["original_size"][i],
                confusion_pixel=label_confusion(pixel_labels[i], truth, self.num_classes),
                confusion_psa=label_confusion(psa_labels, truth, self.num_classes),
            )

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
        aggregated = paint_in_order(
            masks,
            semantic_alignment(masks, labels, psa["stuff_classes"], psa["stuff_align_threshold"]),
            np.full(labels.shape, IGNORE_INDEX, dtype=np.int64),
        )
        things = connected_components(labels, psa["thing_classes"], psa["min_thing_pixels"])
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
        scc = self.method["scc"]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = list(range(rank, len(TargetTrainImages(self.hparams["data"]["target"])), world))
        local_losses = np.concatenate(
            [np.load(self.cache_path(index))["losses"] for index in mine] or [np.zeros(0, np.float32)]
        )
        counts = all_gather_cat(torch.tensor([len(local_losses)], device=device)).cpu().numpy()
        all_losses = all_gather_cat(torch.from_numpy(local_losses).to(device)).cpu().numpy()
        noisy_probability = fit_noise_gmm(
            all_losses, scc["gmm_max_iter"], scc["gmm_tol"], scc["gmm_reg_covar"], seed=self.hparams["seed"]
        )
        log.info(
            "rank %d: GMM split of %d components: %d noisy, digest %s",
            rank,
            len(all_losses),
            int((noisy_probability > scc["noise_threshold"]).sum()),
            hashlib.sha1(np.round(noisy_probability, 6).tobytes()).hexdigest()[:16],
        )
        start = int(counts[:rank].sum())
        local_noisy = noisy_probability[start : start + len(local_losses)]
        confusions = {stage: np.zeros((self.num_classes, self.num_classes), np.int64) for stage in LABEL_STAGES}
        offset, written = 0, 0
        for index in mine:
            cache = np.load(self.cache_path(index))
            count = len(cache["losses"])
            path = pseudo_label_path(self.label_dir, index)
            if not path.is_file():
                corrected = correct_components(
                    cache["classes"],
                    local_noisy[offset : offset + count],
                    cache["prediction"],
                    cache["confidence"],
                    scc["noise_threshold"],
                    scc["correction_threshold"],
                )
                labels = relabel(cache["index"], corrected)
                height, width = (int(v) for v in cache["original_size"])
                save_label_png(path, cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST))
                written += 1
            offset += count
            confusions["pixel"] += cache["confusion_pixel"]
            confusions["psa"] += cache["confusion_psa"]
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
        self.report_pseudo_labels(confusions, all_losses, noisy_probability, written)

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
        self, confusions: dict, losses: np.ndarray, noisy_probability: np.ndarray, written: int
    ) -> None:
        """Accuracy / mIoU / coverage of the labels before PSA, after PSA and after SCC (summed over ranks)."""
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
            }
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
        noise_threshold = self.method["scc"]["noise_threshold"]
        self.pseudo_label_results = {
            "method": self.method["name"],
            "task": self.hparams["task"]["name"],
            "stage": "pseudo_label",
            "label_dir": str(self.label_dir),
            "metrics": metrics,
            "components": {"total": int(len(losses)), "noisy": int((noisy_probability > noise_threshold).sum())},
            "psa_images": int(timing[0]),
            "psa_images_per_second": timing[0] / max(timing[1], 1e-9),
            "psa_seconds_per_encoder_second": timing[1] / max(timing[2], 1e-9),
            "labels_written_by_rank0": written,
        }
        if self.trainer.is_global_zero:
            for stage in LABEL_STAGES:
                log.info(
                    "pseudo-labels %-5s: pixel accuracy %.2f, mIoU %s, labelled pixels %d",
                    stage,
                    metrics[stage]["pixel_accuracy"],
                    metrics[stage]["mIoU"],
                    metrics[stage]["labelled_pixels"],
                )
            run_dir = Path(self.hparams["run_dir"])
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "pseudo_label_results.json").write_text(json.dumps(self.pseudo_label_results, indent=2))


def at_size(labels: np.ndarray, size) -> np.ndarray:
    """A label map resized to ``size`` (H, W), nearest neighbour."""
    return cv2.resize(labels, tuple(size)[::-1], interpolation=cv2.INTER_NEAREST)
