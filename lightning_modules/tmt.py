"""TMT: Transferable Mask Transformer (Zhang et al., arXiv 2504.05774) on DAFormer self-training.

Per iteration (``training_step``):
  1. ACTE: the EMA teacher's decoder features of the source and target images are grouped into regions
     (iterative soft clustering over structural + semantic similarity); a region discriminator estimates
     each region's transferability, spread back to a dense map T.
  2. TMA: the student's encoder attention logits get the bias M = -lambda G per key, in the configured
     stages, G = T - mu U with U the region's semantic uncertainty (the abstract's "low transferability and
     high semantic uncertainty"); source images are learnt with cross-entropy under their own map. At
     inference the map guides the prediction only with ``method.guided_inference``.
  3. DAFormer self-training: teacher pseudo-labels on the target weighted by their confidence quality (zero
     on the pseudo-label crop's border rows), ClassMix of source into target (images, labels and
     guidance maps alike), colour jitter and blur, weighted cross-entropy on the mixed images; the
     source images also pull the student's encoder towards the reference encoder on thing classes (FD).
  4. The region discriminator learns source-vs-target on the (detached) region features.
  5. EMA update of the teacher.
``method.transferability_guidance=false`` skips 1, 4 and the guidance of 2 and 3: the plain DAFormer base.
Rare class sampling, DAFormer's third part, acts in the data (datamodules/rare_class_sampling.py).
``method.setting=finetune`` (configs/method/tmt_finetune.yaml) is the abstract's transfer setting instead: the
labelled target fraction learnt with cross-entropy, guided by ACTE's map between source and target
(``finetuning_step``).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from datamodules.constants import IGNORE_INDEX
from datamodules.errors import ConfigError, require_choice
from lightning_modules.base import SemanticSegmentationModule
from lightning_modules.components.ops import upsample
from lightning_modules.components.self_training import (
    CLASS_MIX_CLASSES,
    class_mix_masks,
    downscale_labels,
    ema_momentum,
    ignore_border_rows,
    masked_feature_distance,
    mix,
    pseudo_labels_with_quality,
    strong_photometric,
)
from lightning_modules.components.transferability import (
    guidance_map,
    partition_descriptors,
    region_averaged,
    region_correctness,
    region_domain_loss,
    region_means,
    region_partition,
    region_transferability,
    semantic_uncertainty,
    transferability_attention_bias,
    transferability_map,
)
from lightning_modules.networks.factory import build_network
from lightning_modules.networks.heads import RegionDomainDiscriminator
from lightning_modules.panels import colourised, grey, relative_grey
from lightning_modules.teachers import ema_update

log = logging.getLogger(__name__)

# uda: DAFormer self-training with source labels and unlabelled target images; finetune: the labelled fraction of
# the target (data.target_labelled_fraction) trains a source-pretrained model.
SETTINGS = ("uda", "finetune")


class TMT(SemanticSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        require_choice("method.setting", self.method["setting"], SETTINGS)
        require_choice("method.class_mix_classes", self.method["class_mix_classes"], CLASS_MIX_CLASSES)
        if self.method["setting"] == "finetune" and "tgt_labelled" not in self.method["streams"]:
            raise ConfigError(
                "tmt's fine-tuning setting learns from the labelled target images: method.streams must hold "
                f"'tgt_labelled' (got {list(self.method['streams'])}); use +method=tmt_finetune"
            )
        stages = range(len(cfg["model"]["depths"]))
        if not set(self.method["guided_stages"]) <= set(stages):
            raise ConfigError(
                f"method.guided_stages={list(self.method['guided_stages'])}; the encoder's stages are {list(stages)}"
            )
        self.segmenter = self.build_segmenter(self.method["source_ckpt"])
        self.teacher = self.frozen_copy(self.segmenter)
        self.guided = self.method["transferability_guidance"]
        if self.guided:
            self.discriminator = RegionDomainDiscriminator(
                cfg["model"]["decoder_embed_dim"], self.method["discriminator_hidden"]
            )
        self.reference_encoder = self.build_reference_encoder() if self.method["feature_distance"] else None
        self.transferability_correct = MeanMetric()
        self.transferability_incorrect = MeanMetric()

    def build_reference_encoder(self):
        """The frozen encoder of the feature distance: the ImageNet one (``model.pretrained``), as DAFormer's, or
        without ImageNet weights the encoder the run starts from."""
        model = self.hparams["model"]
        if model.get("pretrained"):
            return self.frozen_copy(build_network(model, self.num_classes).backbone)
        log.info("feature distance: model.pretrained is not set, so the reference is the frozen initial encoder")
        return self.frozen_copy(self.segmenter.backbone)

    # ACTE -------------------------------------------------------------------------------------------
    def estimate_transferability(self, features: torch.Tensor, images: torch.Tensor, logits: torch.Tensor):
        """Regions of each image, their transferability and what guides the attention: (assignment [B, R, N],
        domain logits, T(r), the dense map T, the guidance map G = T - mu U with U the region's mean uncertainty of
        the prediction ``logits``)."""
        method = self.method
        descriptors = partition_descriptors(features.detach(), images, method["structure_weight"])
        assignment = region_partition(
            descriptors, method["cell_size"], method["cluster_iterations"], method["assignment_sharpness"]
        )
        pooled = region_means(assignment, features.detach().flatten(2).float())
        domain_logits = self.discriminator(pooled)
        transferability = region_transferability(domain_logits.detach())
        dense = transferability_map(assignment, transferability, *features.shape[-2:])
        uncertainty = region_averaged(assignment, semantic_uncertainty(logits.detach()))
        guidance = guidance_map(dense, uncertainty, method["uncertainty_weight"])
        return assignment, domain_logits, transferability, dense, guidance

    def attention_bias(self, guidance: torch.Tensor | None):
        if guidance is None:
            return None
        return transferability_attention_bias(guidance, self.method["attention_strength"])

    def student(self, images: torch.Tensor, guidance: torch.Tensor | None):
        """(logits, encoder features) of the student, its attention guided by the map ``guidance`` when given."""
        encoder_features = self.segmenter.backbone(images, self.attention_bias(guidance), self.method["guided_stages"])
        logits, _ = self.segmenter.decode_head(encoder_features)
        return logits, encoder_features

    # DAFormer's parts ---------------------------------------------------------------------------------
    def thing_feature_distance(self, images: torch.Tensor, labels: torch.Tensor, features: torch.Tensor):
        """lambda_FD * d_FD on the cells of thing classes (DAFormer Eq. 7-8) of the last encoder stage."""
        settings = self.method["feature_distance"]
        cells = downscale_labels(
            labels, labels.shape[-1] // features.shape[-1], settings["min_ratio"], self.num_classes
        )
        things = torch.isin(cells, torch.tensor(settings["classes"], device=cells.device)).float()
        self.log("train/feature_distance_cells", things.mean())
        if not things.any():  # the distance and its gradient are 0: the reference pass would be wasted
            return features.new_zeros(())
        with torch.no_grad():
            reference = self.reference_encoder(images)[-1]
        return settings["weight"] * masked_feature_distance(features, reference, things)

    def cropped_pseudo_weight(self, quality: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The pseudo-label weight map: the batch's quality everywhere, 0 on the crop's rows (scaled to the task)."""
        weight = quality.expand(shape)
        crop = self.method["pseudo_label_crop"]
        if not crop:
            return weight
        scale = shape[-2] / crop["reference_height"]
        return ignore_border_rows(weight, round(crop["top"] * scale), round(crop["bottom"] * scale))

    # Training ---------------------------------------------------------------------------------------
    def guidance_maps(self, source_images, target_images, target_teacher: tuple, losses: dict):
        """Steps 1 and 4: ACTE on the teacher's view of both domains and the region discriminator's loss (into
        ``losses``); returns the (source, target) guidance maps. ``target_teacher`` is the teacher's (logits,
        features) of the target images; the source gets a teacher pass of its own because the teacher normalises
        with the statistics of the batch it sees."""
        batch_size = source_images.shape[0]
        with torch.no_grad():
            source_logits, source_features = self.teacher(source_images)
        target_logits, target_features = target_teacher
        assignment, domain_logits, transferability, _, guidance = self.estimate_transferability(
            torch.cat([source_features, target_features]),
            torch.cat([source_images, target_images]),
            torch.cat([source_logits, target_logits]),
        )
        is_source = torch.arange(2 * batch_size, device=guidance.device) < batch_size
        # The discriminator's estimate is detached from the maps.
        losses["domain"] = self.method["domain_loss_weight"] * region_domain_loss(
            domain_logits, is_source, assignment.sum(-1)
        )
        self.log("train/transferability_source", transferability[:batch_size].mean())
        self.log("train/transferability_target", transferability[batch_size:].mean())
        return guidance.split(batch_size)

    def total_loss(self, losses: dict) -> torch.Tensor:
        loss = sum(losses.values())
        self.log_dict({f"train/loss_{k}": v for k, v in losses.items()})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int):
        if self.method["setting"] == "finetune":
            return self.finetuning_step(batch["src"]["img"], batch["tgt_labelled"])
        method = self.method
        source, target = batch["src"], batch["tgt"]
        with torch.no_grad():
            teacher_logits, teacher_features = self.teacher(target["img"])
        source_map = target_map = None
        losses = {}
        if self.guided:
            source_map, target_map = self.guidance_maps(
                source["img"], target["img"], (teacher_logits, teacher_features), losses
            )

        # 2. Supervised source loss through the (guided) student, and DAFormer's feature distance on its encoder.
        source_logits, source_features = self.student(source["img"], source_map)
        losses["source"] = self.supervised_loss(source_logits, source["mask"])
        if self.reference_encoder is not None:
            losses["feature_distance"] = self.thing_feature_distance(source["img"], source["mask"], source_features[-1])

        # 3. Pseudo-labels, ClassMix, strong augmentation, quality-weighted CE.
        target_logits = upsample(teacher_logits, target["img"].shape[-2:])
        pseudo, quality = pseudo_labels_with_quality(target_logits, method["pseudo_threshold"])
        mask = class_mix_masks(source["mask"], classes_from=method["class_mix_classes"])
        mixed_images = strong_photometric(
            mix(mask, source["img"], target["img"]),
            method["color_jitter_p"],
            method["color_jitter_strength"],
            method["blur_p"],
            method["blur_sigma"],
            method["color_jitter_hue"],
            jitter_together=True,
        )
        mixed_labels = torch.where(mask.bool(), source["mask"], pseudo)
        mixed_weight = torch.where(mask.bool(), torch.ones_like(mask), self.cropped_pseudo_weight(quality, mask.shape))
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
        self.log("train/pseudo_quality", quality)
        return self.total_loss(losses)

    def finetuning_step(self, source_images: torch.Tensor, target: dict):
        """The transfer setting of the TMT abstract: the source-pretrained student learns the labelled target
        images, its attention guided by ACTE's map between the source and the target (unguided: vanilla
        fine-tuning). The source images only feed the estimator."""
        losses = {}
        target_map = None
        if self.guided:
            with torch.no_grad():
                target_teacher = self.teacher(target["img"])
            _, target_map = self.guidance_maps(source_images, target["img"], target_teacher, losses)
        logits, _ = self.student(target["img"], target_map)
        losses["target"] = self.supervised_loss(logits, target["mask"])
        return self.total_loss(losses)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # 5. Mean teacher.
        ema_update(self.teacher, self.segmenter, ema_momentum(self.global_step, self.method["ema_alpha"]))

    # Inference --------------------------------------------------------------------------------------
    def guided_forward(self, images: torch.Tensor):
        """Plain pass -> ACTE maps -> guided pass (``method.guided_inference``); returns (logits at input size,
        assignment, T(r), transferability map, guidance map). Without guided inference the plain pass predicts and
        the maps are only measured."""
        logits, features = self.segmenter(images)
        if not self.guided:
            return upsample(logits, images.shape[-2:]), None, None, None, None
        assignment, _, transferability, dense, guidance = self.estimate_transferability(features, images, logits)
        if self.method["guided_inference"]:
            logits, _ = self.student(images, guidance)
        return upsample(logits, images.shape[-2:]), assignment, transferability, dense, guidance

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.guided_forward(images)[0]

    def evaluation_step(self, batch: dict) -> None:
        logits, assignment, transferability, dense, _ = self.guided_forward(batch["img"])
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
        """The base panel, the teacher's pseudo-labels and, when guided, the paper's Fig. 1 views: the transferability
        map (white = transferable) at feature resolution and the attention mask, exp(M) on the key grid of the
        first guided stage, the factor by which each key's attention is scaled (white = the most attended)."""
        columns = super().panel_columns(batch)
        images = batch["img"]
        teacher_logits, _ = self.teacher(images)
        columns["pseudo-label"] = colourised(upsample(teacher_logits, images.shape[-2:]).argmax(1))
        if self.guided:
            _, _, _, dense, guidance = self.guided_forward(images)
            columns["transferability"] = grey(dense[:, 0])
            stage = min(self.method["guided_stages"])
            stride = 4 * 2**stage * self.hparams["model"]["sr_ratios"][stage]
            key_grid = (math.ceil(images.shape[-2] / stride), math.ceil(images.shape[-1] / stride))
            mask = F.adaptive_avg_pool2d(self.attention_bias(guidance), key_grid).exp()
            columns["attention mask"] = relative_grey(mask[:, 0])
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
