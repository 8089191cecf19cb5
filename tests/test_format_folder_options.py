"""``data.options`` of the ``folder`` format: ``depth_encoding`` (mm / kitti / float) and
``semantic_values`` (index / category_id), read alike by the reader, ``split_label_kinds`` and
prepare's check (``FolderFormat.check`` -> ``check_dataset``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.check import check_dataset
from pipeline.data.reader import open_dataset, split_label_kinds
from pipeline.errors import ConfigError, DataError
from plugins.formats.builtin import FolderFormat
from tests.test_real_folder import _png, _rgb

HW = (4, 6)
IDS = (0, 5, 9)


def _layout(root: Path, *, ids: tuple[int, ...] = IDS, n: int = 1) -> Path:
    """densepipe layout: meta.json (class ids ``ids``) and ``n`` train PNG images of ``HW``."""
    root.mkdir(parents=True, exist_ok=True)
    card = {"name": "ids", "classes": [{"id": i, "name": f"c{i}"} for i in ids]}
    (root / "meta.json").write_text(json.dumps(card))
    for i in range(n):
        _png(root / "images" / "train" / f"{i:03d}.png", _rgb(HW, i))
    return root


def _depth_png(root: Path, arr: np.ndarray, name: str = "000.png") -> Path:
    path = root / "depth" / "train" / name
    _png(path, arr)
    return path


def _float_tiff(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.float32), mode="F").save(path)
    return path


def _fmt_open(root: Path, **options: str):  # type: ignore[no-untyped-def]
    fmt = FolderFormat()
    return fmt.open(root, "train", options=fmt.parse_options(options))


def _fmt_check(root: Path, **options: str) -> dict:  # type: ignore[type-arg]
    fmt = FolderFormat()
    return fmt.check(root, ("train",), options=fmt.parse_options(options), workers=1)


# -- depth ----------------------------------------------------------------------------------------
def test_kitti_depth_png_is_metres_times_256(tmp_path: Path) -> None:
    root = _layout(tmp_path / "d")
    raw = np.zeros(HW, np.uint16)
    raw[0, 0] = 20480  # KITTI's 80 m cap; 0 = unknown
    raw[1, 1] = 256
    _depth_png(root, raw)
    depth = _fmt_open(root, depth_encoding="kitti")[0]["depth"]
    assert depth.dtype.is_floating_point and tuple(depth.shape) == HW
    assert depth[0, 0].item() == 80.0 and depth[1, 1].item() == 1.0 and depth[2, 2].item() == 0.0
    # the default (mm) reads the same file as millimetres: unchanged behaviour
    assert open_dataset(root, "train")[0]["depth"][0, 0].item() == pytest.approx(20.48)
    assert _fmt_check(root, depth_encoding="kitti")["images"] == {"train": 1}


def test_float_tiff_depth_in_metres_non_finite_and_nonpositive_unknown(tmp_path: Path) -> None:
    root = _layout(tmp_path / "d")
    arr = np.full(HW, 2.0, np.float32)
    arr[0, 0] = 123.5  # past uint16 millimetres' 65.535 m
    arr[0, 1], arr[0, 2], arr[0, 3] = np.nan, np.inf, -1.0
    _float_tiff(root / "depth" / "train" / "000.tiff", arr)
    ds = _fmt_open(root, depth_encoding="float")
    assert ds.label_kinds == ("depth",)
    depth = ds[0]["depth"]
    assert depth[0, 0].item() == 123.5
    assert depth[0, 1:4].tolist() == [0.0, 0.0, 0.0] and depth[1, 1].item() == 2.0
    assert split_label_kinds(root, "train", depth_encoding="float") == ("depth",)
    assert split_label_kinds(root, "train") == ()  # mm reads PNGs only
    assert FolderFormat().split_label_kinds(
        root, "train", options=FolderFormat().parse_options({"depth_encoding": "float"})) == ("depth",)
    assert _fmt_check(root, depth_encoding="float")["splits"]["train"]["label_kinds"] == ["depth"]


def test_npy_depth(tmp_path: Path) -> None:
    root = _layout(tmp_path / "d")
    arr = np.linspace(0.5, 100.0, HW[0] * HW[1]).reshape(HW)  # float64 on disk
    (root / "depth" / "train").mkdir(parents=True)
    np.save(root / "depth" / "train" / "000.npy", arr)
    depth = _fmt_open(root, depth_encoding="float")[0]["depth"]
    assert str(depth.dtype) == "torch.float32"
    assert np.allclose(depth.numpy(), arr.astype(np.float32))


def test_depth_file_of_the_wrong_mode_is_one_data_error(tmp_path: Path) -> None:
    root = _layout(tmp_path / "d")
    bad = _depth_png(root, np.full(HW, 7, np.uint8))  # 8-bit PNG (mode L)
    with pytest.raises(DataError) as err:
        _fmt_open(root, depth_encoding="kitti")[0]
    msg = str(err.value)
    assert str(bad) in msg and "PNG mode L" in msg and "depth_encoding kitti" in msg
    assert "uint16" in msg and "\n" not in msg
    with pytest.raises(DataError) as err:  # prepare's check finds it with the same options
        _fmt_check(root, depth_encoding="kitti")
    assert "1 problem in split 'train': depth/train/000.png:" in str(err.value)
    assert "depth_encoding kitti" in str(err.value)

    bad.unlink()  # a uint16 PNG where float TIFF/.npy is expected: named, not silently skipped
    _depth_png(root, np.full(HW, 1000, np.uint16))
    with pytest.raises(DataError) as err:
        _fmt_open(root, depth_encoding="float")[0]
    msg = str(err.value)
    assert "000.png" in msg and "mode I;16" in msg and "depth_encoding float" in msg
    assert "32-bit float TIFF (PIL mode F)" in msg

    _float_tiff(root / "depth" / "train" / "000.tif", np.ones((3, 3)))  # the TIFF wins, wrong size
    with pytest.raises(DataError, match=r"000\.tif: expected depth of 4x6 \(HxW"):
        _fmt_open(root, depth_encoding="float")[0]


# -- semantic -------------------------------------------------------------------------------------
def _semantic(root: Path, values: list[int]) -> Path:
    sem = np.zeros(HW, np.uint8)
    sem[0, : len(values)] = values
    path = root / "semantic" / "train" / "000.png"
    _png(path, sem)
    return path


def test_semantic_category_id_maps_card_ids_to_indices(tmp_path: Path) -> None:
    root = _layout(tmp_path / "s")
    _semantic(root, [5, 255, 9, 0])
    sem = _fmt_open(root, semantic_values="category_id")[0]["semantic"]
    assert sem[0, :4].tolist() == [1, 255, 2, 0] and str(sem.dtype) == "torch.int64"
    _fmt_check(root, semantic_values="category_id")
    # the default reads values as indices: 5 and 9 are past the 3 classes, and named as class ids
    with pytest.raises(DataError) as err:
        open_dataset(root, "train")[0]
    assert "semantic values 5, 9 (2 pixels) out of range: expected 0..2" in str(err.value)
    assert "data.options.semantic_values: category_id" in str(err.value)


def test_semantic_value_that_is_no_class_id_is_one_data_error(tmp_path: Path) -> None:
    root = _layout(tmp_path / "s")
    path = _semantic(root, [5, 3])
    with pytest.raises(DataError) as err:
        _fmt_open(root, semantic_values="category_id")[0]
    assert str(err.value) == (f"{path}: semantic value 3 (1 pixels) not a class id: "
                              "data.options.semantic_values category_id expects the ids of "
                              "dataset card 'ids' (0, 5, 9) or 255 (ignore)")
    with pytest.raises(DataError) as err:
        _fmt_check(root, semantic_values="category_id")
    assert ("1 problem in split 'train': semantic/train/000.png: semantic value 3 (1 pixels) not "
            "a class id") in str(err.value)


def test_defaults_unchanged(tmp_path: Path) -> None:
    root = _layout(tmp_path / "d", ids=(0, 1, 2))
    _semantic(root, [1, 2, 255])
    mm = np.zeros(HW, np.uint16)
    mm[0, 0] = 1500
    _depth_png(root, mm)
    for ds in (open_dataset(root, "train"), _fmt_open(root)):
        sample = ds[0]
        assert sample["semantic"][0, :3].tolist() == [1, 2, 255]
        assert sample["depth"][0, 0].item() == pytest.approx(1.5)
    assert check_dataset(root, ("train",), workers=1)["splits"]["train"]["label_kinds"] == [
        "semantic", "depth"]
    opts = FolderFormat().parse_options(None)
    assert (opts.depth_encoding, opts.semantic_values) == ("mm", "index")  # type: ignore[attr-defined]


def test_bad_option_is_one_config_error_line() -> None:
    with pytest.raises(ConfigError) as err:
        FolderFormat().parse_options({"depth_encoding": "nope"})
    msg = str(err.value)
    assert msg.startswith("data.options.depth_encoding: ") and "\n" not in msg
    assert "'mm', 'kitti' or 'float'" in msg
    with pytest.raises(ConfigError, match=r"^data\.options\.semantic_values: "):
        FolderFormat().parse_options({"semantic_values": "ids"})
