"""The ``nyuv2`` format: MTAN/LibMTL's preprocessed NYUv2 (``{split}/{image,label,depth,normal}/
{index}.npy``) read into the sample contract, on tiny arrays written here (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import formats
from pipeline.errors import DataError
from plugins.formats import nyuv2
from plugins.formats.nyuv2 import NYUv2Format, NYUv2Options

H, W = 12, 16  # non-square, like 288x384
OPTS = NYUv2Options()


def _arrays(seed: int) -> dict[str, np.ndarray]:
    """One sample as MTAN stores it: image HxWx3 float 0..1, label HxW float (-1 = ignore), depth
    HxWx1 float metres (0 = invalid), normal HxWx3 unit vectors (0 = invalid)."""
    rng = np.random.default_rng(seed)
    image = rng.random((H, W, 3)).astype(np.float32)
    label = rng.integers(-1, 13, (H, W)).astype(np.float32)
    depth = rng.uniform(0.5, 9.0, (H, W, 1)).astype(np.float32)
    depth[0, :3] = 0.0
    normal = rng.normal(size=(H, W, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=2, keepdims=True)
    normal[1, :2] = 0.0
    return {"image": image, "label": label, "depth": depth, "normal": normal}


def _write(root: Path, splits: dict[str, int] | None = None,
           kinds: tuple[str, ...] = ("image", "label", "depth", "normal")) -> dict[str, list]:
    """3 train and 2 val samples (stems 0.. as MTAN names them); returns the arrays written."""
    written: dict[str, list] = {}
    for k, (split, n) in enumerate((splits or {"train": 3, "val": 2}).items()):
        written[split] = []
        for i in range(n):
            arrs = _arrays(10 * k + i)
            for kind in kinds:
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                np.save(root / split / kind / f"{i}.npy", arrs[kind])
            written[split].append(arrs)
    return written


def test_sample_contract_from_mtan_arrays(tmp_path: Path) -> None:
    written = _write(tmp_path)
    ds = NYUv2Format().open(tmp_path, "train", options=OPTS)
    assert len(ds) == 3 and ds.image_ids == [0, 1, 2]
    assert ds.label_kinds == ds.loaded_kinds == ("semantic", "depth", "normals")
    assert ds.card.num_classes == 13 and ds.card.class_names[0] == "bed"
    assert ds.card.class_names[-2:] == ["wall", "window"]
    assert ds.image_hw(1) == (H, W)
    src = written["train"][1]
    s = ds[1]
    assert s["image"].dtype == torch.uint8 and tuple(s["image"].shape) == (3, H, W)
    expect = np.clip(np.rint(src["image"] * 255), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    assert np.array_equal(s["image"].numpy(), expect)
    assert s["image_id"] == 1 and s["file_name"] == "1.npy" and s["meta"] == {"orig_size": (H, W)}
    sem = s["semantic"]
    assert sem.dtype == torch.int64 and tuple(sem.shape) == (H, W)
    lab = src["label"]
    assert (sem.numpy()[lab == -1] == 255).all()
    assert np.array_equal(sem.numpy()[lab >= 0], lab[lab >= 0].astype(np.int64))
    d = s["depth"]
    assert d.dtype == torch.float32 and tuple(d.shape) == (H, W)
    assert np.allclose(d.numpy(), src["depth"][..., 0]) and (d[0, :3] == 0).all()
    n = s["normals"]
    assert n.dtype == torch.float32 and tuple(n.shape) == (3, H, W)
    assert (n[:, 1, :2] == 0).all()  # invalid stays 0
    assert torch.allclose(n.norm(dim=0)[2:], torch.ones(H - 2, W), atol=1e-5)
    assert np.allclose(n.numpy(), src["normal"].transpose(2, 0, 1), atol=1e-6)  # kept as stored


def test_normal_signs_and_label_ignore_values(tmp_path: Path) -> None:
    _write(tmp_path, {"train": 1})
    normal = np.zeros((H, W, 3), np.float32)
    normal[..., 2] = 2.0          # facing the camera, not unit length: renormalised
    normal[0, 0] = (0.6, 0.8, 0)  # a known vector
    normal[0, 1] = np.nan         # unusable -> unknown
    np.save(tmp_path / "train/normal/0.npy", normal)
    label = np.full((H, W), 255, np.int32)
    label[0, :2] = (0, 12)
    np.save(tmp_path / "train/label/0.npy", label)
    opengl = NYUv2Options(normal_signs=(1, -1, -1))
    n = NYUv2Format().open(tmp_path, "train", options=opengl)[0]["normals"]
    assert n[:, 0, 0].tolist() == pytest.approx([0.6, -0.8, 0.0])
    assert n[:, 0, 1].tolist() == [0.0, 0.0, 0.0]
    assert n[:, 5, 5].tolist() == pytest.approx([0.0, 0.0, -1.0])
    sem = NYUv2Format().open(tmp_path, "train", options=OPTS)[0]["semantic"]
    assert sem[0, :2].tolist() == [0, 12] and (sem[1:] == 255).all()


def test_label_kinds_missing_folder_and_decode_only_asked(tmp_path: Path) -> None:
    _write(tmp_path, {"test": 2}, kinds=("image", "label", "depth"))  # no normal/, val named test
    fmt = NYUv2Format()
    assert fmt.split_label_kinds(tmp_path, "val", options=OPTS) == ("semantic", "depth")
    ds = fmt.open(tmp_path, "val", label_kinds=("depth", "normals"), options=OPTS)
    assert ds.label_kinds == ("semantic", "depth") and ds.loaded_kinds == ("depth",)
    np.save(tmp_path / "test/label/0.npy", np.full((H, W), 99.0))  # broken but not asked for
    np.save(tmp_path / "test/label/1.npy", np.full((H, W), -1.0))
    s = ds[0]
    assert set(s) == {"image", "image_id", "file_name", "meta", "depth"}
    with pytest.raises(DataError):
        fmt.open(tmp_path, "val", options=OPTS)[0]
    (tmp_path / "test/depth/1.npy").unlink()
    ds = fmt.open(tmp_path, "val", label_kinds=("depth",), options=OPTS)
    assert ds.label_kinds == ("semantic", "depth")
    assert "depth" not in ds[1] and "depth" in ds[0]  # a missing file is a missing key
    assert fmt.split_label_kinds(tmp_path, "val", options=NYUv2Options(
        split_dirs={"val": "nowhere"})) is None


def test_one_line_errors_name_file_shape_and_values(tmp_path: Path) -> None:
    _write(tmp_path, {"train": 3})
    fmt = NYUv2Format()
    with pytest.raises(DataError) as err:
        fmt.open(tmp_path, "val", options=OPTS)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "val" / "image"))
    assert "{root}/{train,val}/{image,label,depth,normal}/{index}.npy" in msg

    ds = fmt.open(tmp_path, "train", options=OPTS)
    np.save(tmp_path / "train/image/0.npy", np.zeros((3, H, W), np.float32))  # channels first
    with pytest.raises(DataError) as err:
        ds.image_hw(0)
    assert str(err.value) == (f"{tmp_path / 'train/image/0.npy'}: image array is 3x12x16 "
                              "(float32); expected HxWx3 (RGB, float 0..1 or uint8)")
    np.save(tmp_path / "train/image/0.npy", np.full((H, W, 3), 200.0, np.float32))
    with pytest.raises(DataError, match=r"0\.npy: image values span 200\.\.200; expected floats"):
        ds[0]
    np.save(tmp_path / "train/depth/1.npy", np.zeros((H, W - 1), np.float32))
    with pytest.raises(DataError) as err:
        ds[1]
    assert str(err.value) == (f"{tmp_path / 'train/depth/1.npy'}: depth array is 12x15; expected "
                              "12x16 or 12x16x1 (the size of its image)")
    label = np.zeros((H, W), np.int64)
    label[0, :3] = (13, 20, 13)
    np.save(tmp_path / "train/label/2.npy", label)
    with pytest.raises(DataError) as err:
        ds[2]
    assert str(err.value) == (f"{tmp_path / 'train/label/2.npy'}: label values 13, 20 (3 pixels) "
                              "outside the 13 classes 0..12 (-1 or 255 = ignore; "
                              "data.options.classes picks 13 or 40)")
    ds40 = fmt.open(tmp_path, "train", options=NYUv2Options(classes=40))
    assert ds40.card.num_classes == 40 and ds40.card.class_names[-1] == "otherprop"
    assert ds40[2]["semantic"][0, :3].tolist() == [13, 20, 13]
    with pytest.raises(DataError) as err:  # prepare's check collects them all
        formats.check_samples(fmt, tmp_path, ("train",), options=OPTS, workers=1)
    assert "3 problems" in str(err.value) and "\n" not in str(err.value)


def test_registered_and_options_checked() -> None:
    reg = formats.FormatRegistry(entry_points=False, plugins=[nyuv2])
    fmt = reg.get("nyuv2")
    assert fmt.parse_options({"classes": 40}).classes == 40  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="data.options.classes"):
        fmt.parse_options({"classes": 20})
    with pytest.raises(Exception, match="data.options.colour"):
        fmt.parse_options({"colour": 1})


@pytest.mark.slow
def test_trains_semantic_depth_normals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import stages
    from pipeline.config import config_from_dict

    _write(tmp_path / "nyu")
    monkeypatch.setattr(formats, "_default", formats.FormatRegistry(plugins=[nyuv2]))
    out = tmp_path / "out"
    cfg = config_from_dict({
        "data": {"source": "nyuv2", "root": str(tmp_path / "nyu"), "image_size": 32,
                 "num_workers": 0},
        "model": {"backbone": "resnet18", "fpn_channels": 16,
                  "tasks": ["semantic", "depth", "normals"],
                  "heads": {"semantic": {"conv_dims": 16}, "depth": {"conv_dims": 16},
                            "normals": {"conv_dims": 16}}},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 0,
                  "checkpoint_every": 2, "device": "cpu", "progress": False,
                  "out_dir": str(out / "train")},
        "evaluate": {"out_dir": str(out / "eval"), "metrics_file": str(out / "metrics.json")},
        "tracking": {"enabled": False},
    })
    summary = stages.train(cfg)
    assert summary["step"] == 2 and summary["skipped_nonfinite"] == 0
    metrics = summary["metrics"]  # the final evaluation read the val split too
    assert {"semantic/IoU/bed", "depth/abs_rel", "normals/mean_angle"} <= set(metrics)
