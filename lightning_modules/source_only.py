"""Source-only baseline: DeepLabV2 trained with cross-entropy on labelled source images, evaluated on
the target. With ``+method=oracle`` the same module is trained on labelled *target* images instead,
which gives the upper bound every adaptation method is measured against.
"""

from __future__ import annotations

from lightning_modules.base import SemanticSegmentationModule


class SourceOnly(SemanticSegmentationModule):
    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.segmenter = self.build_segmenter(self.method["source_ckpt"])

    def training_step(self, batch: dict, batch_idx: int):
        labelled = batch["src"]
        logits, _ = self.segmenter(labelled["img"])
        loss = self.supervised_loss(logits, labelled["mask"])
        self.log("train/loss", loss, prog_bar=True)
        return loss
