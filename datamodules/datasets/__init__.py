"""Dataset registry: ``build_dataset(name, root, split, **options)`` is how the datamodules get data.

Every constructor takes ``(root, split, **options)``; the procedural datasets need no root and
ignore it, every real dataset needs one.
"""
from __future__ import annotations

from datamodules.datasets.base import DatasetLayoutError, InstanceDataset, SemanticDataset
from datamodules.datasets.camo import CAMO
from datamodules.datasets.cityscapes import Cityscapes
from datamodules.datasets.coco import COCO
from datamodules.datasets.cod10k import COD10K
from datamodules.datasets.gta5 import GTA5
from datamodules.datasets.kvasir import KvasirSEG
from datamodules.datasets.ocid import OCID
from datamodules.datasets.synthia import Synthia
from datamodules.datasets.voc import PascalVOC

# datamodules.synthetic imports this package's base module, so the adapters import it lazily
# (a module-level import would be circular when datamodules.synthetic is imported first).


def synth_streets(root, split: str = "train", **options):
    from datamodules.synthetic import SyntheticStreets

    return SyntheticStreets(split=split, **options)


def synth_shapes(root, split: str = "train", **options):
    from datamodules.synthetic import SyntheticShapes

    return SyntheticShapes(split=split, **options)


def synth_regions(root, split: str = "train", **options):
    from datamodules.synthetic import SyntheticStreetRegions

    return SyntheticStreetRegions(split=split, **options)


PROCEDURAL = {"synth_streets": synth_streets, "synth_shapes": synth_shapes, "synth_regions": synth_regions}
DATASETS = {
    "cityscapes": Cityscapes, "gta5": GTA5, "synthia": Synthia, "coco": COCO, "voc": PascalVOC, "camo": CAMO,
    "cod10k": COD10K, "kvasir": KvasirSEG, "ocid": OCID, **PROCEDURAL,
}


def pseudo_labelled(root, split: str = "train", dataset: dict | None = None, label_dir: str | None = None):
    """``dataset`` (a dataset spec) with the pseudo-labels under ``label_dir`` as its masks."""
    from datamodules.datasets.pseudo_labelled import PseudoLabelled

    if dataset is None or label_dir is None:
        raise DatasetLayoutError("pseudo_labelled needs options 'dataset' (the wrapped spec) and 'label_dir'")
    wrapped = build_dataset(dataset["name"], dataset.get("root"), dataset.get("split", split),
                            **(dataset.get("options") or {}))
    return PseudoLabelled(wrapped, label_dir)


DATASETS["pseudo_labelled"] = pseudo_labelled
PROCEDURAL["pseudo_labelled"] = pseudo_labelled


def build_dataset(name: str, root, split: str, **options):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; available: {', '.join(sorted(DATASETS))}")
    if root is None and name not in PROCEDURAL:
        raise DatasetLayoutError(f"dataset '{name}' needs its 'root' key set to the dataset folder; "
                                 f"expected layout: {DATASETS[name].layout}")
    return DATASETS[name](root, split, **options)


__all__ = ["DATASETS", "DatasetLayoutError", "InstanceDataset", "SemanticDataset", "build_dataset"]
