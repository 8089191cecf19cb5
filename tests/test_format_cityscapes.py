"""The ``cityscapes`` format on a tiny folder in the official layout (written here with numpy +
PIL): train-id mapping, instances and panoptic from ``instanceIds``, depth from disparity, label
kinds, decoding only the kinds asked for, one-line errors, and a short training run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.formats import FormatRegistry
from pipeline.errors import ConfigError, DataError
from plugins.formats import cityscapes
from plugins.formats.cityscapes import CityscapesDataset, CityscapesFormat, CityscapesOptions

HW = (16, 32)
TRAIN = {"aachen": ["aachen_000001_000019", "aachen_000000_000019"],
         "bochum": ["bochum_000000_000313"]}
BASELINE, FX = 0.2, 2000.0


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _label_maps() -> tuple[np.ndarray, np.ndarray]:
    """(labelIds uint8, instanceIds uint16) of one image: road below sky, two cars, a car group,
    a person, and void/ignored/unknown corners."""
    lab = np.full(HW, 7, np.uint8)  # road
    lab[0:4] = 23  # sky
    lab[8:12, 4:16] = 26  # car (2 instances)
    lab[8:12, 20:24] = 26  # car group (no instance id)
    lab[12:16, 0:4] = 24  # person
    lab[0:2, 28:32] = 0  # unlabeled
    lab[2:4, 28:32] = 9  # parking: ignored in evaluation
    lab[14:16, 28:32] = 250  # a value outside the label table
    inst = lab.astype(np.uint16)
    inst[8:12, 4:10] = 26001
    inst[8:12, 10:16] = 26002
    inst[12:16, 0:4] = 24000
    return lab, inst


def _write_split(root: Path, split: str, cities: dict[str, list[str]], *, gt: bool = True,
                 depth: bool = False) -> None:
    lab, inst = _label_maps()
    for city, stems in cities.items():
        for k, stem in enumerate(stems):
            rgb = np.random.default_rng(k).integers(0, 256, (*HW, 3), dtype=np.uint8)
            _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
            if gt:
                _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)
                _png(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", inst)
            if depth:
                disp = np.zeros(HW, np.uint16)
                disp[:, :16] = 8 * 256 + 1  # disparity 8 px
                disp[:, 16:24] = 1  # disparity 0: invalid
                _png(root / "disparity" / split / city / f"{stem}_disparity.png", disp)
                cam = {"extrinsic": {"baseline": BASELINE, "pitch": 0.0},
                       "intrinsic": {"fx": FX, "fy": FX, "u0": 16.0, "v0": 8.0}}
                path = root / "camera" / split / city / f"{stem}_camera.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(cam))


@pytest.fixture
def city_root(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    _write_split(root, "train", TRAIN, depth=True)
    _write_split(root, "val", {"frankfurt": ["frankfurt_000000_000294"]})
    _write_split(root, "test", {"berlin": ["berlin_000000_000019"]})  # placeholder gtFine
    return root


def _open(root: Path, split: str = "train", **kw: Any) -> CityscapesDataset:
    depth = kw.pop("depth", False)
    ds = CityscapesFormat().open(root, split, options=CityscapesOptions(depth=depth), **kw)
    assert isinstance(ds, CityscapesDataset)
    return ds


def test_registered_with_options_and_card() -> None:
    fmt = FormatRegistry(entry_points=False, plugins=[cityscapes]).get("cityscapes")
    assert isinstance(fmt, CityscapesFormat)
    assert fmt.parse_options({"depth": True}) == CityscapesOptions(depth=True)
    with pytest.raises(ConfigError, match="data.options.label_set: .*options of data.source "
                                          "cityscapes: depth"):
        fmt.parse_options({"label_set": "coarse"})
    card = cityscapes.cityscapes_card()
    assert card.num_classes == 19 and [c.id for c in card.classes] == list(range(19))
    assert card.class_names[0] == "road" and card.class_names[13] == "car"
    assert card.classes[13].color == (0, 0, 142)
    assert [card.class_names[i] for i in card.thing_indices] == [
        "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


def test_samples_order_ids_and_semantic_train_ids(city_root: Path) -> None:
    ds = _open(city_root)
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3]
    assert ds.label_kinds == ds.loaded_kinds == ("semantic", "instances", "panoptic")
    s = ds[0]
    assert s["file_name"] == "aachen/aachen_000000_000019_leftImg8bit.png"  # sorted stem order
    assert ds[2]["file_name"] == "bochum/bochum_000000_000313_leftImg8bit.png"
    assert s["image_id"] == 1 and s["meta"] == {"orig_size": HW} and ds.image_hw(0) == HW
    assert s["image"].dtype == torch.uint8 and tuple(s["image"].shape) == (3, *HW)
    sem = s["semantic"]
    assert sem.dtype == torch.int64 and tuple(sem.shape) == HW
    assert sem[6, 0] == 0  # road 7 -> 0
    assert sem[0, 0] == 10  # sky 23 -> 10
    assert sem[9, 5] == 13 and sem[9, 21] == 13  # car 26 -> 13, instance or group alike
    assert sem[13, 1] == 11  # person 24 -> 11
    assert sem[0, 30] == 255 and sem[3, 30] == 255 and sem[15, 30] == 255  # 0, 9, 250 -> ignore
    assert set(sem.unique().tolist()) == {0, 10, 11, 13, 255}


def test_instances_from_instance_ids(city_root: Path) -> None:
    inst = _open(city_root, label_kinds=("instances",))[0]["instances"]
    assert inst["ids"].tolist() == [26, 24000, 26001, 26002]
    assert inst["labels"].tolist() == [13, 11, 13, 13]
    assert inst["iscrowd"].tolist() == [True, False, False, False]  # the car group is a crowd
    assert inst["masks"].dtype == torch.bool and tuple(inst["masks"].shape) == (4, *HW)
    assert inst["masks"].sum((1, 2)).tolist() == [16, 16, 24, 24]
    assert inst["boxes"].tolist() == [[20, 8, 24, 12], [0, 12, 4, 16], [4, 8, 10, 12],
                                      [10, 8, 16, 12]]
    assert inst["boxes"].dtype == torch.float32


def test_panoptic_like_create_panoptic_imgs(city_root: Path) -> None:
    s = _open(city_root, label_kinds=("panoptic",))[0]
    assert set(s) >= {"panoptic"} and "instances" not in s and "semantic" not in s
    pan = s["panoptic"]
    segs = {seg["id"]: seg for seg in pan["segments"]}
    assert set(segs) == {7, 23, 26, 24000, 26001, 26002}  # one per stuff class, one per thing
    assert segs[7] == {"id": 7, "category_id": 0, "isthing": False, "iscrowd": False}
    assert segs[23] == {"id": 23, "category_id": 10, "isthing": False, "iscrowd": False}
    assert segs[26] == {"id": 26, "category_id": 13, "isthing": True, "iscrowd": True}
    assert segs[26001] == {"id": 26001, "category_id": 13, "isthing": True, "iscrowd": False}
    assert segs[24000]["category_id"] == 11
    ids = pan["ids"]
    assert ids.dtype == torch.int64 and tuple(ids.shape) == HW
    assert ids[0, 30] == ids[3, 30] == ids[15, 30] == 0  # unlabeled, parking, unknown: void
    assert ids[9, 5] == 26001 and ids[9, 12] == 26002 and ids[6, 0] == 7
    assert set(ids.unique().tolist()) == set(segs) | {0}


def test_depth_from_disparity_and_camera(city_root: Path) -> None:
    assert "depth" not in _open(city_root).label_kinds  # off by default
    ds = _open(city_root, depth=True)
    assert ds.label_kinds == ("semantic", "instances", "panoptic", "depth")
    depth = ds[0]["depth"]
    assert depth.dtype == torch.float32 and tuple(depth.shape) == HW
    assert depth[0, 0].item() == pytest.approx(BASELINE * FX / 8.0)  # p=2049: (p-1)/256 = 8 px
    assert (depth[:, 16:] == 0).all()  # p=1 (disparity 0) and p=0: unknown
    assert "depth" not in _open(city_root, "val", depth=True).label_kinds  # no disparity there


def test_label_kinds_without_gt_and_of_the_test_split(city_root: Path, tmp_path: Path) -> None:
    assert _open(city_root, "test").label_kinds == ()
    assert set(_open(city_root, "test")[0]) == {"image", "image_id", "file_name", "meta"}
    bare = tmp_path / "bare"
    _write_split(bare, "train", TRAIN, gt=False)
    ds = _open(bare)
    assert ds.label_kinds == () and len(ds) == 3
    fmt = CityscapesFormat()
    opts = CityscapesOptions()
    assert fmt.split_label_kinds(city_root, "val", options=opts) == (
        "semantic", "instances", "panoptic")
    assert fmt.split_label_kinds(bare, "val", options=opts) is None  # no such split
    assert fmt.ready(city_root, options=opts) and not fmt.ready(tmp_path, options=opts)
    report = fmt.check(city_root, ["train", "val"], options=opts, workers=1)
    assert report["images"] == {"train": 3, "val": 1}


def test_decodes_only_the_kinds_asked_for(city_root: Path) -> None:
    ds = _open(city_root, label_kinds=("semantic",))
    inst_png = city_root / "gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png"
    inst_png.write_bytes(b"not a png")
    assert ds.loaded_kinds == ("semantic",) and ds.label_kinds[1:] == ("instances", "panoptic")
    s = ds[0]  # the broken instanceIds file is never opened
    assert "semantic" in s and "instances" not in s and "panoptic" not in s
    with pytest.raises(DataError) as err:
        _open(city_root)[0]
    assert err.value.path == str(inst_png) and "\n" not in str(err.value)


def test_missing_folder_and_file_errors_name_the_path(city_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        _open(tmp_path / "nowhere")
    assert str(err.value) == (
        f"{tmp_path / 'nowhere' / 'leftImg8bit' / 'train'}: folder not found: expected the "
        "Cityscapes layout leftImg8bit/train/<city>/<city>_<seq>_<frame>_leftImg8bit.png "
        "(gtFine/train/<city>/ labels)")
    missing = city_root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"
    missing.unlink()
    with pytest.raises(DataError) as err:
        _open(city_root)
    assert err.value.path == str(missing) and "\n" not in str(err.value)
    assert "labelIds file not found" in str(err.value)
    _png(missing, _label_maps()[0])
    camera = city_root / "camera/train/aachen/aachen_000001_000019_camera.json"
    camera.unlink()
    with pytest.raises(DataError, match="camera file not found"):
        _open(city_root, label_kinds=("depth",), depth=True)


@pytest.mark.slow
def test_short_semantic_training(city_root: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import stages
    from pipeline.config import config_from_dict
    from pipeline.data import formats

    registry = FormatRegistry()
    if "cityscapes" not in registry.formats:  # entry point not installed yet
        registry = FormatRegistry(plugins=[cityscapes])
    monkeypatch.setattr(formats, "_default", registry)
    out = tmp_path / "out"
    cfg = config_from_dict({
        "data": {"source": "cityscapes", "root": str(city_root), "image_size": 32,
                 "num_workers": 0},
        "model": {"tasks": ["semantic"], "fpn_channels": 32, "heads": {"semantic": {"conv_dims": 32}}},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 0,
                  "checkpoint_every": 2, "device": "cpu", "progress": False,
                  "out_dir": str(out / "train")},
        "evaluate": {"out_dir": str(out / "eval"), "metrics_file": str(out / "metrics.json")},
        "tracking": {"enabled": False, "log_model": False},
    })
    summary = stages.train(cfg)
    assert summary["step"] == 2 and summary["steps_run"] == 2
