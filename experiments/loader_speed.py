"""Loader throughput against the raw decode, at the real datasets' file sizes: ``python -m experiments.loader_speed``.

No dataset is needed: a few frames per dataset are written in its official layout, at its official resolution and
label encoding, into a temporary folder (smooth street-like pictures, so the files compress like photographs
rather than noise). Then, on one process (one loader worker), per item:

- ``raw``: what any loader must do, OpenCV's decode of the image (and of the label, for a labelled stream) and the
  resize to the task's size;
- ``labelled`` / ``unlabelled``: the project's dataset + training transform of the task's source (labelled) and
  target (unlabelled) streams, as ``datamodules.uda`` builds them, and for Kvasir-SEG the reader's item (image and
  its connected-component instances).

Prints images/s and the ratio to the raw decode for GTA5, Cityscapes, SYNTHIA and Kvasir-SEG.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from datamodules.datasets import build_dataset
from datamodules.loading import TransformedDataset
from datamodules.transforms import SemanticTransform

# (registry name, image size W x H, task resize H x W, crop) as the task yamls set them.
SEMANTIC = {
    "gta5": ((1914, 1052), (720, 1280), (512, 512)),
    "cityscapes": ((2048, 1024), (512, 1024), (512, 512)),
    "synthia": ((1280, 760), (760, 1280), (512, 512)),
}
LABEL_IDS = np.array([7, 8, 11, 21, 23, 24, 26])  # Cityscapes labelIds: road ... car


def street_picture(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth picture and its labelId map: horizontal bands and a few boxes, gently textured."""
    ids = np.full((height, width), 23, np.uint8)
    edges = np.sort(rng.integers(0, height, 4))
    for band, (top, bottom) in enumerate(zip(edges[:-1], edges[1:])):
        ids[top:bottom] = LABEL_IDS[band % len(LABEL_IDS)]
    for _ in range(6):
        x, y = rng.integers(0, width - 100), rng.integers(0, height - 100)
        ids[y : y + rng.integers(20, 100), x : x + rng.integers(20, 100)] = rng.choice(LABEL_IDS)
    palette = rng.integers(0, 255, (256, 3), dtype=np.uint8)
    picture = cv2.GaussianBlur(palette[ids], (0, 0), 2)
    grain = rng.normal(0, 4, picture.shape[:2])[..., None]
    return np.clip(picture + grain, 0, 255).astype(np.uint8), ids


def write_semantic(name: str, root: Path, frames: int, rng: np.random.Generator) -> None:
    (width, height), _, _ = SEMANTIC[name]
    for index in range(frames):
        picture, ids = street_picture(rng, width, height)
        bgr = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
        if name == "gta5":
            paths = (root / "images" / f"{index:05d}.png", root / "labels" / f"{index:05d}.png")
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(paths[0]), bgr)
            label = Image.frombytes("P", (width, height), ids.tobytes())
            label.putpalette(list(range(256)) * 3)
            label.save(paths[1])
        elif name == "cityscapes":
            stem = f"aachen_{index:06d}_000019"
            image = root / "leftImg8bit" / "train" / "aachen" / f"{stem}_leftImg8bit.png"
            label = root / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png"
            for path in (image, label):
                path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(image), bgr)
            cv2.imwrite(str(label), ids)
        else:  # SYNTHIA: 16-bit labels, the class id in R (any id of its table)
            image, label = root / "RGB" / f"{index:07d}.png", root / "GT" / "LABELS" / f"{index:07d}.png"
            for path in (image, label):
                path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(image), bgr)
            synthia_ids = (ids % 12 + 1).astype(np.uint16)
            cv2.imwrite(str(label), np.stack([np.zeros_like(synthia_ids), np.zeros_like(synthia_ids), synthia_ids], -1))


def write_kvasir(root: Path, frames: int, rng: np.random.Generator) -> None:
    for index in range(frames):
        picture, ids = street_picture(rng, 622, 529)
        mask = np.where(ids == ids[264, 311], 255, 0).astype(np.uint8)
        for folder, array in (("images", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)), ("masks", mask)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / folder / f"polyp_{index:03d}.jpg"), array)


def per_second(read, count: int, repeats: int) -> float:
    read(0)  # warm-up
    started = time.perf_counter()
    for repeat in range(repeats):
        for index in range(count):
            read(index)
    return repeats * count / (time.perf_counter() - started)


def raw_reader(files: list[tuple[Path, Path]], size: tuple[int, int], labelled: bool):
    height, width = size

    def read(index: int):
        image_path, label_path = files[index]
        cv2.resize(cv2.imread(str(image_path), cv2.IMREAD_COLOR), (width, height), interpolation=cv2.INTER_LINEAR)
        if labelled:
            label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
            cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)

    return read


def measure(frames: int, repeats: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for name, (_, resize, crop) in SEMANTIC.items():
            root = Path(folder) / name
            write_semantic(name, root, frames, rng)
            dataset = build_dataset(name, root, "train")
            files = dataset.file_pairs()
            for stream, labelled in (("labelled", True), ("unlabelled", False)):
                # as datamodules.uda builds them: the unlabelled (target) stream also makes the strong view
                transform = SemanticTransform(resize, crop, train=True, strong_view=not labelled, labelled=labelled)
                stream_set = TransformedDataset(dataset if labelled else dataset.unlabelled(), transform, seed=0)
                raw = per_second(raw_reader(files, resize, labelled), len(files), repeats)
                loader = per_second(lambda index: stream_set[(0, index)], len(files), repeats)
                rows.append({"dataset": name, "stream": stream, "raw": raw, "loader": loader})
        root = Path(folder) / "kvasir"
        write_kvasir(root, frames, rng)
        dataset = build_dataset("kvasir", root, "train")
        files = dataset.file_pairs()
        raw = per_second(raw_reader(files, (529, 622), True), len(files), repeats)
        loader = per_second(lambda index: dataset[index], len(files), repeats)
        rows.append({"dataset": "kvasir", "stream": "instances", "raw": raw, "loader": loader})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=4, help="files written per dataset")
    parser.add_argument("--repeats", type=int, default=3, help="passes over them per measurement")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)  # as in a DataLoader worker
    print("| dataset | stream | raw decode + resize (images/s) | project loader (images/s) | loader / raw |")
    print("|---|---|---|---|---|")
    for row in measure(args.frames, args.repeats):
        ratio = row["loader"] / row["raw"]
        print(f"| {row['dataset']} | {row['stream']} | {row['raw']:.1f} | {row['loader']:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
