"""TMT: Transferable Mask Transformer (Zhang et al., arXiv 2504.05774) on DAFormer self-training.

Per iteration (``training_step``):
  1. ACTE: the EMA teacher's decoder features of the source and target images are grouped into regions
     (iterative soft clustering over structural + semantic similarity); a region discriminator estimates
     each region's transferability, spread back to a dense map T.
  2. TMA: the student's encoder attention logits get the bias M = -lambda T per key, in the configured
     stages; source images are learnt with cross-entropy under their own map.
  3. DAFormer self-training: teacher pseudo-labels on the target weighted by their confidence quality,
     ClassMix of source into target (images, labels and transferability maps alike), colour jitter and
     blur, weighted cross-entropy on the mixed images.
  4. The region discriminator learns source-vs-target on the (detached) region features.
  5. EMA update of the teacher.
``method.transferability_guidance=false`` skips 1, 2 and 4: the plain DAFormer-style base.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from datamodules.constants import IGNORE_INDEX
from lightning_modules.base import SemanticSegmentationModule
from lightning_modules.components.ops import upsample
from lightning_modules.components.self_training import (
    class_mix_masks,
    ema_momentum,
    mix,
    pseudo_labels_with_quality,
    strong_photometric,
)
from lightning_modules.components.transferability import (
    partition_descriptors,
    region_correctness,
    region_domain_loss,
    region_means,
    region_partition,
    region_transferability,
    transferability_attention_bias,
    transferability_map,
)
from lightning_modules.networks.heads import RegionDomainDiscriminator
from lightning_modules.panels import colourised, grey
from lightning_modules.teachers import ema_update

log = logging.getLogger(__name__)


class TMT(SemanticSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.segmenter = self.build_segmenter(self.method["source_ckpt"])
        self.teacher = self.frozen_copy(self.segmenter)
        self.guided = self.method["transferability_guidance"]
        if self.guided:
            self.discriminator = RegionDomainDiscriminator(
                cfg["model"]["decoder_embed_dim"], self.method["discriminator_hidden"]
            )
        self.transferability_correct = MeanMetric()
        self.transferability_incorrect = MeanMetric()

    # ACTE -------------------------------------------------------------------------------------------
    def estimate_transferability(self, features: torch.Tensor, images: torch.Tensor):
        """Regions of each image and their transferability: (assignment [B, R, N], region features, T(r), map)."""
        method = self.method
        descriptors = partition_descriptors(features.detach(), images, method["structure_weight"])
        assignment = region_partition(
            descriptors, method["cell_size"], method["cluster_iterations"], method["assignment_sharpness"]
        )
        pooled = region_means(assignment, features.detach().flatten(2).float())
        domain_logits = self.discriminator(pooled)
        transferability = region_transferability(domain_logits.detach())
        dense = transferability_map(assignment, transferability, *features.shape[-2:])
        return assignment, domain_logits, transferability, dense

    def attention_bias(self, dense_map: torch.Tensor | None):
        if dense_map is None:
            return None
        return transferability_attention_bias(dense_map, self.method["attention_strength"])

    def student(self, images: torch.Tensor, dense_map: torch.Tensor | None):
        return self.segmenter(images, self.attention_bias(dense_map), self.method["guided_stages"])

    # Training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        method = self.method
        source, target = batch["src"], batch["tgt"]
        batch_size = source["img"].shape[0]

        # The base needs the teacher on the target only; ACTE also needs its view of the source, in a pass of
        # its own because the teacher normalises with the statistics of the batch it labels.
        with torch.no_grad():
            teacher_logits, teacher_features = self.teacher(target["img"])
        source_map = target_map = None
        losses = {}
        if self.guided:
            # 1. ACTE on the teacher's view of both domains.
            with torch.no_grad():
                _, source_teacher_features = self.teacher(source["img"])
            assignment, domain_logits, transferability, dense = self.estimate_transferability(
                torch.cat([source_teacher_features, teacher_features]), torch.cat([source["img"], target["img"]])
            )
            source_map, target_map = dense.split(batch_size)
            is_source = torch.arange(2 * batch_size, device=dense.device) < batch_size
            # 4. The region discriminator (its estimate is detached from the maps above).
            losses["domain"] = method["domain_loss_weight"] * region_domain_loss(
                domain_logits, is_source, assignment.sum(-1)
            )
            self.log("train/transferability_source", transferability[:batch_size].mean())
            self.log("train/transferability_target", transferability[batch_size:].mean())

        # 2. Supervised source loss through the (guided) student.
        source_logits, _ = self.student(source["img"], source_map)
        losses["source"] = self.supervised_loss(source_logits, source["mask"])

        # 3. Pseudo-labels, ClassMix, strong augmentation, quality-weighted CE.
        target_logits = upsample(teacher_logits, target["img"].shape[-2:])
        pseudo, quality = pseudo_labels_with_quality(target_logits, method["pseudo_threshold"])
        mask = class_mix_masks(source["mask"])
        mixed_images = strong_photometric(
            mix(mask, source["img"], target["img"]),
            method["color_jitter_p"],
            method["color_jitter_strength"],
            method["blur_p"],
            method["blur_sigma"],
        )
        mixed_labels = torch.where(mask.bool(), source["mask"], pseudo)
        mixed_weight = torch.where(mask.bool(), torch.ones_like(mask), quality.expand_as(mask))
        mixed_map = None
        if self.guided:
            feature_mask = F.interpolate(
                mask.unsqueeze(1), size=source_map.shape[-2:], mode="bilinear", align_corners=False
            ).squeeze(1)
            mixed_map = mix(feature_mask, source_map, target_map)
        mixed_logits, _ = self.student(mixed_images, mixed_map)
        pixel_loss = F.cross_entropy(
            upsample(mixed_logits, mixed_labels.shape[-2:]), mixed_labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        losses["target"] = (pixel_loss * mixed_weight).mean()

        loss = sum(losses.values())
        self.log_dict({f"train/loss_{k}": v for k, v in losses.items()})
        self.log("train/pseudo_quality", quality)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # 5. Mean teacher.
        ema_update(self.teacher, self.segmenter, ema_momentum(self.global_step, self.method["ema_alpha"]))

    # Inference --------------------------------------------------------------------------------------
    def guided_forward(self, images: torch.Tensor):
        """Unguided pass -> ACTE map -> guided pass; returns (logits at input size, assignment, T(r), map)."""
        logits, features = self.segmenter(images)
        if not self.guided:
            return upsample(logits, images.shape[-2:]), None, None, None
        assignment, _, transferability, dense = self.estimate_transferability(features, images)
        logits, _ = self.student(images, dense)
        return upsample(logits, images.shape[-2:]), assignment, transferability, dense

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.guided_forward(images)[0]

    def evaluation_step(self, batch: dict) -> None:
        logits, assignment, transferability, dense = self.guided_forward(batch["img"])
        prediction = logits.argmax(1)
        self.confusion.update(prediction, batch["mask"])
        if assignment is None:
            return
        size = dense.shape[-2:]
        small_prediction = F.interpolate(prediction[:, None].float(), size=size, mode="nearest").long().flatten(1)
        small_label = F.interpolate(batch["mask"][:, None].float(), size=size, mode="nearest").long().flatten(1)
        labelled, correct = region_correctness(assignment, small_prediction, small_label, IGNORE_INDEX)
        if (labelled & correct).any():
            self.transferability_correct.update(transferability[labelled & correct])
        if (labelled & ~correct).any():
            self.transferability_incorrect.update(transferability[labelled & ~correct])

    def panel_columns(self, batch: dict) -> dict:
        """The base panel, the teacher's pseudo-labels and, when guided, the transferability map (white =
        transferable) at the feature resolution the attention bias uses."""
        columns = super().panel_columns(batch)
        images = batch["img"]
        teacher_logits, _ = self.teacher(images)
        columns["pseudo-label"] = colourised(upsample(teacher_logits, images.shape[-2:]).argmax(1))
        if self.guided:
            columns["transferability"] = grey(self.guided_forward(images)[3][:, 0])
        return columns

    def log_evaluation(self, stage: str) -> None:
        if self.guided:
            # MeanMetric syncs over ranks; NaN when no region of that kind was seen.
            for name, metric in (
                ("correct", self.transferability_correct),
                ("incorrect", self.transferability_incorrect),
            ):
                value = metric.compute() if metric.update_count else torch.tensor(float("nan"))
                self.log(f"{stage}/transferability_{name}_regions", value)
                metric.reset()
        super().log_evaluation(stage)
