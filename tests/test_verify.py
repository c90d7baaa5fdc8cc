"""The pre-flight data check (datamodules/verify.py) on tiny fixtures in the official layouts, one bad file each.

Every fault must be caught twice: by the check, in one line naming the file, and by the reader itself when the
item is read directly (``data.verify=false`` must not turn it into a silently wrong image or mask).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from datamodules.datasets import base
from datamodules.datasets.cityscapes import Cityscapes
from datamodules.datasets.gta5 import GTA5
from datamodules.datasets.kvasir import KvasirSEG
from datamodules.datasets.synthia import Synthia
from datamodules.errors import DatasetLayoutError
from datamodules.prompted import build_prompted_datamodule
from datamodules.uda import UDADataModule
from datamodules.verify import verify_dataset
from tests.conftest import prompted_datamodule_config
from tests.test_datasets import H, W, id_map, image, needs_non_root, raises_naming, truncate, write, write_palette

pytestmark = pytest.mark.faults

FRAMES = ("aachen_000000_000019", "aachen_000001_000019", "bremen_000000_000019")


def cityscapes(root, split="train"):
    for frame in FRAMES:
        city = frame.split("_")[0]
        write(root / f"leftImg8bit/{split}/{city}/{frame}_leftImg8bit.png", image())
        write(root / f"gtFine/{split}/{city}/{frame}_gtFine_labelIds.png", id_map(7, 26, 0, 33))
    return root


def cityscapes_label(root, index=1, split="train"):
    frame = FRAMES[index]
    return root / f"gtFine/{split}/{frame.split('_')[0]}/{frame}_gtFine_labelIds.png"


def kvasir(root, count=6):
    for index in range(count):
        write(root / f"images/cju{index}.jpg", image())
        write(root / f"masks/cju{index}.jpg", id_map(0, 255))
    return root


def truncated_jpeg_image(tmp_path):
    return KvasirSEG(kvasir(tmp_path)), truncate(tmp_path / "images/cju2.jpg"), "is truncated"


def truncated_kvasir_mask(tmp_path):
    return KvasirSEG(kvasir(tmp_path)), truncate(tmp_path / "masks/cju2.jpg", 0.7), "is truncated"


def truncated_png_label(tmp_path):
    return Cityscapes(cityscapes(tmp_path)), truncate(cityscapes_label(tmp_path)), "is truncated"


def label_of_wrong_size(tmp_path):
    root = cityscapes(tmp_path)
    return Cityscapes(root), write(cityscapes_label(root), np.zeros((H + 1, W), np.uint8)), f"is {W}x{H + 1}"


def label_id_beyond_the_table(tmp_path):
    """A 16-bit map where 8-bit labelIds belong; SYNTHIA's table covers 16 bits, so there 1000 is ignore."""
    root = cityscapes(tmp_path)
    label = write(cityscapes_label(root), id_map(7, 1000, dtype=np.uint16))
    return Cityscapes(root), label, "label ids 1000 outside the dataset's id range 0-255"


def unreadable_file(tmp_path):
    root = cityscapes(tmp_path)
    label = cityscapes_label(root)
    label.chmod(0)
    return Cityscapes(root), label, "is not readable (permission denied)"


def missing_pair(tmp_path):
    """A label deleted after discovery (discovery itself refuses an image without its label)."""
    dataset = Cityscapes(cityscapes(tmp_path))
    label = cityscapes_label(tmp_path)
    label.unlink()
    return dataset, label, "has no label file"


FAULTS = [
    truncated_jpeg_image,
    truncated_kvasir_mask,
    truncated_png_label,
    label_of_wrong_size,
    label_id_beyond_the_table,
    pytest.param(unreadable_file, marks=needs_non_root),
    missing_pair,
]


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_one_line_naming_the_file_from_the_check_and_the_reader(tmp_path, fault):
    dataset, bad, expected = fault(tmp_path / "data")
    with pytest.raises(DatasetLayoutError) as caught:
        verify_dataset(dataset, "train", tmp_path)
    message = str(caught.value)
    assert "\n" not in message and f"failed for 1 of {len(dataset)} items: " in message
    assert str(bad) in message and expected in message
    index = next(i for i, pair in enumerate(dataset.file_pairs()) if bad in pair)
    with raises_naming(bad):
        dataset[index]


def test_at_most_five_bad_files_are_listed(tmp_path):
    root = kvasir(tmp_path / "data", count=8)
    for index in range(8):
        truncate(root / f"images/cju{index}.jpg")
    with pytest.raises(DatasetLayoutError, match=r"failed for 7 of 7 items: ") as caught:
        verify_dataset(KvasirSEG(root, "train"), "train", tmp_path)
    listed = str(caught.value).split(": ", 1)[1].split(" | ")
    assert len(listed) == 6 and listed[-1] == "..." and all("is truncated" in line for line in listed[:5])


def test_unknown_ids_inside_the_table_pass(tmp_path):
    """GTA5's palette indices are 8-bit, all inside its 256-entry table; SYNTHIA's table covers 16 bits."""
    gta5 = tmp_path / "GTA5"
    write(gta5 / "images/00001.png", image())
    write_palette(gta5 / "labels/00001.png", id_map(7, 200))
    synthia = tmp_path / "SYNTHIA/RAND_CITYSCAPES"
    write(synthia / "RGB/0000000.png", image())
    write(synthia / "GT/LABELS/0000000.png", id_map(3, 1000, dtype=np.uint16))
    verify_dataset(GTA5(gta5), "train", tmp_path)
    verify_dataset(Synthia(tmp_path / "SYNTHIA"), "train", tmp_path)


def test_header_size_follows_the_exif_orientation_as_opencv_does(tmp_path):
    root = kvasir(tmp_path / "data")
    picture = Image.fromarray(np.zeros((H, W, 3), np.uint8))
    exif = picture.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    picture.save(root / "images/cju0.jpg", exif=exif.tobytes())
    write(root / "masks/cju0.jpg", np.zeros((W, H), np.uint8))
    assert base.image_size(root / "images/cju0.jpg") == base.read_rgb(root / "images/cju0.jpg").shape[:2] == (W, H)
    verify_dataset(KvasirSEG(root), "train", tmp_path)


@pytest.fixture
def counted_header_reads(monkeypatch):
    calls = []
    header = base.image_size
    monkeypatch.setattr(base, "image_size", lambda path, *orientation: calls.append(path) or header(path, *orientation))
    return calls


def test_cache_skips_decoding_until_a_file_changes(tmp_path, counted_header_reads):
    root = cityscapes(tmp_path / "data")

    def verify():
        verify_dataset(Cityscapes(root), "train", tmp_path / "data")
        return len(counted_header_reads)

    assert verify() == 3 and verify() == 3
    assert len(list((tmp_path / "data/.verify_cache").glob("Cityscapes-*.json"))) == 1
    label = cityscapes_label(root)
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: mtime only
    assert verify() == 6 and verify() == 6
    stat = label.stat()
    write(label, id_map(7, 8))  # rewritten, mtime restored: size only
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert verify() == 9


def test_failures_are_not_cached(tmp_path, counted_header_reads):
    root = cityscapes(tmp_path / "data")
    truncate(cityscapes_label(root))
    for _ in range(2):
        with raises_naming(cityscapes_label(root)):
            verify_dataset(Cityscapes(root), "train", tmp_path / "data")
    assert len(counted_header_reads) == 6


def test_cache_falls_back_to_the_user_cache_when_the_root_is_not_writable(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    not_a_directory = tmp_path / "root-file"
    not_a_directory.write_text("")
    verify_dataset(Cityscapes(cityscapes(tmp_path / "data")), "train", not_a_directory)
    assert len(list((tmp_path / "home/.cache/cross-domain-seg/verify").glob("Cityscapes-*.json"))) == 1


def test_procedural_datasets_are_skipped(tmp_path):
    from datamodules.datasets import build_dataset

    verify_dataset(build_dataset("synth_streets", None, "train", domain="real", length=2), "train", tmp_path)
    assert not (tmp_path / ".verify_cache").exists()


def spec(name, root, split):
    return {"name": name, "root": str(root), "split": split}


def test_broken_dataset_stops_uda_setup_before_any_loader(tmp_path):
    """The target train split has a truncated image: setup fails, so trainer.fit never reaches a step."""
    data = tmp_path / "data"
    cityscapes(data / "cityscapes", "train")
    cityscapes(data / "cityscapes", "val")
    write(data / "GTA5/images/00001.png", image())
    write_palette(data / "GTA5/labels/00001.png", id_map(7, 26))
    bad = data / f"cityscapes/leftImg8bit/train/aachen/{FRAMES[0]}_leftImg8bit.png"
    truncate(bad)

    def datamodule(verify):
        return UDADataModule(
            source=spec("gta5", data / "GTA5", "train"),
            target=spec("cityscapes", data / "cityscapes", "train"),
            val=spec("cityscapes", data / "cityscapes", "val"),
            streams=("src", "tgt"),
            num_workers=0,
            verify=verify,
            data_root=str(data),
        )

    broken = datamodule(verify=True)
    expected = f"data check of Cityscapes train failed for 1 of 3 items: {bad} is truncated"
    with pytest.raises(DatasetLayoutError, match=re.escape(expected)):
        broken.setup("fit")
    assert "tgt" not in broken.train_sets
    unchecked = datamodule(verify=False)
    unchecked.setup("fit")  # without the check the file is only found when a worker reads it
    with raises_naming(bad):
        unchecked.train_sets["tgt"][(0, 0)]  # training items are keyed by (epoch, index)


def test_broken_dataset_stops_prompted_setup(tmp_path):
    root = kvasir(tmp_path / "data/Kvasir-SEG")
    bad = truncate(root / "masks/cju5.jpg", 0.7)  # held out: the val split
    kvasir_spec = {"name": "kvasir", "root": str(root)}
    cfg = prompted_datamodule_config(
        {**kvasir_spec, "split": "train"}, {**kvasir_spec, "split": "val"}, root=str(tmp_path / "data"), verify=True
    )
    expected = f"data check of KvasirSEG val failed for 1 of 1 items: {bad} is truncated"
    with pytest.raises(DatasetLayoutError, match=re.escape(expected)):
        build_prompted_datamodule(cfg).setup("fit")
    assert len(list((tmp_path / "data/.verify_cache").glob("KvasirSEG-*.json"))) == 1  # the train split passed


def gta5_frame_pair(root, image_size, label_size):
    """One GTA5 pair: an image of image_size (h, w) and a label of label_size, road left of the middle, sky right."""
    write(root / "images/00001.png", np.zeros((*image_size, 3), np.uint8))
    h, w = label_size
    ids = np.where(np.arange(w) < w // 2, 7, 23).astype(np.uint8)[None].repeat(h, 0)
    label = root / "labels/00001.png"
    label.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids, "L").save(label)
    return label


def test_gta5_label_a_few_pixels_off_is_resized_to_its_image_and_named_on_every_check(tmp_path, caplog):
    root = tmp_path / "GTA5"
    label = gta5_frame_pair(root, (100, 200), (98, 197))
    for _ in range(2):  # the second check is the cached pass: the warning is repeated from the cache
        caplog.clear()
        verify_dataset(GTA5(root), "train", tmp_path)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert "1 labels are a few pixels off their image's size" in warning
        assert f"{label} (197x98, image 200x100)" in warning
    mask = GTA5(root)[0]["mask"]
    assert mask.shape == (100, 200)
    assert (mask[:, :99] == 0).all() and (mask[:, 101:] == 10).all()  # road, sky: the border moved with the resize


def test_gta5_label_of_another_size_is_still_an_error_and_other_datasets_allow_no_difference(tmp_path):
    root = tmp_path / "GTA5"
    label = gta5_frame_pair(root, (100, 200), (95, 200))  # 5% of the height
    with pytest.raises(DatasetLayoutError, match=re.escape(f"label {label} is 200x95 but its image")):
        verify_dataset(GTA5(root), "train", tmp_path)
    with raises_naming(label):
        GTA5(root)[0]
    city = cityscapes(tmp_path / "cityscapes")
    write(cityscapes_label(city), np.full((H, W - 1), 7, np.uint8))
    with raises_naming(cityscapes_label(city)):
        Cityscapes(city)[1]
