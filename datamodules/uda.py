"""Semantic-task data: a labelled stream, an unlabelled target stream and the labelled target val split.

A method asks for the training streams it needs (``streams``): ``"src"`` is the labelled stream (the
source domain, or the target domain for the oracle: ``labelled_domain=target``), ``"tgt"`` the target
train images without labels, ``"tgt_labelled"`` the labelled fraction of them (``target_labelled_fraction``,
which also restricts a target-labelled ``"src"`` stream: fine-tuning on a fraction of the target labels).
A stream that is not asked for is never built, so a source-free method cannot touch source data. Batches follow
the data contract of docs/data_contract.md#training-batch: ``{"src": {"img", "mask"}, "tgt": {"img",
("img_strong")}, "tgt_labelled": {"img", "mask"}}`` in training, ``{"img", "mask"}`` in val/test.
"""

from __future__ import annotations

from typing import Sequence

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from datamodules.datasets import SemanticDataset, build_from_spec
from datamodules.datasets.pseudo_labelled import PseudoLabelled
from datamodules.errors import ConfigError, DatasetLayoutError
from datamodules.loading import (
    ResumableLoader,
    TransformedDataset,
    build_evaluation_loader,
    build_training_loader,
    evaluation_indices,
    training_sampler,
)
from datamodules.rare_class_sampling import RareClassSampled
from datamodules.transforms import SemanticTransform
from datamodules.verify import verify_dataset

# "pl": target train images with pseudo-labels read from ``pseudo_label_dir`` (written by a method's
# pseudo-label stage), a labelled stream of the target domain for self-training. "tgt_labelled": the labelled
# fraction of the target train images with their labels (the fine-tuning setting).
STREAMS = ("src", "tgt", "pl", "tgt_labelled")


def labelled_indices(length: int, fraction: float) -> list[int]:
    """The ``fraction`` of a split that keeps its labels: evenly spaced over the sorted items, at least one, the
    same for every run seed."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"data.target_labelled_fraction must be in (0, 1], got {fraction}")
    count = max(1, round(fraction * length))
    return sorted({int(i) for i in np.linspace(0, length - 1, count).round()})


class LabelledFraction(Dataset):
    """The items of ``labelled_indices`` of a dataset: the rest (and their label files) are never read."""

    def __init__(self, dataset: Dataset, fraction: float):
        self.dataset, self.indices = dataset, labelled_indices(len(dataset), fraction)
        self.procedural = getattr(dataset, "procedural", False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]

    def file_pairs(self) -> list:
        pairs = self.dataset.file_pairs()
        return [pairs[i] for i in self.indices]

    def verify_item(self, index: int) -> str | None:
        return self.dataset.verify_item(self.indices[index])

    def train_ids(self, index: int) -> np.ndarray:
        return self.dataset.train_ids(self.indices[index])


class UDADataModule(L.LightningDataModule):
    """Datasets are described by specs ``{"name", "root", "split", "resize", "options"}``.

    ``setup`` builds the datasets a stage reads and, with ``verify``, checks all their files first
    (datamodules/verify.py; its cache lives under ``data_root``), so a bad file stops the run before any loader.
    """

    def __init__(
        self,
        source: dict | None,
        target: dict,
        val: dict,
        streams: Sequence[str] = ("src",),
        labelled_domain: str = "source",
        crop_size: Sequence[int] | None = None,
        strong_view: bool = False,
        batch_size: int = 2,
        num_workers: int = 2,
        seed: int = 0,
        pseudo_label_dir: str | None = None,
        verify: bool = True,
        data_root: str | None = None,
        rare_class_sampling: dict | None = None,
        num_classes: int | None = None,
        target_labelled_fraction: float | None = None,
        cat_max_ratio: float | None = None,
    ):
        super().__init__()
        unknown = set(streams) - set(STREAMS)
        if unknown:
            raise ConfigError(f"unknown training streams {sorted(unknown)}; expected a subset of {STREAMS}")
        if labelled_domain not in ("source", "target"):
            raise ConfigError(f"data.labelled_domain must be 'source' or 'target', got '{labelled_domain}'")
        if "src" in streams and labelled_domain == "source" and source is None:
            raise ConfigError(
                "this task has no source dataset, so methods that need labelled source data cannot run on it"
            )
        self.specs = {"source": source, "target": target, "val": val}
        self.streams, self.labelled_domain = tuple(streams), labelled_domain
        self.crop_size, self.strong_view = crop_size, strong_view
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pseudo_label_dir = pseudo_label_dir
        self.verify, self.data_root = verify, data_root
        self.rare_class_sampling, self.num_classes = rare_class_sampling, num_classes
        if "tgt_labelled" in streams and target_labelled_fraction is None:
            raise ConfigError(
                "the 'tgt_labelled' stream needs data.target_labelled_fraction: the share of the target train "
                "images whose labels the fine-tuning setting may read, e.g. 0.1"
            )
        self.target_labelled_fraction = target_labelled_fraction
        if cat_max_ratio is not None and not 0 < cat_max_ratio <= 1:
            raise ConfigError(f"method.cat_max_ratio={cat_max_ratio}; expected a share in (0, 1] or null")
        self.cat_max_ratio = cat_max_ratio
        self.train_sets: dict[str, Dataset] = {}
        self.val_set: Dataset | None = None

    def build(
        self,
        spec: dict,
        split: str,
        train: bool,
        labelled: bool,
        strong_view: bool = False,
        label_dir: str | None = None,
        rare_class_sampling: dict | None = None,
        labelled_fraction: float | None = None,
        cat_max_ratio: float | None = None,
    ) -> Dataset:
        dataset = build_from_spec(spec, split)
        unlabelled = isinstance(dataset, SemanticDataset) and not any(label for _, label in dataset.file_pairs())
        if labelled and label_dir is None and unlabelled:
            raise DatasetLayoutError(
                f"{spec['name']} split '{split}' under {spec.get('root')} has no labels (released without them); "
                "the val split and labelled streams need a labelled split"
            )
        if labelled_fraction is not None:
            dataset = LabelledFraction(dataset, labelled_fraction)
        if self.verify:
            verify_dataset(dataset, split, self.data_root)
        if (not labelled or label_dir is not None) and isinstance(dataset, SemanticDataset):
            dataset = dataset.unlabelled()
        if label_dir is not None:
            dataset = PseudoLabelled(dataset, label_dir)
        transform = SemanticTransform(
            resize=spec.get("resize"),
            crop=self.crop_size if train else None,
            train=train,
            strong_view=strong_view,
            labelled=labelled,
            cat_max_ratio=cat_max_ratio,
        )
        if rare_class_sampling:
            return RareClassSampled(
                dataset, transform, self.seed, self.num_classes, rare_class_sampling, self.data_root
            )
        return TransformedDataset(dataset, transform, seed=self.seed if train else None)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            self.val_set = self.build(
                self.specs["val"], self.specs["val"].get("split", "val"), train=False, labelled=True
            )
        if stage in (None, "fit") and not self.train_sets:
            labelled_spec = self.specs[self.labelled_domain]
            if "src" in self.streams:
                self.train_sets["src"] = self.build(
                    labelled_spec,
                    labelled_spec.get("split", "train"),
                    train=True,
                    labelled=True,
                    rare_class_sampling=self.rare_class_sampling,
                    cat_max_ratio=self.cat_max_ratio,
                    labelled_fraction=self.target_labelled_fraction if self.labelled_domain == "target" else None,
                )
            if "tgt" in self.streams:
                self.train_sets["tgt"] = self.build(
                    self.specs["target"],
                    self.specs["target"].get("split", "train"),
                    train=True,
                    labelled=False,
                    strong_view=self.strong_view,
                )
            if "tgt_labelled" in self.streams:
                target = self.specs["target"]
                self.train_sets["tgt_labelled"] = self.build(
                    target,
                    target.get("split", "train"),
                    train=True,
                    labelled=True,
                    labelled_fraction=self.target_labelled_fraction,
                )
            if "pl" in self.streams:
                if not self.pseudo_label_dir:
                    raise ConfigError(
                        "the 'pl' stream needs data.pseudo_label_dir: the folder of pseudo-labels to "
                        "train on (seco: method.label_dir of its stage=pseudo_label run; bicl writes its own)"
                    )
                target = self.specs["target"]
                self.train_sets["pl"] = self.build(
                    target, target.get("split", "train"), train=True, labelled=True, label_dir=self.pseudo_label_dir
                )

    def train_dataloader(self) -> dict[str, ResumableLoader]:
        loaders = {}
        for name, dataset in self.train_sets.items():
            sampler = training_sampler(dataset, self, self.seed)
            if len(sampler) < self.batch_size:
                # drop_last would leave the stream without a batch, and the training loop waiting on it for ever.
                raise ConfigError(
                    f"the '{name}' training stream has {len(sampler)} items per process, fewer than "
                    f"data.batch_size={self.batch_size}; expected at least one full batch (a larger split or "
                    "data.target_labelled_fraction, or a smaller batch)"
                )
            loaders[name] = build_training_loader(dataset, sampler, self.batch_size, self.num_workers)
        return loaders

    def eval_loader(self) -> DataLoader:
        return build_evaluation_loader(
            self.val_set, evaluation_indices(self.val_set, self), self.batch_size, self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader()
