"""The first real folder a user points densepipe at: phone JPEGs with an EXIF orientation, semantic
PNGs with a value past the class list, images no JSON lists, a folder without a dataset card, tasks
the data has no labels for. Each is found by ``prepare`` or before training, in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline import stages
from pipeline.config import Config, load_config
from pipeline.data.check import check_dataset
from pipeline.data.reader import open_dataset, read_image, split_label_kinds
from pipeline.errors import ConfigError, DataError
from pipeline.predict import ImageFiles
from tests.conftest import tiny_overrides

STORED = (64, 96)  # (H, W) of the JPEG's pixel grid; EXIF orientation 6 shows it as 96x64
UPRIGHT = (96, 64)
CLASSES = ("road", "car", "sky")
CARD = {"name": "street", "classes": [{"id": i, "name": n} for i, n in enumerate(CLASSES)]}


def _rgb(hw: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def _phone_jpeg(path: Path, seed: int = 0) -> None:
    """A JPEG stored ``STORED`` (HxW) whose EXIF orientation 6 says: rotate 90 degrees to show."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(STORED, seed)).save(path, "JPEG", exif=exif.tobytes())


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _coco_folder(root: Path, *, unlisted: int = 0) -> Path:
    """densepipe layout without meta.json: per split a phone JPEG and a 32x32 PNG, listed in
    ``annotations/instances_{split}.json`` at their upright sizes (as COCO tools write them), plus
    ``unlisted`` PNGs in ``images/train`` that the JSON does not list."""
    for split in ("train", "val"):
        _phone_jpeg(root / "images" / split / "phone.jpg")
        _png(root / "images" / split / "plain.png", _rgb((32, 32), 1))
        images = [{"id": 1, "file_name": "phone.jpg", "height": UPRIGHT[0], "width": UPRIGHT[1]},
                  {"id": 2, "file_name": "plain.png", "height": 32, "width": 32}]
        anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0,
                 "area": 100, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]} for i in (1, 2)]
        obj = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "car"}]}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(obj))
    for k in range(unlisted):
        _png(root / "images" / "train" / f"extra_{k}.png", _rgb((32, 32), 2))
    return root


def _semantic_folder(root: Path) -> Path:
    """A semantic-only dataset: meta.json with the minimal card, 4 train and 2 val images (one
    phone JPEG each) and their label PNGs (values 0..2, some 255) at the upright size."""
    root.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps(CARD))
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            if i == 0:
                _phone_jpeg(root / "images" / split / f"{i:03d}.jpg", seed=i)
                hw = UPRIGHT
            else:
                _png(root / "images" / split / f"{i:03d}.png", _rgb((32, 32), i))
                hw = (32, 32)
            sem = np.random.default_rng(i).integers(0, len(CLASSES), hw, dtype=np.uint8)
            sem[:2] = 255
            _png(root / "semantic" / split / f"{i:03d}.png", sem)
    return root


def _cfg(root: Path, out: Path, **extra: Any) -> Config:
    values: dict[str, Any] = {"data__source": "folder", "model__tasks": "[semantic]", **extra}
    return load_config(None, tiny_overrides(root, out, None, **values))


# -- 1. EXIF orientation ------------------------------------------------------------------------
def test_exif_rotated_jpeg_is_read_upright_by_prepare_training_and_predict(tmp_path: Path) -> None:
    root = _coco_folder(tmp_path / "coco")
    jpeg = root / "images" / "val" / "phone.jpg"
    with Image.open(jpeg) as im:
        assert (im.height, im.width) == STORED  # the file really is stored sideways
    summary = stages.prepare(_cfg(root, tmp_path / "out"))  # the JSON's upright size: no problem
    assert summary["images"] == {"train": 2, "val": 2}
    sample = open_dataset(root, "val").load(0)
    assert sample["file_name"] == "phone.jpg"
    assert tuple(sample["image"].shape) == (3, *UPRIGHT) and sample["meta"]["orig_size"] == UPRIGHT
    assert sample["instances"]["masks"].shape[1:] == UPRIGHT
    assert read_image(jpeg).shape == (*UPRIGHT, 3)
    assert tuple(ImageFiles([jpeg])[0]["image"].shape) == (3, *UPRIGHT)  # what predict batches
    upright = np.asarray(Image.open(jpeg).transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    assert np.array_equal(read_image(jpeg), upright)  # orientation 6 = rotate 90 degrees clockwise


# -- 2. semantic values past the class list -----------------------------------------------------
def test_semantic_value_out_of_range_named_by_prepare_and_reader(tmp_path: Path) -> None:
    root = _semantic_folder(tmp_path / "sem")
    bad = root / "semantic" / "train" / "002.png"
    arr = np.asarray(Image.open(bad)).copy()
    arr[5, 5:8] = 3  # == number of classes
    arr[6, 0] = 20
    _png(bad, arr)
    with pytest.raises(DataError) as err:
        check_dataset(root, ("train", "val"))
    msg = str(err.value)
    assert "\n" not in msg
    assert ("1 problem in split 'train': semantic/train/002.png: semantic values 3, 20 (4 pixels) "
            "out of range: expected 0..2 (the 3 classes of dataset card 'street') or 255 "
            "(ignore)") in msg
    with pytest.raises(DataError) as err:
        open_dataset(root, "train").load(2)
    assert str(err.value) == (f"{bad}: semantic values 3, 20 (4 pixels) out of range: expected "
                              "0..2 (the 3 classes of dataset card 'street') or 255 (ignore)")
    open_dataset(root, "train").load(1)  # its neighbours read fine


# -- 3. images no JSON lists --------------------------------------------------------------------
def test_prepare_says_which_images_no_json_lists(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    root = _coco_folder(tmp_path / "coco", unlisted=1)
    with caplog.at_level(logging.WARNING):
        summary = stages.prepare(_cfg(root, tmp_path / "out"))
    assert summary["images"] == {"train": 2, "val": 2}
    assert summary["unlisted_images"] == 1
    assert summary["splits"]["train"]["unlisted_examples"] == ["extra_0.png"]
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert ("images/train: 1 image file(s) not listed in the split's annotation JSON, so not "
            "used: extra_0.png") in warn


# -- 4. no dataset card, no annotation JSON -----------------------------------------------------
def test_folder_without_card_or_json_says_what_to_write(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for split in ("train", "val"):
        _png(root / "images" / split / "a.png", _rgb((8, 8), 0))
    with pytest.raises(DataError) as err:
        open_dataset(root, "train")
    msg = str(err.value)
    assert msg.startswith(f"{root}: no dataset card (meta.json) and no annotation JSON for split "
                          "'train' (annotations/instances_train.json, "
                          "annotations/panoptic_train.json)")
    assert '{"name": "mydata", "classes": [{"id": 0, "name": "road"}' in msg
    assert 'docs/own-data.md, section "Dataset card (meta.json)"' in msg and "\n" not in msg
    with pytest.raises(DataError, match="no dataset card"):
        check_dataset(root, ("train", "val"))
    doc = Path(__file__).resolve().parents[1] / "docs" / "own-data.md"
    assert "## Dataset card (meta.json)" in doc.read_text()
    (root / "meta.json").write_text(json.dumps(CARD))  # the minimal card of the message suffices
    ds = open_dataset(root, "train")
    assert ds.card.class_names == list(CLASSES) and len(ds) == 1 and ds.label_kinds == ()


def test_coco2017_folder_without_json_says_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _png(root / "train2017" / "000000000001.png", _rgb((8, 8), 0))
    (root / "annotations").mkdir()
    with pytest.raises(DataError) as err:
        open_dataset(root, "train")
    assert str(err.value).startswith(
        f"{root / 'annotations'}: no annotation JSON for split 'train': expected "
        "instances_train2017.json, panoptic_train2017.json or person_keypoints_train2017.json here")
    assert "dataset card (meta.json)" in str(err.value)


# -- 5. tasks without labels --------------------------------------------------------------------
def test_tasks_without_labels_are_refused_and_semantic_only_data_trains(tmp_path: Path) -> None:
    root = _semantic_folder(tmp_path / "sem")
    assert split_label_kinds(root, "train") == open_dataset(root, "train").label_kinds == ("semantic",)
    with pytest.raises(ConfigError) as err:
        stages.train(_cfg(root, tmp_path / "refused", model__tasks="[semantic,depth]"))
    assert str(err.value) == (f"model.tasks: task 'depth' needs depth labels, but split 'train' of "
                              f"{root} has none (label kinds found: semantic); remove the task "
                              "from model.tasks or add depth labels (docs/own-data.md)")
    assert not (tmp_path / "refused" / "train").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="task 'instance' \\(enabled by panoptic\\) needs instances"):
        stages.check_labels(_cfg(root, tmp_path, model__tasks="[panoptic]", model__heads="{}"),
                            ("semantic",), split="train")
    with pytest.raises(ConfigError, match="task 'normals' needs normals labels, but split 'val'"):
        stages.evaluate(_cfg(root, tmp_path / "refused", model__tasks="[normals]", model__heads="{}"))

    out = tmp_path / "out"
    cfg = _cfg(root, out, train__steps=2)
    stages.prepare(cfg)
    summary = stages.train(cfg)
    assert summary["step"] == 2
    metrics = stages.evaluate(cfg)
    assert "semantic/mIoU" in metrics and set(metrics) >= {"semantic/IoU/road", "semantic/IoU/car"}
    written = stages.predict(cfg, [root / "images" / "val" / "000.jpg"],
                             checkpoint=summary["last"], out_dir=out / "pred", vis=False,
                             progress=False)
    (label,) = [p for p in written if p.endswith(".png")]
    assert Image.open(label).size[::-1] == UPRIGHT  # predicted at the photo's upright size


def test_synthetic_dataset_has_every_label_kind(tiny_dataset: Path, tmp_path: Path) -> None:
    kinds = split_label_kinds(tiny_dataset, "train")
    assert kinds == open_dataset(tiny_dataset, "train").label_kinds
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path, None, model__heads="{}",
                                           model__tasks="[panoptic,keypoints,depth,normals,"
                                                        "colorization]"))
    stages.check_labels(cfg, kinds, split="train")  # nothing refused
