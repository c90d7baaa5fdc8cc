"""``build_datamodule`` turns a run's composed config into the datamodule its task needs."""

from __future__ import annotations

from datamodules.prompted import build_prompted_datamodule
from datamodules.uda import UDADataModule


def build_datamodule(cfg: dict):
    """UDADataModule for semantic tasks, PromptedDataModule for the SAM tasks."""
    data, task, method = cfg["data"], cfg["task"], cfg["method"]
    if task["kind"] == "semantic":
        return UDADataModule(
            source=data.get("source"),
            target=data["target"],
            val=data["val"],
            streams=method["streams"],
            labelled_domain=data["labelled_domain"],
            crop_size=data.get("crop_size"),
            strong_view=data["strong_view"],
            batch_size=data["batch_size"],
            num_workers=data["num_workers"],
            seed=cfg["seed"],
            pseudo_label_dir=data.get("pseudo_label_dir"),
            verify=data["verify"],
            data_root=data["root"],
            rare_class_sampling=method.get("rare_class_sampling"),
            num_classes=task["num_classes"],
            target_labelled_fraction=data.get("target_labelled_fraction"),
            cat_max_ratio=method.get("cat_max_ratio"),
        )
    return build_prompted_datamodule(cfg)
