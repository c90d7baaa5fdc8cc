"""Semantic-task data: a labelled stream, an unlabelled target stream and the labelled target val split.

A method asks for the training streams it needs (``streams``): ``"src"`` is the labelled stream (the
source domain, or the target domain for the oracle: ``labelled_domain=target``), ``"tgt"`` the target
train images without labels. A stream that is not asked for is never built, so a source-free method
cannot touch source data. Batches follow the data contract of docs/data_contract.md#training-batch:
``{"src": {"img", "mask"}, "tgt": {"img", ("img_strong")}}`` in training, ``{"img", "mask"}`` in val/test.
"""

from __future__ import annotations

from typing import Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from datamodules.datasets import SemanticDataset, build_from_spec
from datamodules.datasets.pseudo_labelled import PseudoLabelled
from datamodules.errors import ConfigError
from datamodules.loading import (
    ResumableLoader,
    TransformedDataset,
    build_evaluation_loader,
    build_training_loader,
    evaluation_indices,
    training_sampler,
)
from datamodules.transforms import SemanticTransform
from datamodules.verify import verify_dataset

# "pl": target train images with pseudo-labels read from ``pseudo_label_dir`` (written by a method's
# pseudo-label stage), a labelled stream of the target domain for self-training.
STREAMS = ("src", "tgt", "pl")


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
    ) -> Dataset:
        dataset = build_from_spec(spec, split)
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
                    labelled_spec, labelled_spec.get("split", "train"), train=True, labelled=True
                )
            if "tgt" in self.streams:
                self.train_sets["tgt"] = self.build(
                    self.specs["target"],
                    self.specs["target"].get("split", "train"),
                    train=True,
                    labelled=False,
                    strong_view=self.strong_view,
                )
            if "pl" in self.streams:
                if not self.pseudo_label_dir:
                    raise ConfigError(
                        "the 'pl' stream needs data.pseudo_label_dir: the folder of pseudo-labels to "
                        "train on (for seco: method.label_dir of its stage=pseudo_label run)"
                    )
                target = self.specs["target"]
                self.train_sets["pl"] = self.build(
                    target, target.get("split", "train"), train=True, labelled=True, label_dir=self.pseudo_label_dir
                )

    def train_dataloader(self) -> dict[str, ResumableLoader]:
        return {
            name: build_training_loader(
                dataset, training_sampler(dataset, self, self.seed), self.batch_size, self.num_workers
            )
            for name, dataset in self.train_sets.items()
        }

    def eval_loader(self) -> DataLoader:
        return build_evaluation_loader(
            self.val_set, evaluation_indices(self.val_set, self), self.batch_size, self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader()
