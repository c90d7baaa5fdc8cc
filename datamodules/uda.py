"""Semantic-task data: a labelled stream, an unlabelled target stream and the labelled target val split.

A method asks for the training streams it needs (``streams``): ``"src"`` is the labelled stream (the
source domain, or the target domain for the oracle: ``labelled_domain=target``), ``"tgt"`` the target
train images without labels. A stream that is not asked for is never built, so a source-free method
cannot touch source data. Batches follow the data contract of ../shared/DESIGN.md:
``{"src": {"img", "mask"}, "tgt": {"img", ("img_strong")}}`` in training, ``{"img", "mask"}`` in val/test.
"""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.datasets import build_dataset
from datamodules.transforms import SemanticTransform

# "pl": target train images with pseudo-labels read from ``pseudo_label_dir`` (written by a method's
# pseudo-label stage), a labelled stream of the target domain for self-training.
STREAMS = ("src", "tgt", "pl")


class TransformedDataset(Dataset):
    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.dataset[index])


def seed_worker_transforms(worker_id: int) -> None:
    """Give each loader worker its own, reproducible augmentation stream.

    Albumentations keeps its own generator; torch derives ``initial_seed`` of a worker from the
    (seeded) main process, so this is deterministic and differs between workers.
    """
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**31)


def rank_and_world(module: L.LightningDataModule) -> tuple[int, int]:
    trainer = module.trainer
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


class UDADataModule(L.LightningDataModule):
    """Datasets are described by specs ``{"name", "root", "split", "resize", "options"}``."""

    def __init__(self, source: dict | None, target: dict, val: dict, streams: Sequence[str] = ("src",),
                 labelled_domain: str = "source", crop_size: Sequence[int] | None = None,
                 strong_view: bool = False, batch_size: int = 2, num_workers: int = 2, seed: int = 0,
                 pseudo_label_dir: str | None = None):
        super().__init__()
        unknown = set(streams) - set(STREAMS)
        if unknown:
            raise ValueError(f"unknown training streams {sorted(unknown)}; expected a subset of {STREAMS}")
        if labelled_domain not in ("source", "target"):
            raise ValueError(f"data.labelled_domain must be 'source' or 'target', got '{labelled_domain}'")
        if "src" in streams and labelled_domain == "source" and source is None:
            raise ValueError("this task has no source dataset, so methods that need labelled source data cannot run on it")
        self.specs = {"source": source, "target": target, "val": val}
        self.streams, self.labelled_domain = tuple(streams), labelled_domain
        self.crop_size, self.strong_view = crop_size, strong_view
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pseudo_label_dir = pseudo_label_dir
        self.train_sets: dict[str, Dataset] = {}
        self.val_set: Dataset | None = None

    def build(self, spec: dict, split: str, train: bool, labelled: bool, strong_view: bool = False) -> Dataset:
        dataset = build_dataset(spec["name"], spec.get("root"), split, **(spec.get("options") or {}))
        transform = SemanticTransform(resize=spec.get("resize"), crop=self.crop_size if train else None,
                                      train=train, strong_view=strong_view, labelled=labelled, seed=self.seed)
        return TransformedDataset(dataset, transform)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            self.val_set = self.build(self.specs["val"], self.specs["val"].get("split", "val"), train=False, labelled=True)
        if stage in (None, "fit") and not self.train_sets:
            labelled_spec = self.specs[self.labelled_domain]
            if "src" in self.streams:
                self.train_sets["src"] = self.build(labelled_spec, labelled_spec.get("split", "train"),
                                                    train=True, labelled=True)
            if "tgt" in self.streams:
                self.train_sets["tgt"] = self.build(self.specs["target"], self.specs["target"].get("split", "train"),
                                                    train=True, labelled=False, strong_view=self.strong_view)
            if "pl" in self.streams:
                if not self.pseudo_label_dir:
                    raise ValueError("the 'pl' stream needs data.pseudo_label_dir: the folder of pseudo-labels to "
                                     "train on (for seco: method.label_dir of its stage=pseudo_label run)")
                target = self.specs["target"]
                spec = {"name": "pseudo_labelled", "resize": target.get("resize"),
                        "options": {"dataset": target, "label_dir": self.pseudo_label_dir}}
                self.train_sets["pl"] = self.build(spec, target.get("split", "train"), train=True, labelled=True)

    def loader(self, dataset: Dataset, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=drop_last, worker_init_fn=seed_worker_transforms,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        rank, world = rank_and_world(self)
        loaders = {}
        for name, dataset in self.train_sets.items():
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                                         drop_last=True)
            loaders[name] = self.loader(dataset, sampler, self.batch_size, drop_last=True)
        return loaders

    def eval_loader(self) -> DataLoader:
        # Each rank evaluates a disjoint strided share with no padding, so confusion matrices summed over
        # ranks count every val image exactly once (DistributedSampler would repeat images).
        rank, world = rank_and_world(self)
        indices = list(range(rank, len(self.val_set), world))
        return self.loader(self.val_set, indices, batch_size=self.batch_size, drop_last=False)

    def val_dataloader(self):
        return self.eval_loader()

    def test_dataloader(self):
        return self.eval_loader()
