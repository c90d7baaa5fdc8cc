"""Dataset readers on tiny fixtures written in each dataset's official layout.

The fixtures are 8x12 images, so the tests check the mapping values, instance masks, splits and error
messages the real datasets would produce without needing any download.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from datamodules.datasets import DATASETS, build_dataset
from datamodules.datasets.camo import CAMO
from datamodules.datasets.cityscapes import Cityscapes
from datamodules.datasets.coco import COCO
from datamodules.datasets.cod10k import COD10K
from datamodules.datasets.gta5 import GTA5
from datamodules.datasets.kvasir import KvasirSEG
from datamodules.datasets.nthu import NTHUCrossCity
from datamodules.datasets.ocid import OCID
from datamodules.datasets.synthia import Synthia
from datamodules.datasets.voc import PascalVOC
from datamodules.errors import DatasetLayoutError
from datamodules.uda import UDADataModule

H, W = 8, 12


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def write_palette(path, ids):
    """A palette PNG as GTA5 and VOC ship them: the pixel values are indices, the colours a lookup."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = Image.frombytes("P", (W, H), ids.astype(np.uint8).tobytes())
    label.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
    label.save(path)
    return path


def image():
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def id_map(*values, dtype=np.uint8):
    """An HxW map whose column blocks hold ``values`` left to right."""
    return np.repeat(np.array(values, dtype=dtype), -(-W // len(values)))[:W][None].repeat(H, 0)


def raises_naming(path):
    return pytest.raises(DatasetLayoutError, match=re.escape(str(path)))


def truncate(path, keep=0.6):
    """What an interrupted copy leaves: the file's first bytes only."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


needs_non_root = pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 file")


# --- semantic datasets -------------------------------------------------------------------------------


@pytest.fixture
def cityscapes(tmp_path):
    for city, frame in [("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")]:
        write(tmp_path / f"leftImg8bit/train/{city}/{frame}_leftImg8bit.png", image())
        write(tmp_path / f"gtFine/train/{city}/{frame}_gtFine_labelIds.png", id_map(7, 26, 0, 33))
    return tmp_path


def test_cityscapes_maps_label_ids_to_train_ids(cityscapes):
    dataset = Cityscapes(cityscapes, "train")
    assert len(dataset) == 2
    item = dataset[0]
    assert item["image"].shape == (H, W, 3) and item["mask"].dtype == np.uint8
    assert item["mask"][0].tolist() == [0] * 3 + [13] * 3 + [255] * 3 + [18] * 3
    assert item["meta"]["path"].endswith("aachen_000000_000019_leftImg8bit.png")


def test_hidden_files_beside_the_data_are_not_items(cityscapes):
    """A tree copied from a Mac has a ._NAME resource fork beside every file; Path.glob matches them."""
    for folder, name in [
        ("leftImg8bit", "aachen_000000_000019_leftImg8bit.png"),
        ("gtFine", "aachen_000000_000019_gtFine_labelIds.png"),
    ]:
        (cityscapes / f"{folder}/train/aachen/._{name}").write_bytes(b"\x00\x05\x16\x07 resource fork")
    dataset = Cityscapes(cityscapes)
    assert len(dataset) == 2 and not any(path.name.startswith(".") for pair in dataset.file_pairs() for path in pair)
    (cityscapes / "gtFine/train/aachen/._aachen_000000_000019_gtFine_labelIds.png").unlink()
    assert len(Cityscapes(cityscapes)) == 2


def test_cityscapes_test_split_is_unlabelled_and_refused_where_labels_are_needed(cityscapes):
    """The released gtFine/test maps are placeholders: scoring them would score nothing."""
    for city, frame in [("berlin", "berlin_000000_000019")]:
        write(cityscapes / f"leftImg8bit/test/{city}/{frame}_leftImg8bit.png", image())
        write(cityscapes / f"gtFine/test/{city}/{frame}_gtFine_labelIds.png", np.zeros((H, W), np.uint8))
    test = Cityscapes(cityscapes, "test")
    assert test.file_pairs()[0][1] is None and (test[0]["mask"] == 255).all()
    spec = {"name": "cityscapes", "root": str(cityscapes), "split": "train", "resize": [H, W]}
    val = {**spec, "split": "test"}
    module = UDADataModule(spec, spec, val, streams=("src",), crop_size=(H, W), batch_size=1, num_workers=0)
    with pytest.raises(
        DatasetLayoutError, match=re.escape(f"cityscapes split 'test' under {cityscapes} has no labels")
    ):
        module.setup("fit")


def test_unlabelled_view_reads_no_label(cityscapes):
    dataset = Cityscapes(cityscapes, "train")
    (cityscapes / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()
    images_only = dataset.unlabelled()
    item = images_only[0]
    assert "mask" not in item and item["image"].shape == (H, W, 3) and len(images_only) == len(dataset)
    with raises_naming(cityscapes / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"):
        dataset[0]  # the labelled dataset itself is unchanged


def test_cityscapes_errors_name_the_path(cityscapes):
    label = cityscapes / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png"
    write(label, np.zeros((H + 1, W), np.uint8))
    with raises_naming(label):
        Cityscapes(cityscapes)[1]
    label.write_bytes(b"not a png")
    with raises_naming(label):
        Cityscapes(cityscapes)[1]
    label.unlink()
    with raises_naming(label):
        Cityscapes(cityscapes)
    with raises_naming(cityscapes / "leftImg8bit/val"):
        Cityscapes(cityscapes, "val")


def test_corrupt_image_is_named(cityscapes):
    picture = cityscapes / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    picture.write_bytes(b"\x89PNG truncated")
    with raises_naming(picture):
        Cityscapes(cityscapes)[0]


def test_truncated_png_label_is_named(cityscapes):
    label = truncate(cityscapes / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png")
    with pytest.raises(DatasetLayoutError, match=re.escape(f"{label} is truncated: its last 4096 bytes hold no IEND")):
        Cityscapes(cityscapes)[0]


def test_16bit_label_beyond_the_table_names_file_value_and_range(cityscapes):
    label = write(
        cityscapes / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", id_map(7, 1000, dtype=np.uint16)
    )
    with pytest.raises(DatasetLayoutError, match=re.escape(f"{label} holds label ids 1000 outside") + ".*0-255"):
        Cityscapes(cityscapes)[0]


@needs_non_root
def test_unreadable_file_says_permission_denied(cityscapes):
    picture = cityscapes / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    picture.chmod(0)
    with pytest.raises(DatasetLayoutError, match=re.escape(f"{picture} is not readable (permission denied)")):
        Cityscapes(cityscapes)[0]


@pytest.fixture
def gta5(tmp_path):
    for stem in ("00001", "00002", "02154"):
        write(tmp_path / f"images/{stem}.png", image())
    write_palette(tmp_path / "labels/00001.png", id_map(7, 26, 0))  # as released
    write(tmp_path / "labels/00002.png", id_map(7, 26, 0))  # a grey re-save keeps the ids
    return tmp_path


def test_gta5_skips_known_missing_ids_with_one_warning(gta5, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = GTA5(gta5, "val")
    assert len(dataset) == 2
    assert [r.getMessage() for r in caplog.records if "GTA5" in r.getMessage()] == [
        "GTA5: skipped 1 images whose ids are known to have no label"
    ]
    for item in dataset:
        assert item["mask"][0].tolist() == [0] * 4 + [13] * 4 + [255] * 4


def test_gta5_palette_index_outside_the_mapping_is_ignore_not_an_error(gta5):
    """Every 8-bit index lies inside the 256-entry table; one that is no labelId is ignore (255)."""
    write_palette(gta5 / "labels/00001.png", id_map(7, 200))
    assert GTA5(gta5)[0]["mask"][0].tolist() == [0] * 6 + [255] * 6


def test_gta5_colour_label_is_named(gta5):
    label = write(gta5 / "labels/00002.png", np.zeros((H, W, 3), np.uint8))
    with raises_naming(label):
        GTA5(gta5)[1]


def test_gta5_missing_label_is_an_error_unless_known_and_skipped(gta5):
    with raises_naming(gta5 / "labels/02154.png"):
        GTA5(gta5, skip_known_missing=False)
    write(gta5 / "images/00003.png", image())
    with raises_naming(gta5 / "labels/00003.png"):
        GTA5(gta5)


def test_synthia_reads_the_r_channel_of_16bit_labels(tmp_path):
    write(tmp_path / "RGB/0000000.png", image())
    write(tmp_path / "RGB/0000001.png", image())
    ids = id_map(3, 1, 21, 999, dtype=np.uint16)
    instance_ids = np.full((H, W), 4000, np.uint16)  # the other channels must be ignored
    write(tmp_path / "GT/LABELS/0000000.png", np.dstack([instance_ids, instance_ids, ids]))
    write(tmp_path / "GT/LABELS/0000001.png", ids)
    dataset = Synthia(tmp_path)
    expected = [0] * 3 + [10] * 3 + [3] * 3 + [255] * 3
    assert dataset[0]["mask"][0].tolist() == expected
    assert dataset[1]["mask"][0].tolist() == expected


def test_synthia_accepts_the_official_archive_folder(tmp_path):
    write(tmp_path / "RAND_CITYSCAPES/RGB/0000000.png", image())
    write(tmp_path / "RAND_CITYSCAPES/GT/LABELS/0000000.png", id_map(3, 1, dtype=np.uint16))
    assert Synthia(tmp_path)[0]["mask"][0].tolist() == [0] * 6 + [10] * 6
    with pytest.raises(DatasetLayoutError, match="or both under ROOT/RAND_CITYSCAPES/"):
        Synthia(tmp_path / "RAND_CITYSCAPES/GT")


# --- instance datasets -------------------------------------------------------------------------------


def box(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def coco(tmp_path):
    images, annotations = [], []
    for image_id in range(1, 10):
        name = f"{image_id:012d}.jpg"
        write(tmp_path / "val2017" / name, image())
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        if image_id == 3:  # an image with no annotation
            continue
        annotations.append(
            {
                "id": 10 * image_id,
                "image_id": image_id,
                "category_id": 1,
                "area": 20.0,
                "bbox": [1, 1, 5, 4],
                "segmentation": box(1, 1, 6, 5),
                "iscrowd": int(image_id == 8),
            }
        )
    annotations.append(
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "area": 6.0,
            "bbox": [8, 5, 3, 2],
            "segmentation": box(8, 5, 11, 7),
            "iscrowd": 0,
        }
    )
    path = tmp_path / "annotations/instances_val2017.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]})
    )
    return tmp_path


def test_coco_split_over_all_ids_then_unannotated_images_dropped_crowds_kept(coco, caplog):
    """WeSAM's order: the 6:1 split over the 9 sorted ids holds out id 7 (dropping id 3 first would hold out id 8)."""
    with caplog.at_level(logging.WARNING):
        train, val = COCO(coco, "train"), COCO(coco, "val")
    assert "COCO train: dropped 1 of 8 images with no annotation" in caplog.text
    assert [Path(item[0]).stem for item in val.items] == ["000000000007"]
    assert [int(Path(item[0]).stem) for item in train.items] == [1, 2, 4, 5, 6, 8, 9]
    assert train[5]["instances"].shape == (1, H, W)  # image 8's only annotation is a crowd region
    instances = train[0]["instances"]
    assert instances.shape == (2, H, W) and instances.dtype == np.uint8
    assert instances[0, 3, 3] == 1 and instances[0, 7, 11] == 0 and instances[1, 6, 9] == 1
    assert COCO(coco, max_instances=1)[0]["instances"].shape == (1, H, W)


def test_coco_missing_image_file_is_named(coco):
    (coco / "val2017/000000000003.jpg").unlink()
    with raises_naming(coco / "val2017/000000000003.jpg"):
        COCO(coco)


def test_voc_palette_indices_are_instances(tmp_path):
    ids = id_map(0, 1, 255, 2)
    for index in range(7):
        write(tmp_path / f"JPEGImages/2007_{index:06d}.jpg", image())
        write_palette(tmp_path / f"SegmentationObject/2007_{index:06d}.png", ids)
    train, val = PascalVOC(tmp_path, "train"), PascalVOC(tmp_path, "val")
    assert (len(train), len(val)) == (6, 1)
    instances = train[0]["instances"]
    assert instances.shape == (2, H, W)
    assert (instances[0] == (ids == 1)).all() and (instances[1] == (ids == 2)).all()
    grey = tmp_path / "SegmentationObject/2007_000000.png"
    write(grey, ids)
    with raises_naming(grey):
        train[0]


def test_camo_uses_its_folders_and_drops_empty_gt(tmp_path, caplog):
    for split, stem in [("Train", "camourflage_00001"), ("Train", "camourflage_00002"), ("Test", "camourflage_00003")]:
        write(tmp_path / f"Images/{split}/{stem}.jpg", image())
    write(tmp_path / "GT/camourflage_00001.png", id_map(0, 128, 255))
    write(tmp_path / "GT/camourflage_00002.png", np.zeros((H, W), np.uint8))
    write(tmp_path / "GT/camourflage_00003.png", id_map(0, 255))
    with caplog.at_level(logging.WARNING):
        train = CAMO(tmp_path, "train")
    assert "CAMO: dropped 1 of 2 images" in caplog.text
    assert len(train) == 1 and train[0]["instances"].shape == (2, H, W)
    assert len(CAMO(tmp_path, "test")) == len(CAMO(tmp_path, "val")) == 1


def test_camo_and_cod10k_drop_gt_of_another_size_and_keep_the_stored_pixel_grid(tmp_path, caplog):
    """As WeSAM reads them (PIL): a GT of another size than its image is dropped, and an EXIF orientation is not
    applied, so the GT stays on the pixels it was drawn on."""
    for stem in ("camourflage_00001", "camourflage_00002"):
        picture = np.zeros((H, W, 3), np.uint8)
        picture[:, W // 2 :] = 255  # the object is the bright right half, as its GT says
        exif = Image.new("RGB", (1, 1)).getexif()
        exif[0x0112] = 3  # shown rotated by 180 degrees
        (tmp_path / "Images/Train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(tmp_path / f"Images/Train/{stem}.jpg", exif=exif.tobytes(), quality=100)
    write(tmp_path / "GT/camourflage_00001.png", id_map(0, 255))
    write(tmp_path / "GT/camourflage_00002.png", np.full((H + 1, W), 255, np.uint8))
    with caplog.at_level(logging.WARNING):
        camo = CAMO(tmp_path, "train")
    assert "CAMO: dropped 1 of 2 images whose GT map is not the image's size" in caplog.text
    item = camo[0]
    assert len(camo) == 1 and item["image"][item["instances"][0] == 1].min() > 200


def test_cod10k_split_and_missing_gt(tmp_path):
    for index in range(5):
        write(tmp_path / f"Test/Image/COD10K-CAM-{index}.jpg", image())
        write(tmp_path / f"Test/GT_Object/COD10K-CAM-{index}.png", id_map(0, 255))
    assert (len(COD10K(tmp_path, "train")), len(COD10K(tmp_path, "val"))) == (4, 1)
    assert COD10K(tmp_path, "val")[0]["instances"].sum() == H * W // 2
    (tmp_path / "Test/GT_Object/COD10K-CAM-2.png").unlink()
    with raises_naming(tmp_path / "Test/GT_Object/COD10K-CAM-2.png"):
        COD10K(tmp_path)


def test_kvasir_connected_components_are_polyps(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[1:4, 1:4] = 255
    mask[5:7, 7:11] = 200
    for index in range(6):
        write(tmp_path / f"images/cju{index}.jpg", image())
        write(tmp_path / f"masks/cju{index}.jpg", mask)
    train, val = KvasirSEG(tmp_path, "train"), KvasirSEG(tmp_path, "val")
    assert (len(train), len(val)) == (5, 1)
    instances = train[0]["instances"]
    assert instances.shape == (2, H, W)
    assert instances[0, 2, 2] == 1 and instances[1, 6, 9] == 1 and instances[:, 0, 0].sum() == 0


def test_kvasir_box_file_gives_wesams_instances_and_split_order(tmp_path, caplog):
    """With kavsir_bboxes.json: the json's order splits 5:1, each box takes the mask's foreground inside it."""
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 8:40] = 255  # one region across both boxes (8 x 8 blocks: JPEG keeps them exact)
    mask[24:32, 8:16] = 255  # foreground outside every box
    boxes = {}
    for stem in "fedcba":
        write(tmp_path / f"images/{stem}.jpg", np.zeros((32, 48, 3), np.uint8))
        write(tmp_path / f"masks/{stem}.jpg", mask)
        boxes[stem] = {
            "height": 32,
            "width": 48,
            "bbox": [
                {"label": "polyp", "xmin": 8, "ymin": 8, "xmax": 24, "ymax": 24},
                {"label": "polyp", "xmin": 24, "ymin": 8, "xmax": 40, "ymax": 24},
            ],
        }
    (tmp_path / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    train, val = KvasirSEG(tmp_path, "train"), KvasirSEG(tmp_path, "val")
    assert [Path(item[0]).stem for item in val.items] == ["a"] and len(train) == 5
    instances = train[0]["instances"]
    assert instances.shape == (2, 32, 48)
    assert instances[0].sum() == instances[1].sum() == 16 * 16 and instances[0, 8:24, 8:24].all()
    assert instances[:, 24:].sum() == 0  # outside the boxes
    (tmp_path / "kavsir_bboxes.json").write_text('{"a": {"bbox": [{"xmin": 1}]}}')
    with raises_naming(tmp_path / "kavsir_bboxes.json"):
        KvasirSEG(tmp_path)
    (tmp_path / "kavsir_bboxes.json").write_text(json.dumps({"g": boxes["a"]}))
    with raises_naming(tmp_path / "images/g.jpg"):
        KvasirSEG(tmp_path)
    (tmp_path / "kavsir_bboxes.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert len(KvasirSEG(tmp_path, "val")) == 1
    assert "one instance per connected mask region" in caplog.text


def test_truncated_kvasir_jpegs_are_named_not_decoded_in_part(tmp_path):
    """libjpeg decodes a truncated JPEG with grey rows and a warning: a wrong image, a wrong mask."""
    mask = np.zeros((64, 96), np.uint8)
    mask[10:31, 10:31] = 255
    for index in range(2):
        write(tmp_path / f"images/cju{index}.jpg", image())
        write(tmp_path / f"masks/cju{index}.jpg", mask)
    picture, truncated_mask = truncate(tmp_path / "images/cju0.jpg"), truncate(tmp_path / "masks/cju1.jpg", 0.7)
    dataset = KvasirSEG(tmp_path, "train")
    for index, path in enumerate((picture, truncated_mask)):
        with pytest.raises(
            DatasetLayoutError, match=re.escape(f"{path} is truncated: its last 4096 bytes hold no EOI")
        ):
            dataset[index]


@pytest.mark.parametrize("trailer", [bytes(512), b"SEFT" + bytes(range(256)) * 2], ids=["zeros", "camera trailer"])
def test_bytes_after_the_jpeg_end_marker_are_accepted(tmp_path, trailer):
    for index in range(2):
        write(tmp_path / f"images/cju{index}.jpg", image())
        write(tmp_path / f"masks/cju{index}.jpg", id_map(0, 255))
    padded = tmp_path / "images/cju0.jpg"
    padded.write_bytes(padded.read_bytes() + trailer)
    assert (KvasirSEG(tmp_path, "train")[0]["image"] == KvasirSEG(tmp_path, "train")[1]["image"]).all()


def test_kvasir_layout_errors_name_the_path(tmp_path):
    (tmp_path / "images").mkdir()
    with raises_naming(tmp_path / "images"):
        KvasirSEG(tmp_path)
    write(tmp_path / "images/cju0.jpg", image())
    with raises_naming(tmp_path / "masks"):
        KvasirSEG(tmp_path)
    mask = write(tmp_path / "masks/cju0.jpg", np.full((H, W + 2), 255, np.uint8))
    with raises_naming(mask):
        KvasirSEG(tmp_path)[0]


def test_ocid_frames_with_no_object_are_dropped_before_the_split(tmp_path, caplog):
    for index in range(8):
        write(tmp_path / f"YCB10/floor/bottom/seq01/rgb/result_{index}.png", image())
        labels = id_map(0, 1, 2 + index % 4, dtype=np.uint16) if index else id_map(0, 1, dtype=np.uint16)
        write(tmp_path / f"YCB10/floor/bottom/seq01/label/result_{index}.png", labels)
    with caplog.at_level(logging.WARNING):
        train, val = OCID(tmp_path, "train"), OCID(tmp_path, "val")
    assert "OCID: dropped 1 of 8 frames with no object" in caplog.text
    assert [Path(item[0]).stem for item in val.items] == ["result_7"]  # the 7th of the 7 frames left
    assert len(train) == 6 and all(len(train[i]["instances"]) == 1 for i in range(6))


def test_ocid_background_ids_depend_on_table_sequences(tmp_path):
    labels = id_map(0, 1, 2, 3, dtype=np.uint16)
    for folder in ("ARID20/table/top/seq01", "YCB10/floor/bottom/seq02"):
        write(tmp_path / folder / "rgb/result_2018.png", image())
        write(tmp_path / folder / "label/result_2018.png", labels)
    table, floor = OCID(tmp_path, "train")  # sorted paths: ARID20 (table) first
    assert table["instances"].shape == (1, H, W) and floor["instances"].shape == (2, H, W)
    assert (table["instances"][0] == (labels == 3)).all() and (floor["instances"][0] == (labels == 2)).all()
    (tmp_path / "YCB10/floor/bottom/seq02/label/result_2018.png").unlink()
    with raises_naming(tmp_path / "YCB10/floor/bottom/seq02/label/result_2018.png"):
        OCID(tmp_path)


def test_cityscapes_cross_city_label_set_keeps_only_the_13_shared_classes(cityscapes):
    # labelIds 7 road, 26 car, 0 unlabelled, 33 bicycle; 12 wall and 17 pole are not among NTHU's 13 classes
    write(cityscapes / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", id_map(7, 12, 17, 33))
    assert Cityscapes(cityscapes, "train")[0]["mask"][0].tolist() == [0] * 3 + [3] * 3 + [5] * 3 + [18] * 3
    mask = Cityscapes(cityscapes, "train", label_set="cross_city")[0]["mask"]
    assert mask[0].tolist() == [0] * 3 + [255] * 6 + [18] * 3
    with pytest.raises(ValueError, match="label_set='nope'"):
        Cityscapes(cityscapes, "train", label_set="nope")


@pytest.fixture
def nthu(tmp_path):
    """Two cities in the official layout: unlabelled train images, test images with *_eval.png labelIds."""
    for city in ("Rome", "Taipei"):
        for index in range(2):
            write(tmp_path / city / "Images/Train" / f"pic_{index:03d}.jpg", image())
        write(tmp_path / city / "Images/Test" / "pic_100.jpg", image())
        write(tmp_path / city / "Labels/Test" / "pic_100_eval.png", id_map(7, 19, 22, 32))
    return tmp_path


def test_nthu_train_is_unlabelled_and_test_maps_the_13_classes(nthu):
    train = NTHUCrossCity(nthu, "train", city="Taipei")
    assert len(train) == 2 and train[0]["image"].shape == (H, W, 3)
    assert (train[0]["mask"] == 255).all() and train[0]["meta"]["path"].endswith("Taipei/Images/Train/pic_000.jpg")
    assert train.file_pairs()[0][1] is None
    test = NTHUCrossCity(nthu, "test", city="Rome")
    # 7 road -> 0, 19 traffic light -> 6, 22 terrain (not annotated by NTHU) -> ignore, 32 motorcycle -> 17
    assert len(test) == 1 and test[0]["mask"][0].tolist() == [0] * 3 + [6] * 3 + [255] * 3 + [17] * 3
    assert len(NTHUCrossCity(nthu, "val", city="Rome")) == 1


def test_nthu_png_test_images_and_palette_labels(nthu):
    """Some copies of the release hold a city's test images as .png (one per name, the .jpg where both are left)."""
    rio = nthu / "Rio"
    write(rio / "Images/Test/pic_100.png", image())
    write(rio / "Images/Test/pic_101.png", image())
    write(rio / "Images/Test/pic_101.jpg", image())
    (rio / "Images/Test/notes.txt").write_text("not an image")
    write_palette(rio / "Labels/Test/pic_100_eval.png", id_map(7, 19, 22, 32))
    write(rio / "Labels/Test/pic_101_eval.png", id_map(7, 19, 22, 32))
    test = NTHUCrossCity(nthu, "test", city="Rio")
    assert [image.name for image, _ in test.file_pairs()] == ["pic_100.png", "pic_101.jpg"]
    assert test[0]["mask"][0].tolist() == test[1]["mask"][0].tolist() == [0] * 3 + [6] * 3 + [255] * 3 + [17] * 3


def test_nthu_layout_errors_name_the_path_or_key(nthu):
    (nthu / "Rome/Labels/Test/pic_100_eval.png").unlink()
    with raises_naming(nthu / "Rome/Labels/Test/pic_100_eval.png"):
        NTHUCrossCity(nthu, "test", city="Rome")
    with raises_naming(nthu / "Tokyo"):
        NTHUCrossCity(nthu, "train", city="Tokyo")
    with pytest.raises(ValueError, match="city='Paris'; expected one of"):
        NTHUCrossCity(nthu, "train", city="Paris")
    with pytest.raises(DatasetLayoutError, match="unknown split 'extra'"):
        NTHUCrossCity(nthu, "extra", city="Rome")


# --- registry ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["cityscapes", "nthu", "gta5", "synthia", "coco", "voc", "camo", "cod10k", "kvasir", "ocid"]
)
def test_missing_root_is_named(tmp_path, name):
    with raises_naming(tmp_path / "absent"):
        build_dataset(name, tmp_path / "absent", "train")
    with pytest.raises(DatasetLayoutError, match=f"'{name}'.*'root'"):
        build_dataset(name, None, "train")


def test_registry_builds_procedural_datasets_and_rejects_unknown_names():
    assert set(DATASETS) >= {"synth_streets", "synth_shapes", "cityscapes"}
    assert build_dataset("synth_shapes", None, "val", domain="clear", length=3, size=32)[0]["instances"].ndim == 3
    assert len(build_dataset("synth_streets", None, "train", domain="real", length=2)) == 2
    with pytest.raises(ValueError, match="unknown dataset 'nope'; available: camo, cityscapes"):
        build_dataset("nope", None, "train")
