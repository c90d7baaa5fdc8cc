"""What a SAM's own masks know about a domain: ``python -m experiments.sam_probe RUN_DIR [--stream target] [--task T]``.

``--everything IOU,STABILITY,OFFSET ...`` scores SAM's everything mode instead (16 x 16 point grid) at each
filter setting on the run's own held-out ``data.val``: masks per image, the share of the image they cover, and
their purity (the share of mask pixels inside each mask's best-matching true region). seco's Pixel Semantic
Aggregation votes a class over each mask, so a mask that straddles two regions labels part of it wrongly; the
benchmark's filters for seco's tiny region SAM were chosen this way, with no target image.

A source-free SAM method learns from its own masks, so it can only gain where they already carry the
object. Per prompt kind this prints the masks' IoU, the share of each object they cover (recall), their
precision, and how well the mask logits rank object above background inside the object's box (AUC;
0.5 means the masks know nothing the prompt did not say). The last two columns tell a miscalibrated SAM from a
blind one: the IoU at the one logit threshold (of ``THRESHOLDS``, the same for every mask) that scores best, and that
threshold. A SAM whose masks hold the object only below the task's threshold gets a far better IoU there; a method
that learns its own masks binarised at 0 (WeSAM, dual_lora_sam) keeps that cut and cannot lift it.

RUN_DIR is a finished SAM run (its ``config.yaml`` and ``sam.pth``, e.g. the benchmark's
``stages/seed0/sam_source``); ``--task`` reads the stream of another task (the source SAM on each of its targets).
It reads labels, so it analyses a benchmark's regime; no method trains on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from datamodules.datasets import build_from_spec
from datamodules.prompted import PromptedDataset, collate_prompted
from datamodules.prompts import masks_to_boxes
from lightning_modules.components.ops import unpadded
from lightning_modules.metrics import instance_iou
from lightning_modules.networks.sam import PROMPT_KINDS, build_configured_sam, predict_instances


def box_auc(logits: torch.Tensor, instance: torch.Tensor, box: torch.Tensor) -> float | None:
    """AUC of ``logits`` [H,W] separating ``instance`` (bool [H,W]) from the rest of its xyxy ``box``
    (inclusive max, as ``masks_to_boxes``); None when the box holds only object or no object."""
    x0, y0, x1, y1 = box.int().tolist()
    region = (slice(y0, y1 + 1), slice(x0, x1 + 1))
    inside = instance[region].flatten().numpy()
    if inside.all() or not inside.any():
        return None
    return float(roc_auc_score(inside, logits[region].flatten().float().numpy()))


# Logit thresholds of the best-threshold column: SAM's own cut is 0, WeSAM's metric cuts at 0.5.
THRESHOLDS = (-4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def best_threshold(ious_by_threshold: dict[float, list[float]]) -> tuple[float, float]:
    """(threshold, mean IoU) of the threshold whose mean IoU over all masks is highest."""
    threshold = max(ious_by_threshold, key=lambda t: np.mean(ious_by_threshold[t]))
    return threshold, float(np.mean(ious_by_threshold[threshold]))


def mask_quality(logits: torch.Tensor, instances: torch.Tensor, threshold: float = 0.0) -> dict[str, list[float]]:
    """Per instance of one image: IoU (the evaluation's ``instance_iou``), recall and precision of
    ``logits > threshold`` [N,H,W] against ``instances`` [N,H,W] (binary), and the in-box AUC (instances filling
    their box have none)."""
    predicted, truth = logits > threshold, instances > 0.5
    overlap = (predicted & truth).flatten(1).sum(1).float()
    aucs = [box_auc(logit, t, b) for logit, t, b in zip(logits, truth, masks_to_boxes(truth))]
    return {
        "iou": instance_iou(logits, instances, threshold).tolist(),
        "recall": (overlap / truth.flatten(1).sum(1).clamp(min=1)).tolist(),
        "precision": (overlap / predicted.flatten(1).sum(1).clamp(min=1)).tolist(),
        "auc": [a for a in aucs if a is not None],
    }


def load_sam_run(run_dir: Path, images: int) -> tuple[dict, torch.nn.Module]:
    """A finished SAM run's resolved config and its SAM in eval mode, after one sentence for a folder that is not
    such a run or an ``--images`` below 1."""
    for required in (run_dir / "config.yaml", run_dir / "sam.pth"):
        if not required.is_file():
            raise SystemExit(
                f"{required} does not exist; expected a finished SAM run directory (its config.yaml and sam.pth)"
            )
    if images < 1:
        raise SystemExit(f"--images {images}: expected at least 1")
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    return cfg, build_configured_sam(cfg["model"], run_dir / "sam.pth").eval()


def region_purity(masks: np.ndarray, regions: np.ndarray) -> tuple[float, float, float]:
    """Coverage (share of pixels under any mask) and the purity sums (mask pixels inside each mask's best-matching
    region, all mask pixels) of everything-mode ``masks`` bool[M,H,W] against the true ``regions`` bool[R,H,W]."""
    if len(masks) == 0:
        return 0.0, 0.0, 0.0
    flat_masks = masks.reshape(len(masks), -1).astype(np.float32)
    overlap = flat_masks @ regions.reshape(len(regions), -1).T.astype(np.float32)
    return float(masks.any(0).mean()), float(overlap.max(1).sum()), float(flat_masks.sum())


@torch.no_grad()
def everything_mode_quality(run_dir: Path, images: int, filters: list[tuple[float, float, float]]) -> list[dict]:
    """Per (pred_iou_thresh, stability_score_thresh, stability_score_offset): masks per image, coverage and purity
    of RUN_DIR's SAM in everything mode on ``images`` images of its ``data.val``."""
    from segment_anything import SamAutomaticMaskGenerator

    cfg, sam = load_sam_run(run_dir, images)
    dataset = build_from_spec(cfg["data"]["val"], "val")
    items = [dataset[i] for i in range(min(images, len(dataset)))]
    table = []
    for iou, stability, offset in filters:
        generator = SamAutomaticMaskGenerator(
            sam,
            points_per_side=16,
            pred_iou_thresh=iou,
            stability_score_thresh=stability,
            stability_score_offset=offset,
        )
        counts, coverages, inside, total = [], [], 0.0, 0.0
        for item in items:
            masks = [m["segmentation"] for m in generator.generate(item["image"])]
            counts.append(len(masks))
            stacked = np.stack(masks) if masks else np.zeros((0, *item["image"].shape[:2]), bool)
            coverage, pure, area = region_purity(stacked, item["instances"].astype(bool))
            coverages.append(coverage)
            inside, total = inside + pure, total + area
        table.append(
            {
                "filters": (iou, stability, offset),
                "masks": float(np.mean(counts)),
                "coverage": float(np.mean(coverages)),
                "purity": inside / total if total else float("nan"),
            }
        )
    return table


def filter_setting(text: str) -> tuple[float, float, float]:
    values = text.split(",")
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected IOU,STABILITY,OFFSET, e.g. 0.3,0.8,0.1")
    return tuple(float(v) for v in values)


def task_data(task: str) -> dict:
    """The ``data`` config of a SAM task, composed as a run of it would be."""
    from experiments.run import compose_config

    cfg = compose_config(["+method=sam_finetune", f"+task={task}", "run_dir=."])
    return OmegaConf.to_container(cfg.data, resolve=True)


@torch.no_grad()
def probe(run_dir: Path, stream: str, images: int, view: str, task: str | None = None) -> dict[str, dict[str, float]]:
    """Mean mask quality per prompt kind of RUN_DIR's SAM on ``images`` images of ``data.<stream>``."""
    cfg, sam = load_sam_run(run_dir, images)
    model, data = cfg["model"], task_data(task) if task else cfg["data"]
    if data.get(stream) is None:
        raise SystemExit(f"the run's task has no data.{stream}; expected one of source, target, val")
    # train=True gives the strong view too; training items are keyed (epoch, index): these are epoch 0's draws.
    dataset = PromptedDataset(
        build_from_spec(data[stream], "train"),
        model["image_size"],
        train=True,
        strong_view=view == "strong",
        seed=cfg["seed"],
        input_scale=cfg["data"].get("sam_input", "sam"),  # the scale the run's SAM read (older runs: "sam")
    )
    batch = collate_prompted([dataset[(0, i)] for i in range(min(images, len(dataset)))])
    embeddings = sam.image_encoder(batch["img_strong" if view == "strong" else "img"])
    table = {}
    for kind in cfg["task"]["prompt_kinds"]:
        totals: dict[str, list[float]] = {}
        ious_by_threshold: dict[float, list[float]] = {t: [] for t in THRESHOLDS}
        for logits, target in zip(
            predict_instances(sam, embeddings, batch["targets"], kind, model["poly_as"]), batch["targets"]
        ):
            mask_logits, instances = unpadded(logits[:, 0], target), unpadded(target["instances"], target)
            quality = mask_quality(mask_logits, instances, cfg["task"]["logit_threshold"])
            for name, values in quality.items():
                totals.setdefault(name, []).extend(values)
            for threshold, ious in ious_by_threshold.items():
                ious.extend(instance_iou(mask_logits, instances, threshold).tolist())
        table[kind] = {name: float(np.mean(values)) if values else float("nan") for name, values in totals.items()}
        table[kind]["best_threshold"], table[kind]["best_iou"] = best_threshold(ious_by_threshold)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stream", default="target", choices=("source", "target", "val"))
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--view", default="weak", choices=("weak", "strong"))
    parser.add_argument("--task", help="read data.<stream> of this task instead of the run's own")
    parser.add_argument(
        "--everything", nargs="+", type=filter_setting, metavar="IOU,STABILITY,OFFSET", help="score everything mode"
    )
    args = parser.parse_args(argv)
    if args.everything:
        header = "| pred_iou_thresh, stability, offset | masks / image | coverage | purity |"
        print(f"{header}  ({args.run_dir} on data.val)")
        print("|---|---|---|---|")
        for row in everything_mode_quality(args.run_dir, args.images, args.everything):
            print(
                f"| {', '.join(map(str, row['filters']))} | {row['masks']:.1f} | {100 * row['coverage']:.1f} | "
                f"{100 * row['purity']:.1f} |"
            )
        return
    table = probe(args.run_dir, args.stream, args.images, args.view, args.task)
    where = f"{args.task or 'its task'}'s data.{args.stream}"
    print(
        f"| prompt | IoU | recall | precision | in-box AUC | IoU at the best threshold | best threshold |  "
        f"({args.run_dir} on {where}, {args.view} view)"
    )
    print("|---|---|---|---|---|---|---|")
    for kind in PROMPT_KINDS:
        if kind in table:
            row = table[kind]
            print(
                f"| {kind} | {100 * row['iou']:.1f} | {100 * row['recall']:.1f} | {100 * row['precision']:.1f} | "
                f"{row['auc']:.3f} | {100 * row['best_iou']:.1f} | {row['best_threshold']:g} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
