"""The ``ade20k`` and ``voc`` formats (plugins/formats/labelpng.py) on tiny folders in the official
layouts: label values mapped as published, split lists, EXIF and grayscale JPEGs, errors that name
the file, the value and the range, and a short training run on a VOC folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import formats
from pipeline.data.formats import FormatRegistry
from pipeline.errors import ConfigError, DataError
from plugins.formats import labelpng

HW = (12, 20)  # stored (H, W) of every fixture image: non-square
UPRIGHT = (20, 12)  # the EXIF-rotated JPEG (orientation 6) as shown


def _rgb(hw: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


def _jpeg(path: Path, seed: int, *, rotated: bool = False, gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(_rgb(HW, seed))
    if gray:
        img.convert("L").save(path, "JPEG")
    elif rotated:
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(path, "JPEG", exif=exif.tobytes())
    else:
        img.save(path, "JPEG")


def _png(path: Path, arr: np.ndarray, *, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")  # indices kept (an L -> P conversion maps v to index v) ...
        flat = [v for rgb in labelpng.voc_colormap() for v in rgb]
        img.putpalette(flat)  # ... shown in VOC colours
    img.save(path)


def _labels(hw: tuple[int, int], values: list[int]) -> np.ndarray:
    """An HxW map cycling through ``values``."""
    return np.resize(np.asarray(values, np.uint8), hw[0] * hw[1]).reshape(hw)


def _ade(root: Path) -> Path:
    """training: 001 plain (values 0, 1, 75, 150), 002 EXIF-rotated (label at the upright size),
    003 grayscale without a label PNG; validation: 001 with a label."""
    img, ann = root / "images", root / "annotations"
    _jpeg(img / "training" / "ADE_train_00000001.jpg", 1)
    _png(ann / "training" / "ADE_train_00000001.png", _labels(HW, [0, 1, 75, 150]))
    _jpeg(img / "training" / "ADE_train_00000002.jpg", 2, rotated=True)
    _png(ann / "training" / "ADE_train_00000002.png", _labels(UPRIGHT, [3, 4]))
    _jpeg(img / "training" / "ADE_train_00000003.jpg", 3, gray=True)
    _jpeg(img / "validation" / "ADE_val_00000001.jpg", 4)
    _png(ann / "validation" / "ADE_val_00000001.png", _labels(HW, [0, 2]))
    return root


def _voc(root: Path, n: int = 4) -> Path:
    """``n`` JPEGs with palette label PNGs (values 0, 1, 15, 20, 255); train = the first n - 1
    stems, val = the last, trainval = all; the list files are written unsorted."""
    stems = [f"2007_{i:06d}" for i in range(n)]
    for i, s in enumerate(stems):
        _jpeg(root / "JPEGImages" / f"{s}.jpg", i)
        _png(root / "SegmentationClass" / f"{s}.png", _labels(HW, [0, 1, 15, 20, 255][i % 2:]),
             palette=True)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(reversed(stems[:-1])) + "\n")
    (lists / "val.txt").write_text(stems[-1] + "\n")
    (lists / "trainval.txt").write_text("\n".join(stems) + "\n")
    return root


def _open(name: str, root: Path, split: str, **kw: object):  # noqa: ANN202 - a SplitDataset
    fmt = FormatRegistry(entry_points=False, plugins=[labelpng]).get(name)
    options = fmt.parse_options(kw.pop("options", None))  # type: ignore[arg-type]
    return fmt.open(root, split, options=options, **kw)  # type: ignore[arg-type]


def test_registry_cards_and_options() -> None:
    reg = FormatRegistry(entry_points=False, plugins=[labelpng])
    assert reg.names == ["ade20k", "voc"] and not reg.failed
    ade = labelpng.ade20k_card()
    assert ade.num_classes == 150 and ade.class_names[:5] == ["wall", "building", "sky", "floor",
                                                               "tree"]
    assert ade.class_names[-1] == "flag" and not ade.thing_indices
    voc = labelpng.voc_card()
    assert voc.class_names[0] == "background" and voc.class_names[-1] == "tvmonitor"
    assert voc.palette()[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
    assert labelpng.voc_colormap()[255] == (224, 224, 192)
    assert reg.get("voc").parse_options({"label_dir": "SegmentationClassAug"}).label_dir \
        == "SegmentationClassAug"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="data.options.bogus.*options of data.source ade20k: none"):
        reg.get("ade20k").parse_options({"bogus": 1})


def test_ade20k_values_exif_grayscale_and_missing_labels(tmp_path: Path) -> None:
    root = _ade(tmp_path / "ADEChallengeData2016")
    ds = _open("ade20k", root, "train")
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3] and ds.label_kinds == ("semantic",)
    s = ds[0]
    assert s["file_name"] == "ADE_train_00000001.jpg" and s["image"].dtype == torch.uint8
    assert tuple(s["image"].shape) == (3, *HW) and s["meta"]["orig_size"] == HW
    expect = _labels(HW, [255, 0, 74, 149]).astype(np.int64)  # 0 -> 255, v -> v - 1
    assert np.array_equal(s["semantic"].numpy(), expect)
    rotated = ds[1]
    assert tuple(rotated["image"].shape) == (3, *UPRIGHT) and ds.image_hw(1) == UPRIGHT
    assert set(rotated["semantic"].unique().tolist()) == {2, 3}
    gray = ds[2]
    assert tuple(gray["image"].shape) == (3, *HW) and "semantic" not in gray
    assert ds.image_hw(0) == HW
    # literal folder names and the parent folder work too
    assert _open("ade20k", tmp_path, "validation")[0]["semantic"].unique().tolist() == [1, 255]
    info = labelpng.Ade20kFormat().check(root, ["train", "val"], options=labelpng.Ade20kOptions())
    assert info["images"] == {"train": 3, "val": 1}
    assert labelpng.Ade20kFormat().ready(tmp_path, options=labelpng.Ade20kOptions())


def test_label_kinds_not_asked_for_are_not_read(tmp_path: Path) -> None:
    root = _ade(tmp_path / "ade")
    (root / "annotations" / "training" / "ADE_train_00000001.png").write_bytes(b"not a png")
    ds = _open("ade20k", root, "train", label_kinds=())
    assert ds.label_kinds == ("semantic",) and ds.loaded_kinds == ()
    assert "semantic" not in ds[0]  # the corrupt PNG is never opened
    with pytest.raises(DataError, match="ADE_train_00000001.png: corrupt or unreadable"):
        _open("ade20k", root, "train")[0]
    (root / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    assert _open("ade20k", root, "val").label_kinds == ()


def test_ade20k_errors_name_file_value_and_range(tmp_path: Path) -> None:
    root = _ade(tmp_path / "ade")
    bad = root / "annotations" / "training" / "ADE_train_00000001.png"
    _png(bad, _labels(HW, [0, 151, 3]))
    with pytest.raises(DataError) as err:
        _open("ade20k", root, "train")[0]
    assert str(err.value) == (f"{bad}: ADE20K label value 151 (80 pixels) out of range: expected "
                              "0..150 (0 = other objects, ignored; 1..150 the 150 classes of "
                              "dataset card 'ade20k') or 255 (ignore)")
    _png(bad, _labels((12, 21), [1]))
    with pytest.raises(DataError, match=r"ADE_train_00000001.png: expected a 12x20 \(HxW, the "
                                        r"image's size\) .* got 12x21"):
        _open("ade20k", root, "train")[0]
    with pytest.raises(DataError, match=r"images/test: no image folder for split 'test'"):
        _open("ade20k", root, "test")


def test_voc_palette_indices_split_lists_and_aug_labels(tmp_path: Path) -> None:
    root = _voc(tmp_path / "VOC2012")
    png = root / "SegmentationClass" / "2007_000000.png"
    with Image.open(png) as im:
        assert im.mode == "P" and im.convert("RGB").getpixel((1, 0)) == (128, 0, 0)
    train = _open("voc", root, "train")
    assert [train[i]["file_name"] for i in range(len(train))] == [
        "2007_000000.jpg", "2007_000001.jpg", "2007_000002.jpg"]  # sorted, list order ignored
    assert train.image_ids == [1, 2, 3]
    assert np.array_equal(train[0]["semantic"].numpy(),
                          _labels(HW, [0, 1, 15, 20, 255]).astype(np.int64))  # indices, not RGB
    assert train[1]["semantic"].unique().tolist() == [1, 15, 20, 255]
    assert [s["file_name"] for s in _open("voc", tmp_path, "val")] == ["2007_000003.jpg"]
    assert len(_open("voc", root, "trainval")) == 4
    with pytest.raises(DataError, match="Segmentation/test.txt: no split list for split 'test'.*"
                                        "present: train, trainval, val"):
        _open("voc", root, "test")
    # SBD-augmented grayscale labels via options.label_dir; an image without a label has none
    aug = root / "SegmentationClassAug"
    _png(aug / "2007_000000.png", _labels(HW, [7, 255]))
    ds = _open("voc", root, "train", options={"label_dir": "SegmentationClassAug"})
    assert ds[0]["semantic"].unique().tolist() == [7, 255] and "semantic" not in ds[1]
    with pytest.raises(DataError, match="Nope: label folder of data.options.label_dir not found"):
        _open("voc", root, "train", options={"label_dir": "Nope"})


def test_voc_errors_name_file_value_and_range(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc")
    bad = root / "SegmentationClass" / "2007_000001.png"
    _png(bad, _labels(HW, [0, 21, 254]), palette=True)
    with pytest.raises(DataError) as err:
        _open("voc", root, "train")[1]
    assert str(err.value) == (f"{bad}: semantic values 21, 254 (160 pixels) out of range: "
                              "expected 0..20 (the 21 classes of dataset card 'voc') or 255 "
                              "(ignore)")
    _png(bad, _labels((11, 20), [1]), palette=True)
    with pytest.raises(DataError, match=r"2007_000001.png: expected a 12x20 .* got 11x20"):
        _open("voc", root, "train")[1]
    (root / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(DataError, match=r"JPEGImages: 1 image\(s\) listed in train.txt not found: "
                                        "2007_000002"):
        _open("voc", root, "train")


@pytest.mark.slow
def test_voc_folder_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import stages
    from pipeline.config import config_from_dict

    monkeypatch.setattr(formats, "_default", FormatRegistry(plugins=[labelpng]))
    root = _voc(tmp_path / "voc", n=3)
    out = tmp_path / "out"
    cfg = config_from_dict({
        "data": {"source": "voc", "root": str(root), "image_size": 32, "num_workers": 0},
        "model": {"tasks": ["semantic"], "fpn_channels": 16, "heads": {"semantic": {"conv_dims": 16}}},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 0,
                  "checkpoint_every": 2, "device": "cpu", "progress": False,
                  "out_dir": str(out / "train")},
        "tracking": {"enabled": False},
    })
    assert stages.dataset_ready(cfg)
    summary = stages.train(cfg)
    assert summary["step"] == 2
