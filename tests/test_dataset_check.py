"""``check_dataset``: what ``prepare`` finds in a user's folder before ``train`` would."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.data.check import check_dataset
from pipeline.errors import DataError

SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def _rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("check") / "synthetic"
    write_synthetic_dataset(root, num_train=2, num_val=2, image_size=64, seed=0, workers=1)
    return root


@pytest.fixture
def data(_rendered: Path, tmp_path: Path) -> Path:
    """A fresh copy of a valid 2 + 2 image synthetic dataset (densepipe layout, 64x64 PNGs)."""
    root = tmp_path / "data"
    shutil.copytree(_rendered, root)
    return root


def _truncate(path: Path, keep: float = 0.5) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: int(len(b) * keep)])


def _edit_json(path: Path, fn: Any) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _problem(root: Path) -> str:
    with pytest.raises(DataError) as err:
        check_dataset(root, SPLITS)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{root}: "), msg
    return msg


def test_valid_dataset_summary(data: Path) -> None:
    s = check_dataset(data, SPLITS)
    assert s["images"] == {"train": 2, "val": 2}
    assert s["unlisted_images"] == 0 and s["dropped_annotations"] == 0
    train = s["splits"]["train"]
    assert train["files_checked"] == 2 * 5  # image + semantic, depth, normals, panoptic PNGs
    assert {"semantic", "instances", "panoptic", "depth", "normals"} <= set(train["label_kinds"])


def test_missing_image(data: Path) -> None:
    (data / "images/train/000002.png").unlink()
    msg = _problem(data)
    assert "1 problem in split 'train': images/train/000002.png: file missing (listed in " \
           "annotations/instances_train.json)" in msg


def test_truncated_png(data: Path) -> None:
    _truncate(data / "images/val/000001.png")
    msg = _problem(data)
    assert "split 'val'" in msg and "images/val/000001.png: truncated or corrupt image (PNG:" in msg


def test_truncated_label_png(data: Path) -> None:
    _truncate(data / "depth/train/000001.png")
    assert "depth/train/000001.png: corrupt or unreadable depth PNG" in _problem(data)


def _to_coco2017_jpeg(root: Path, out: Path) -> None:
    """The val split of ``root`` as a COCO 2017 folder of JPEGs (instances only)."""
    (out / "val2017").mkdir(parents=True)
    (out / "annotations").mkdir()
    inst = json.loads((root / "annotations/instances_val.json").read_text())
    for im in inst["images"]:
        stem = Path(im["file_name"]).stem
        Image.open(root / "images/val" / im["file_name"]).convert("RGB").save(
            out / "val2017" / f"{stem}.jpg", quality=90)
        im["file_name"] = f"{stem}.jpg"
    (out / "annotations/instances_val2017.json").write_text(json.dumps(inst))


def test_truncated_jpeg_coco2017_layout(data: Path, tmp_path: Path) -> None:
    coco = tmp_path / "coco"
    _to_coco2017_jpeg(data, coco)
    assert check_dataset(coco, ["val"])["images"] == {"val": 2}
    jpg = coco / "val2017/000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:-200])  # Image.verify() accepts this file
    with Image.open(jpg) as im:
        im.verify()
    with pytest.raises(DataError) as err:
        check_dataset(coco, ["val"])
    assert "val2017/000002.jpg: truncated or corrupt image (JPEG: image file is truncated" \
           in str(err.value)


def test_size_differs_from_json(data: Path) -> None:
    p = data / "images/train/000001.png"
    Image.open(p).resize((65, 64)).save(p)
    msg = _problem(data)
    assert ("1 problem in split 'train': images/train/000001.png: image is 64x65 (HxW) but "
            "annotations/instances_train.json says 64x64") in msg


def test_label_size_differs_from_image(data: Path) -> None:
    Image.fromarray(np.zeros((64, 63), np.uint8)).save(data / "semantic/val/000002.png")
    msg = _problem(data)
    assert "semantic/val/000002.png: expected a 64x64 (HxW, the image's size)" in msg


def test_missing_panoptic_png(data: Path) -> None:
    (data / "panoptic/train/000001.png").unlink()
    assert ("panoptic/train/000001.png: file missing (listed in annotations/panoptic_train.json)"
            in _problem(data))


def test_all_problems_counted(data: Path) -> None:
    (data / "images/train/000001.png").unlink()
    _truncate(data / "images/train/000002.png")
    Image.fromarray(np.zeros((64, 63), np.uint8)).save(data / "semantic/train/000002.png")
    msg = _problem(data)
    assert "3 problems in split 'train': " in msg
    for name in ("images/train/000001.png", "images/train/000002.png",
                 "semantic/train/000002.png"):
        assert name in msg


def test_problems_of_several_splits_shortened(data: Path) -> None:
    for split in SPLITS:
        for kind in ("images", "semantic", "depth"):
            _truncate(data / kind / split / "000001.png")
    msg = _problem(data)
    assert msg.count("truncated") + msg.count("corrupt") >= 5
    assert "6 problems (split 'train': 3, split 'val': 3): " in msg and "; ... and 1 more" in msg


def test_unopenable_split_is_a_problem(data: Path) -> None:
    _edit_json(data / "annotations/instances_val.json", lambda o: o.pop("categories"))
    _truncate(data / "images/train/000001.png")
    msg = _problem(data)
    assert "2 problems (split 'train': 1, split 'val': 1)" in msg
    assert "annotations/instances_val.json: not a COCO instances JSON" in msg


def test_unlisted_image_reported_not_failed(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copy(data / "images/train/000001.png", data / "images/train/extra_0001.png")
    shutil.copy(data / "images/train/000001.png", data / "images/train/extra_0002.JPG")
    (data / "images/train/notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.check"):
        s = check_dataset(data, SPLITS)
    assert s["unlisted_images"] == 2
    assert s["splits"]["train"]["unlisted_examples"] == ["extra_0001.png", "extra_0002.JPG"]
    assert s["splits"]["val"]["unlisted_images"] == 0
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 image file(s) not listed" in w and "extra_0001.png" in w for w in warn), warn


def test_dropped_annotations_in_summary(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    def add_degenerate(o: dict[str, Any]) -> None:
        a = dict(o["annotations"][0], id=999, segmentation=[[1, 1, 5, 5]])
        o["annotations"].append(a)

    _edit_json(data / "annotations/instances_train.json", add_degenerate)
    with caplog.at_level(logging.WARNING):
        s = check_dataset(data, SPLITS)
    assert s["dropped_annotations"] == 1
    assert s["splits"]["train"]["dropped_polygons"] == 1
    assert any("annotation id 999" in r.getMessage() for r in caplog.records)
