"""Dataset registry: ``build_dataset(name, root, split, **options)`` is how the datamodules get data.

Every dataset is one file of this package and every constructor takes ``(root, split, **options)``. The
procedural datasets (class attribute ``procedural = True``) draw their images and need no root; every real
dataset needs one and states its official layout in ``layout``. Layouts, label tables and splits:
docs/datasets.md.
"""

from __future__ import annotations

from datamodules.datasets.base import InstanceDataset, SemanticDataset
from datamodules.datasets.camo import CAMO
from datamodules.datasets.cityscapes import Cityscapes
from datamodules.datasets.coco import COCO
from datamodules.datasets.cod10k import COD10K
from datamodules.datasets.gta5 import GTA5
from datamodules.datasets.kvasir import KvasirSEG
from datamodules.datasets.nthu import NTHUCrossCity
from datamodules.datasets.ocid import OCID
from datamodules.datasets.synth_regions import SyntheticStreetRegions
from datamodules.datasets.synth_shapes import SyntheticShapes
from datamodules.datasets.synth_streets import SyntheticStreets
from datamodules.datasets.synthia import Synthia
from datamodules.datasets.voc import PascalVOC
from datamodules.errors import ConfigError, DatasetLayoutError

DATASETS = {
    "cityscapes": Cityscapes,
    "nthu": NTHUCrossCity,
    "gta5": GTA5,
    "synthia": Synthia,
    "coco": COCO,
    "voc": PascalVOC,
    "camo": CAMO,
    "cod10k": COD10K,
    "kvasir": KvasirSEG,
    "ocid": OCID,
    "synth_streets": SyntheticStreets,
    "synth_shapes": SyntheticShapes,
    "synth_regions": SyntheticStreetRegions,
}


def build_dataset(name: str, root, split: str, **options):
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'; available: {', '.join(sorted(DATASETS))}")
    dataset = DATASETS[name]
    if root is None and not getattr(dataset, "procedural", False):
        raise DatasetLayoutError(
            f"dataset '{name}' needs its 'root' key set to the dataset folder; expected layout: {dataset.layout}"
        )
    return dataset(root, split, **options)


def build_from_spec(spec: dict, default_split: str):
    """A dataset from a task's spec ``{"name", "root", "split", "options"}`` (configs/task/*.yaml)."""
    return build_dataset(
        spec["name"], spec.get("root"), spec.get("split", default_split), **(spec.get("options") or {})
    )


__all__ = ["DATASETS", "InstanceDataset", "SemanticDataset", "build_dataset", "build_from_spec"]
