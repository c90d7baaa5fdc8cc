"""SAM-task data: images resized and padded as SAM expects, instance masks, and ground-truth prompts.

WeSAM's protocol (docs/protocols.md#sam-adaptation): the longest side is resized to ``image_size`` and the
image padded to a square; per instance, the ground-truth prompts of ``datamodules/prompts.py``, derived on the
*resized* masks so they live in SAM's input frame. Evaluation prompts are a pure function of (seed, index), so
every run and rank scores the same prompts.

Items: ``{"img": float[3,S,S] (scaled as ``data.sam_input`` says, zero-padded), ("img_strong"),
("instances": float[N,S,S]), "boxes": float[N,4] xyxy, "points": float[N,P+Q,2] xy,
"point_labels": long[N,P+Q] (1 / 0 / -1 padding), "polys": float[N,S,S], "input_size": (h, w),
"original_size": (H, W), "meta"}``.
Batches: ``{"img": [B,3,S,S], ("img_strong"), "targets": [per-image dict without the images]}``.
"""

from __future__ import annotations

from typing import Sequence

import albumentations as A
import lightning as L
import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import DataLoader, Dataset

from datamodules.constants import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from datamodules.datasets import build_from_spec
from datamodules.errors import ConfigError, DatasetLayoutError, require_choice
from datamodules.loading import (
    ResumableLoader,
    TrainingKey,
    build_evaluation_loader,
    build_training_loader,
    evaluation_indices,
    item_seeds,
    training_sampler,
)
from datamodules.prompts import derive_prompts
from datamodules.transforms import seed_pipeline, strong_photometric_transform
from datamodules.verify import verify_dataset

SAM_PIXEL_MEAN_ARRAY = np.asarray(SAM_PIXEL_MEAN, dtype=np.float32)
SAM_PIXEL_STD_ARRAY = np.asarray(SAM_PIXEL_STD, dtype=np.float32)


VIEW_RECIPES = ("jitter", "wesam")
# The scale of the image tensor SAM's image encoder reads (data.sam_input):
# "sam": Sam.preprocess's (x - pixel_mean) / pixel_std on the 0-255 scale, the statistics SAM was trained with;
# "unit": x / 255 with nothing subtracted, what WeSAM's code feeds to every pass, evaluation included
#   (datasets/tools.py ResizeAndPad: ToTensor and no Normalize; model.py Model.encode calls image_encoder directly,
#   so Sam.preprocess never runs). Its padding is centred; ours stays bottom/right under both scales (not measured).
SAM_INPUTS = ("sam", "unit")


def weak_photometric_transform() -> A.Compose:
    """Mild colour jitter for supervised fine-tuning; geometry stays fixed so prompts stay exact."""
    return A.Compose([A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5)])


def wesam_weak_transform() -> A.Compose:
    """WeSAM's weak view (datasets/tools.py ``weak_transforms``): random horizontal and vertical flips of image and
    masks. The official list also holds ``A.Flip``, a random flip from the same group, which leaves the
    distribution (uniform over identity, h, v, h+v) unchanged."""
    return A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])


def wesam_strong_transform() -> A.Compose:
    """WeSAM's strong view (datasets/tools.py ``strong_transforms``), applied to the weak image: albumentations'
    Posterize, Equalize, Sharpen, Solarize, RandomBrightnessContrast and RandomShadow at their defaults (p=0.5)."""
    return A.Compose(
        [A.Posterize(), A.Equalize(), A.Sharpen(), A.Solarize(), A.RandomBrightnessContrast(), A.RandomShadow()]
    )


class PromptedTransform:
    """Train-time views; none at evaluation.

    ``recipe`` "jitter": weak = mild colour jitter, strong = colour jitter / grey / blur, no geometry.
    ``recipe`` "wesam": weak = flips of image and instance masks (so the prompts, derived afterwards, follow them),
    strong = WeSAM's photometric ops on the flipped image. The strong view always starts from the weak view's
    geometry, so both views are pixel-aligned and share the prompts.
    """

    def __init__(self, train: bool, strong_view: bool, recipe: str = "jitter"):
        require_choice("data.sam_views", recipe, VIEW_RECIPES)
        wesam = recipe == "wesam"
        self.geometry = wesam_weak_transform() if train and wesam else None
        self.weak = weak_photometric_transform() if train and not wesam else None
        self.strong = (wesam_strong_transform() if wesam else strong_photometric_transform()) if strong_view else None

    def views(
        self, image: np.ndarray, instances: np.ndarray, seeds: np.random.SeedSequence | None
    ) -> tuple[dict, np.ndarray]:
        """({"img": weak view, ("img_strong")}, instances in the views' geometry). Each random step draws from its
        own child of the item's ``seeds`` (required when there is anything to draw)."""
        geometry_seeds, weak_seeds, strong_seeds = seeds.spawn(3) if seeds is not None else (None, None, None)
        if self.geometry is not None:
            self.seed(self.geometry, geometry_seeds)
            flipped = self.geometry(image=image, masks=list(instances))
            image, instances = flipped["image"], np.stack(flipped["masks"]) if len(instances) else instances
        out = {"img": self.draw(self.weak, image, weak_seeds) if self.weak is not None else image}
        if self.strong is not None:
            out["img_strong"] = self.draw(self.strong, image, strong_seeds)
        return out, np.ascontiguousarray(instances)

    @staticmethod
    def seed(pipeline: A.Compose, seeds: np.random.SeedSequence | None) -> None:
        if seeds is None:
            raise ValueError("a training view needs the item's seeds, item_seeds(seed, epoch, index)")
        seed_pipeline(pipeline, seeds)

    @classmethod
    def draw(cls, pipeline: A.Compose, image: np.ndarray, seeds: np.random.SeedSequence | None) -> np.ndarray:
        cls.seed(pipeline, seeds)
        return pipeline(image=image)["image"]


def pad_to_square(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the last two axes at the bottom/right to size x size (Sam.preprocess's padding)."""
    pad = [(0, 0)] * (array.ndim - 2) + [(0, size - array.shape[-2]), (0, size - array.shape[-1])]
    return np.pad(array, pad)


def sam_input_tensor(image: np.ndarray, size: int, scale: str = "sam") -> torch.Tensor:
    """uint8 HWC RGB (already resized) -> float[3,size,size]: exactly as Sam.preprocess computes it ("sam"), or
    x / 255 as WeSAM's code feeds it ("unit"; SAM_INPUTS)."""
    pixels = image.astype(np.float32)
    scaled = pixels / 255.0 if scale == "unit" else (pixels - SAM_PIXEL_MEAN_ARRAY) / SAM_PIXEL_STD_ARRAY
    return torch.from_numpy(pad_to_square(scaled.transpose(2, 0, 1), size))


def resize_masks(instances: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour (pixel-centre aligned) resize of uint8[N,H,W] to size (h, w) by index lookup.

    Index lookup instead of cv2.resize: cv2 caps the channel count (128 in OpenCV 5), COCO has ~150.
    """

    def source_indices(new: int, old: int) -> np.ndarray:
        return np.minimum(((np.arange(new) + 0.5) * old / new).astype(np.int64), old - 1)

    rows = source_indices(size[0], instances.shape[1])
    cols = source_indices(size[1], instances.shape[2])
    return instances[:, rows[:, None], cols[None]]


class PromptedDataset(Dataset):
    """An InstanceDataset as SAM tensors with ground-truth prompts (see the module docstring).

    ``labelled=False`` drops the instance masks from the item (an unlabelled target stream still gets
    the prompts, which WeSAM treats as weak supervision).
    """

    def __init__(
        self,
        dataset: Dataset,
        image_size: int = 1024,
        train: bool = True,
        max_instances: int = 40,
        strong_view: bool = False,
        seed: int = 0,
        labelled: bool = True,
        views: str = "jitter",
        input_scale: str = "sam",
    ):
        require_choice("data.sam_input", input_scale, SAM_INPUTS)
        self.dataset, self.image_size, self.train = dataset, image_size, train
        self.input_scale = input_scale
        self.max_instances, self.seed, self.labelled = max_instances, seed, labelled
        self.resizer = ResizeLongestSide(image_size)
        self.transform = PromptedTransform(train, strong_view, views)

    def __len__(self) -> int:
        return len(self.dataset)

    def item_randomness(self, key: int | TrainingKey) -> tuple[int, np.random.Generator, np.random.SeedSequence | None]:
        """(index, prompt rng, view seeds). Training keys are (epoch, index): instance subset, points and views
        draw from item_seeds(seed, epoch, index). Eval prompts depend only on (seed, index), the same every epoch."""
        if not self.train:
            return key, np.random.default_rng([self.seed, key]), None
        epoch, index = key
        prompt_seeds, view_seeds = item_seeds(self.seed, epoch, index).spawn(2)
        return index, np.random.default_rng(prompt_seeds), view_seeds

    def select_instances(self, instances: np.ndarray, rng: np.random.Generator, path: str) -> np.ndarray:
        """Drop instances lost in resizing; in training keep a random subset of at most max_instances."""
        instances = instances[instances.any((1, 2))]
        if len(instances) == 0:
            raise DatasetLayoutError(
                f"{path} has no instance masks (after resizing to {self.image_size}); "
                "every image of a SAM task needs at least one instance"
            )
        if self.train and len(instances) > self.max_instances:
            instances = instances[np.sort(rng.choice(len(instances), self.max_instances, replace=False))]
        return instances

    def __getitem__(self, key: int | TrainingKey) -> dict:
        index, rng, view_seeds = self.item_randomness(key)
        item = self.dataset[index]
        path = item["meta"]["path"]
        original_size = tuple(item["image"].shape[:2])
        image = self.resizer.apply_image(item["image"])
        input_size = tuple(image.shape[:2])
        views, instances = self.transform.views(image, resize_masks(item["instances"], input_size), view_seeds)
        instances = self.select_instances(instances, rng, path)
        prompts = derive_prompts(instances, rng)
        size = self.image_size
        sample = {name: sam_input_tensor(view, size, self.input_scale) for name, view in views.items()}
        if self.labelled:
            sample["instances"] = torch.from_numpy(pad_to_square(instances, size)).float()
        sample.update(
            {
                "boxes": torch.from_numpy(prompts["boxes"]),
                "points": torch.from_numpy(prompts["points"]),
                "point_labels": torch.from_numpy(prompts["point_labels"]),
                "polys": torch.from_numpy(pad_to_square(prompts["polys"], size)).float(),
                "input_size": input_size,
                "original_size": original_size,
                "meta": item["meta"],
            }
        )
        return sample


def collate_prompted(items: Sequence[dict]) -> dict:
    """Stack the images; everything per instance stays a per-image dict since N differs between images."""
    batch = {"img": torch.stack([item["img"] for item in items])}
    if "img_strong" in items[0]:
        batch["img_strong"] = torch.stack([item["img_strong"] for item in items])
    batch["targets"] = [{k: v for k, v in item.items() if k not in ("img", "img_strong")} for item in items]
    return batch


class PromptedDataModule(L.LightningDataModule):
    """One training stream (labelled or unlabelled-with-prompts) and the labelled val/test split."""

    def __init__(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset,
        image_size: int = 1024,
        batch_size: int = 2,
        num_workers: int = 2,
        max_instances: int = 40,
        strong_view: bool = False,
        views: str = "jitter",
        input_scale: str = "sam",
        seed: int = 0,
        train_labelled: bool = True,
        verify: bool = True,
        data_root: str | None = None,
    ):
        super().__init__()
        self.train_set = PromptedDataset(
            train_dataset,
            image_size,
            train=True,
            max_instances=max_instances,
            strong_view=strong_view,
            seed=seed,
            labelled=train_labelled,
            views=views,
            input_scale=input_scale,
        )
        self.val_set = PromptedDataset(val_dataset, image_size, train=False, seed=seed, input_scale=input_scale)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.verify, self.data_root = verify, data_root

    def setup(self, stage: str | None = None) -> None:
        """Check every file the stage reads before any loader exists (datamodules/verify.py)."""
        if not self.verify:
            return
        if stage in (None, "fit"):
            verify_dataset(self.train_set.dataset, "train", self.data_root)
        verify_dataset(self.val_set.dataset, "val", self.data_root)

    def train_dataloader(self) -> ResumableLoader:
        return build_training_loader(
            self.train_set,
            training_sampler(self.train_set, self, self.seed),
            self.batch_size,
            self.num_workers,
            collate_fn=collate_prompted,
        )

    def eval_loader(self) -> DataLoader:
        return build_evaluation_loader(
            self.val_set,
            evaluation_indices(self.val_set, self),
            self.batch_size,
            self.num_workers,
            collate_fn=collate_prompted,
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader()


def build_prompted_datamodule(cfg: dict) -> PromptedDataModule:
    """``method.streams``: ["src"] trains on the labelled domain's train split, ["tgt"] on target train images."""
    data, streams = cfg["data"], list(cfg["method"]["streams"])
    if streams == ["src"]:
        labelled_domain = data["labelled_domain"]
        if labelled_domain not in ("source", "target"):
            raise ConfigError(f"data.labelled_domain must be 'source' or 'target', got '{labelled_domain}'")
        if data.get(labelled_domain) is None:
            raise ConfigError(
                "this task has no source dataset, so methods that need labelled source data cannot run on it"
            )
        train_spec, labelled = data[labelled_domain], True
    elif streams == ["tgt"]:
        train_spec, labelled = data["target"], False
    else:
        raise ConfigError(f"SAM tasks train on one stream, ['src'] or ['tgt']; got {streams}")
    return PromptedDataModule(
        build_from_spec(train_spec, "train"),
        build_from_spec(data["val"], "val"),
        image_size=cfg["model"]["image_size"],
        batch_size=data["batch_size"],
        num_workers=data["num_workers"],
        max_instances=data["max_instances"],
        strong_view=data["strong_view"],
        views=data["sam_views"],
        input_scale=data.get("sam_input", "sam"),  # a run saved before the key existed read SAM's scale
        seed=cfg["seed"],
        train_labelled=labelled,
        verify=data.get("verify", True),
        data_root=data.get("root"),
    )
