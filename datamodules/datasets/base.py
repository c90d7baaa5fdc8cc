"""What every dataset file shares: the error type, image/label reading and the two item contracts.

Semantic datasets return ``{"image": uint8[H,W,3] RGB, "mask": uint8[H,W] train ids (255 = ignore),
"meta": {"path": str}}``. Instance datasets (the SAM tasks) return ``{"image": uint8[H,W,3],
"instances": uint8[N,H,W] (one binary mask per instance), "meta": {"path": str}}``.
Prompts and tensors are made later (``datamodules/prompted.py``, ``datamodules/transforms.py``).
"""

from __future__ import annotations

import copy
import io
import logging
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datamodules.constants import IGNORE_INDEX
from datamodules.errors import DatasetLayoutError

log = logging.getLogger(__name__)


def require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"{path} does not exist or is not a directory; expected layout: {layout}")
    return path


def find_files(directory: Path, pattern: str, layout: str) -> list[Path]:
    """The files matching ``pattern``; hidden names (macOS ``._*`` resource forks beside every file copied from a
    Mac, ``.DS_Store``) are not data, though ``Path.glob`` matches them."""
    files = sorted(path for path in directory.glob(pattern) if not path.name.startswith("."))
    if not files:
        raise DatasetLayoutError(f"no files matching '{pattern}' under {directory}; expected layout: {layout}")
    return files


def require_pair(image: Path, label: Path, layout: str) -> Path:
    if not label.is_file():
        raise DatasetLayoutError(f"image {image} has no label file {label}; expected layout: {layout}")
    return label


# A truncated PNG or JPEG still decodes in part (libjpeg fills the missing rows with grey and only warns), so a
# file of these formats must hold its end marker within its last TAIL_BYTES: bytes after it (padding, a trailer some
# cameras and web tools append to JPEGs) are allowed, and decoders ignore them.
TAIL_BYTES = 4096
END_MARKERS = {  # magic number at the start -> (format, end marker, the marker's name)
    b"\x89PNG\r\n\x1a\n": ("PNG", b"\x00\x00\x00\x00IEND\xaeB`\x82", "IEND chunk"),
    b"\xff\xd8": ("JPEG", b"\xff\xd9", "EOI marker 0xFFD9"),
}
EXIF_ORIENTATION, TRANSPOSING_ORIENTATIONS = 0x0112, (5, 6, 7, 8)


def unreadable(path: Path, error: OSError) -> DatasetLayoutError:
    """The OS error of opening a file as one sentence; permissions are the usual culprit on a shared cluster."""
    if isinstance(error, PermissionError):
        return DatasetLayoutError(f"{path} is not readable (permission denied); expected a file this user can read")
    if isinstance(error, FileNotFoundError):
        return DatasetLayoutError(f"{path} does not exist; expected the file found when the dataset was listed")
    return DatasetLayoutError(f"{path} cannot be read ({error.strerror or error}); expected a readable file")


def check_complete(path: Path, head: bytes, tail: bytes) -> None:
    """Refuse an empty file, and a PNG or JPEG (told by its magic number) whose tail lacks its end marker."""
    if not head:
        raise DatasetLayoutError(f"{path} is empty; expected an image file")
    for magic, (kind, marker, name) in END_MARKERS.items():
        if head.startswith(magic) and marker not in tail:
            raise DatasetLayoutError(
                f"{path} is truncated: its last {TAIL_BYTES} bytes hold no {name}; expected a complete {kind} file"
            )


def read_complete(path: Path) -> bytes:
    """The file's bytes, checked complete: one read, and the check only looks at both ends of it."""
    try:
        encoded = path.read_bytes()
    except OSError as error:
        raise unreadable(path, error) from error
    check_complete(path, encoded[:8], encoded[-TAIL_BYTES:])
    return encoded


def decode(path: Path, flags: int) -> np.ndarray | None:
    """cv2.imdecode of the checked bytes: OpenCV's decoder (and its EXIF handling) exactly as cv2.imread."""
    return cv2.imdecode(np.frombuffer(read_complete(path), np.uint8), flags)


def read_rgb(path: Path, exif_orientation: bool = True) -> np.ndarray:
    """RGB uint8; ``exif_orientation=False`` keeps the stored pixel grid of a JPEG with an EXIF orientation (as PIL's
    ``Image.open(...).convert("RGB")`` reads it), for label maps drawn on that grid."""
    image = decode(path, cv2.IMREAD_COLOR if exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise DatasetLayoutError(f"{path} cannot be decoded as an image (corrupt or not an image file)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    label = decode(path, flags)
    if label is None:
        raise DatasetLayoutError(f"{path} cannot be decoded as a label image (corrupt or not a PNG)")
    return label


def image_size(path: Path, exif_orientation: bool = True) -> tuple[int, int]:
    """(height, width) of ``read_rgb(path, exif_orientation)`` from the header, for pre-flight checks without decoding
    the pixels.

    The file is checked complete as the readers check it. OpenCV turns a JPEG by its EXIF orientation, so a
    transposing orientation swaps the header's size (unless the orientation is ignored).
    """
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise unreadable(path, error) from error
    with handle:
        head = handle.read(8)
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - TAIL_BYTES))
        check_complete(path, head, handle.read())
        handle.seek(0)
        try:
            with Image.open(handle) as image:
                width, height = image.size
                turned = image.format == "JPEG" and image.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS
        except (OSError, SyntaxError, ValueError) as error:
            raise DatasetLayoutError(f"{path} cannot be decoded as an image ({error})") from error
    return (width, height) if turned and exif_orientation else (height, width)


def read_id_map(path: Path) -> np.ndarray:
    """A single-channel (8- or 16-bit) id PNG; a colour PNG here means the wrong label files."""
    label = read_label(path)
    if label.ndim != 2:
        raise DatasetLayoutError(f"{path} has {label.shape[2]} channels; expected a single-channel id PNG")
    return label


def read_indexed_png(path: Path, modes: Sequence[str] = ("P",)) -> np.ndarray:
    """The palette indices of a palette PNG (GTA5 labels, VOC SegmentationObject).

    OpenCV expands a palette PNG to its colours, so the indices are read with PIL; ``modes`` lists the
    PIL modes accepted (``"L"`` for a grey re-save that keeps the ids as values).
    """
    encoded = read_complete(path)
    try:
        with Image.open(io.BytesIO(encoded)) as label:
            if label.mode not in modes:
                raise DatasetLayoutError(f"{path} is a '{label.mode}' image; expected a {' or '.join(modes)} PNG")
            return np.array(label)
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetLayoutError(f"{path} cannot be decoded as a palette PNG ({error})") from error


def check_same_size(image: tuple[int, int], label: tuple[int, int], image_path: Path, label_path: Path) -> None:
    """``image`` and ``label`` are (height, width) sizes."""
    if image != label:
        raise DatasetLayoutError(
            f"label {label_path} is {label[1]}x{label[0]} but its image {image_path} is "
            f"{image[1]}x{image[0]}; expected a label of the image's size"
        )


def fit_label_to_image(
    label: np.ndarray, image: tuple[int, int], image_path: Path, label_path: Path, tolerance: float
) -> np.ndarray:
    """``label`` resized (nearest) to the image's (height, width) where each side differs by at most ``tolerance`` of
    the image's (a release quirk the dataset declares); any other difference is ``check_same_size``'s error."""
    close = all(abs(side - want) <= tolerance * want for side, want in zip(label.shape[:2], image))
    if label.shape[:2] != image and close:
        return cv2.resize(label, (image[1], image[0]), interpolation=cv2.INTER_NEAREST)
    check_same_size(image, label.shape[:2], image_path, label_path)
    return label


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """Dense id -> train id table (uint8: masks stay one byte a pixel until they become tensors); ids not in
    ``mapping`` become IGNORE_INDEX."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for source_id, train_id in mapping.items():
        table[source_id] = train_id
    return table


class IdMapper:
    """Label ids -> train ids through a dense table (a picklable object, so loader workers can use it).

    Ids inside the table but not in ``mapping`` are ignore (255) by design; an id beyond the table (a 16-bit
    map where 8-bit ids belong, another dataset's labels) has no meaning, so it is an error naming the file.
    """

    def __init__(self, mapping: dict[int, int], size: int = 256):
        self.table = lookup_table(mapping, size)

    def check(self, label: np.ndarray, path: Path) -> None:
        """One max() pass (the readers return unsigned ids); the offending values are collected only on failure."""
        if label.max() < len(self.table):
            return
        bad = np.unique(label[label >= len(self.table)])
        shown = ", ".join(str(v) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise DatasetLayoutError(
            f"{path} holds label ids {shown} outside the dataset's id range 0-{len(self.table) - 1}; "
            "expected a label map in the dataset's own id encoding"
        )

    def __call__(self, label: np.ndarray, path: Path) -> np.ndarray:
        self.check(label, path)
        if label.dtype == np.uint8 and len(self.table) == 256:
            return cv2.LUT(label, self.table)  # the same values as self.table[label], 8x faster on a 2048x1024 map
        return self.table[label]


def interleaved_split(files: Sequence, train_per_eval: int, split: str) -> list:
    """WeSAM's split of a sorted file list: every (train_per_eval + 1)-th file is held out for evaluation."""
    period = train_per_eval + 1
    if split == "train":
        return [f for i, f in enumerate(files) if i % period != period - 1]
    if split in ("val", "test"):
        return [f for i, f in enumerate(files) if i % period == period - 1]
    raise DatasetLayoutError(f"unknown split '{split}'; expected one of train, val, test")


class SemanticDataset(Dataset):
    """Image/label pairs mapped to train ids by ``to_train_ids``; subclasses only discover files. A pair whose
    label is None is an unlabelled image (a target train split released without labels): its mask is all ignore.
    ``unlabelled()`` is the same images without masks, for streams that never use them (no label is read)."""

    layout: str = ""
    # How far (a share of each side) a label's size may be off its image's and still be resized to it; 0 = equal sizes.
    label_size_tolerance: float = 0.0

    def __init__(self, pairs: list[tuple[Path, Path]], to_train_ids: IdMapper):
        self.pairs = pairs
        self.to_train_ids = to_train_ids
        self.with_labels = True

    def unlabelled(self) -> SemanticDataset:
        images_only = copy.copy(self)
        images_only.with_labels = False
        return images_only

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.pairs[index]
        image = read_rgb(image_path)
        meta = {"path": str(image_path)}
        if not self.with_labels:
            return {"image": image, "meta": meta}
        if label_path is None:
            return {"image": image, "mask": np.full(image.shape[:2], IGNORE_INDEX, np.uint8), "meta": meta}
        label = self.to_train_ids(self.read_raw_label(label_path), label_path)
        label = fit_label_to_image(label, image.shape[:2], image_path, label_path, self.label_size_tolerance)
        return {"image": image, "mask": label, "meta": meta}

    def read_raw_label(self, path: Path) -> np.ndarray:
        return read_id_map(path)

    def train_ids(self, index: int) -> np.ndarray:
        """The item's train-id map alone (no image read); empty for an unlabelled image."""
        _, label_path = self.pairs[index]
        if label_path is None:
            return np.zeros(0, np.uint8)
        return self.to_train_ids(self.read_raw_label(label_path), label_path)

    def file_pairs(self) -> list[tuple[Path, Path]]:
        """Every (image, label) file an epoch reads; the pre-flight check keys its cache on them."""
        return list(self.pairs)

    def verify_item(self, index: int) -> str | None:
        """What ``__getitem__`` would refuse, with the image read from its header only (datamodules/verify.py);
        returns a note where the label will be resized to its image."""
        image_path, label_path = self.pairs[index]
        size = image_size(image_path)
        if label_path is None:
            return None
        label = self.read_raw_label(require_pair(image_path, label_path, self.layout))
        self.to_train_ids.check(label, label_path)
        if label.shape[:2] == size:
            return None
        fit_label_to_image(label, size, image_path, label_path, self.label_size_tolerance)
        return f"{label_path} ({label.shape[1]}x{label.shape[0]}, image {size[1]}x{size[0]})"


class InstanceDataset(Dataset):
    """Images with per-instance binary masks; subclasses implement ``read_instances`` and, where the masks come
    from a per-image file, ``read_label_map`` (what the pre-flight check decodes)."""

    layout: str = ""
    # Whether images are turned by their EXIF orientation, as OpenCV reads them (WeSAM's readers for most datasets).
    exif_orientation: bool = True

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        image_path = self.image_path(item)
        image = read_rgb(image_path, self.exif_orientation)
        instances = self.read_instances(item, image.shape[:2])
        if instances.shape[1:] != image.shape[:2]:
            raise DatasetLayoutError(
                f"label {self.label_source(item)} gives {instances.shape[2]}x{instances.shape[1]} masks but its image "
                f"{image_path} is {image.shape[1]}x{image.shape[0]}; expected masks of the image's size"
            )
        return {"image": image, "instances": instances, "meta": {"path": str(image_path)}}

    def image_path(self, item) -> Path:
        return item[0]

    def label_source(self, item) -> Path:
        """Where the item's masks come from, for error messages; file-based items are (image, label, ...)."""
        return item[1]

    def read_label_map(self, item) -> np.ndarray | None:
        """The item's single-channel label map as ``read_instances`` reads it; None where the masks come from
        no per-image file (COCO's json, parsed at discovery)."""
        return None

    def read_instances(self, item, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def file_pairs(self) -> list[tuple[Path, Path]]:
        """Every (image, label source) file an epoch reads; the pre-flight check keys its cache on them."""
        return [(self.image_path(item), self.label_source(item)) for item in self.items]

    def verify_item(self, index: int) -> None:
        """What ``__getitem__`` would refuse, with the image read from its header only (datamodules/verify.py)."""
        item = self.items[index]
        image_path, label_path = self.image_path(item), self.label_source(item)
        size = image_size(image_path, self.exif_orientation)
        require_pair(image_path, label_path, self.layout)
        label = self.read_label_map(item)
        if label is not None:
            check_same_size(size, label.shape[:2], image_path, label_path)


def instances_from_id_map(ids: np.ndarray, background: Sequence[int] = (0,)) -> np.ndarray:
    """One binary mask per distinct id of an instance-id map, background ids excluded (vectorised)."""
    values = np.unique(ids)
    values = values[~np.isin(values, background)]
    return (ids[None] == values[:, None, None]).astype(np.uint8)


class GreyMapInstanceDataset(InstanceDataset):
    """(image, grey GT) pairs whose distinct non-zero grey values are the instances (CAMO, COD10K).

    As WeSAM (``datasets/CAMO.py``, ``COD10K.py`` ``filter_files``), images whose GT is all zero or of another size
    than the image are dropped, so every GT is read once at discovery and the numbers dropped are logged (nothing
    disappears silently). WeSAM reads these images with PIL, on their stored pixel grid, the grid their GT maps share:
    an EXIF orientation is not applied.
    """

    exif_orientation = False

    def __init__(self, pairs: list[tuple[Path, Path]]):
        kept, empty, mismatched = [], 0, 0
        for image, gt in pairs:
            ids = self.read_ids(gt)
            if not ids.any():
                empty += 1
            elif ids.shape != image_size(image, self.exif_orientation):
                mismatched += 1
            else:
                kept.append((image, gt))
        for count, why in (
            (empty, "whose GT map is all zero (no object)"),
            (mismatched, "whose GT map is not the image's size"),
        ):
            if count:
                log.warning("%s: dropped %d of %d images %s", type(self).__name__, count, len(pairs), why)
        super().__init__(kept)

    @staticmethod
    def read_ids(path: Path) -> np.ndarray:
        return read_label(path, cv2.IMREAD_GRAYSCALE)

    def read_label_map(self, item) -> np.ndarray:
        return self.read_ids(item[1])

    def read_instances(self, item, size: tuple[int, int]) -> np.ndarray:
        return instances_from_id_map(self.read_label_map(item))


# Procedural datasets: every item is a pure function of (seed, domain, split, index), so any worker, rank or
# rerun sees the same image; nothing is cached or written.
PROCEDURAL_SPLITS = {"train": 0, "val": 1, "test": 2}


def procedural_item_rng(seed: int, domain: int, split: str, index: int) -> np.random.Generator:
    if split not in PROCEDURAL_SPLITS:
        raise DatasetLayoutError(
            f"unknown split '{split}' for a procedural dataset; expected one of {list(PROCEDURAL_SPLITS)}"
        )
    return np.random.default_rng([seed, domain, PROCEDURAL_SPLITS[split], index])
