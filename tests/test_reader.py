"""The COCO-format reader: layouts, sample contract, conformance data, bad input, show-sample."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.card import ClassInfo, DatasetCard, KeypointSpec
from pipeline.data.reader import CocoDataset, open_dataset, read_image, read_png
from pipeline.data.transforms import build_transforms, collate
from pipeline.engine.loaders import worker_context
from pipeline.errors import DataError

H, W = 24, 32  # non-square on purpose


# ------------------------------------------------------------------------------------------------
# a hand-made dataset in the densepipe layout
# ------------------------------------------------------------------------------------------------
def png16_rgb(arr: np.ndarray) -> bytes:
    """Minimal 16-bit RGB PNG encoder (PIL cannot write 48-bit colour)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_card() -> DatasetCard:
    return DatasetCard(
        name="hand",
        classes=[ClassInfo(1, "person", (220, 20, 60), True),
                 ClassInfo(2, "ball", (0, 0, 142), True),
                 ClassInfo(3, "grass", (50, 200, 50), False)],
        keypoints=[KeypointSpec(1, ("nose", "left_eye", "right_eye"), ((1, 2), (1, 3)),
                                (("left_eye", "right_eye"),), (0.05, 0.05, 0.05))],
    )


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


def write_hand_dataset(root: Path, split: str = "train") -> dict[str, Any]:
    """3 images: #1 person (compressed RLE + keypoints), ball (polygon), crowd ball
    (uncompressed RLE); #2 one ball; #3 nothing. Every label kind; normals 16 bit on #1,
    8 bit on #2, none on #3."""
    rng = np.random.default_rng(0)
    card = make_card()
    for d in ("images", "semantic", "depth", "normals", "panoptic"):
        (root / d / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    card.save(root / "meta.json")
    person, ball, crowd = _rect(2, 12, 3, 11), _rect(5, 13, 15, 23), _rect(16, 22, 20, 30)
    ball2 = _rect(10, 20, 4, 12)
    images, anns, pan_anns, truth = [], [], [], {}
    for iid in (1, 2, 3):
        name = f"{iid:06d}.png"
        images.append({"id": iid, "file_name": name, "height": H, "width": W})
        img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / split / name)
        sem = np.full((H, W), 2, np.uint8)
        pan = np.full((H, W), 1, np.int64)  # segment 1: grass
        segs = [{"id": 1, "category_id": 3, "iscrowd": 0}]
        if iid == 1:
            rle = mask_utils.encode(np.asfortranarray(person.astype(np.uint8)))
            anns.append({"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "bbox": _box(person), "area": int(person.sum()),
                         "segmentation": {"size": [H, W], "counts": rle["counts"].decode()},
                         "keypoints": [6.5, 4.5, 2, 5.0, 3.0, 2, 9.0, 3.0, 1],
                         "num_keypoints": 3})
            anns.append({"id": 11, "image_id": 1, "category_id": 2, "iscrowd": 0,
                         "bbox": [15, 5, 8, 8], "area": 64,
                         "segmentation": [[15, 5, 23, 5, 23, 13, 15, 13]]})
            col = np.asfortranarray(crowd.astype(np.uint8)).ravel(order="F")
            counts, prev, run = [], 0, 0
            for v in col:
                if v != prev:
                    counts.append(run)
                    run, prev = 0, v
                run += 1
            counts.append(run)
            anns.append({"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 1,
                         "bbox": _box(crowd), "area": int(crowd.sum()),
                         "segmentation": {"size": [H, W], "counts": counts}})
            sem[person], sem[ball], sem[crowd] = 0, 1, 1
            sem[0, :] = 255
            pan[person], pan[ball], pan[crowd] = 2, 3, 4
            pan[0, :] = 0
            segs += [{"id": 2, "category_id": 1, "iscrowd": 0},
                     {"id": 3, "category_id": 2, "iscrowd": 0},
                     {"id": 4, "category_id": 2, "iscrowd": 1}]
        elif iid == 2:
            rle = mask_utils.encode(np.asfortranarray(ball2.astype(np.uint8)))
            anns.append({"id": 13, "image_id": 2, "category_id": 2, "iscrowd": 0,
                         "bbox": _box(ball2), "area": int(ball2.sum()),
                         "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}})
            sem[ball2] = 1
            pan[ball2] = 5
            segs.append({"id": 5, "category_id": 2, "iscrowd": 0})
        Image.fromarray(sem).save(root / "semantic" / split / name)
        rgb = np.stack([pan % 256, (pan // 256) % 256, pan // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic" / split / name)
        pan_anns.append({"image_id": iid, "file_name": name, "segments_info": segs})
        depth_mm = (1000 + 10 * np.arange(W)[None, :] + 100 * np.arange(H)[:, None]).astype(
            np.uint16)
        depth_mm[:, 0] = 0
        Image.fromarray(depth_mm).save(root / "depth" / split / name)
        n = rng.normal(size=(H, W, 3))
        n /= np.linalg.norm(n, axis=2, keepdims=True)
        n[:2, :2] = 0
        if iid == 1:
            enc16 = np.clip(np.rint((n + 1) / 2 * 65535), 0, 65535).astype(np.uint16)
            enc16[:2, :2] = 0
            (root / "normals" / split / name).write_bytes(png16_rgb(enc16))
        elif iid == 2:
            enc8 = np.clip(np.rint((n + 1) / 2 * 255), 0, 255).astype(np.uint8)
            enc8[:2, :2] = 0
            Image.fromarray(enc8).save(root / "normals" / split / name)
        truth[iid] = {"semantic": sem, "pan": pan, "depth": depth_mm, "normals": n}
    cats = [{"id": c.id, "name": c.name, "isthing": int(c.isthing)} for c in card.classes]
    cats[0] |= {"keypoints": ["nose", "left_eye", "right_eye"], "skeleton": [[1, 2], [1, 3]]}
    inst = {"images": images, "annotations": anns, "categories": cats[:2]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(inst))
    (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(
        {"images": images, "annotations": pan_anns, "categories": cats}))
    return {"truth": truth, "person": person, "ball2": ball2, "crowd": crowd}


@pytest.fixture
def hand(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path / "hand"
    info = write_hand_dataset(root)
    return root, info


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------
def test_png_16bit_roundtrip(tmp_path: Path) -> None:
    gray = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 85 % 65536).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "d.png")
    arr, mode = read_png(tmp_path / "d.png")
    assert mode == "I;16" and arr.dtype == np.uint16
    np.testing.assert_array_equal(arr, gray)
    rgb = np.random.default_rng(1).integers(0, 65536, (H, W, 3)).astype(np.uint16)
    (tmp_path / "n.png").write_bytes(png16_rgb(rgb))
    arr, mode = read_png(tmp_path / "n.png")
    assert mode == "RGB;16" and arr.dtype == np.uint16
    np.testing.assert_array_equal(arr, rgb)


GRADIENT16 = np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)


def _gray16_png(path: Path) -> None:
    Image.fromarray(GRADIENT16).save(path)  # PIL mode I;16


def _gray16_big_endian_tiff(path: Path) -> None:
    Image.fromarray(GRADIENT16.astype(">u2")).save(path)  # PIL mode I;16B


def _int32_tiff(path: Path) -> None:
    Image.fromarray(GRADIENT16.astype(np.int32)).save(path)  # PIL mode I


@pytest.mark.parametrize("writer", [_gray16_png, _gray16_big_endian_tiff, _int32_tiff])
def test_read_image_16bit_gray_scaled_not_clipped(tmp_path: Path, writer: Any) -> None:
    path = tmp_path / ("g.png" if writer is _gray16_png else "g.tif")
    writer(path)
    img = read_image(path)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    np.testing.assert_array_equal(img[..., 0], (GRADIENT16 >> 8).astype(np.uint8))
    flat = img[..., 0].ravel()
    assert flat[0] == 0 and flat[-1] == 255 and np.all(np.diff(flat.astype(int)) >= 0)
    assert (flat == 255).mean() < 0.01  # convert("RGB") made 99.7 % of them 255


def test_read_image_float_gray(tmp_path: Path) -> None:
    f = (GRADIENT16 / 65535.0).astype(np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")  # PIL mode F
    img = read_image(tmp_path / "f.tif")
    np.testing.assert_array_equal(img[..., 2], np.rint(f * 255).astype(np.uint8))


def test_read_image_refuses_what_it_cannot_scale(tmp_path: Path) -> None:
    Image.fromarray(np.full((H, W), 70000, np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(DataError, match=r"i\.tif: .*mode I with values 70000\.\.70000: "
                                        r"expected 0\.\.65535"):
        read_image(tmp_path / "i.tif")
    Image.fromarray(np.full((H, W), 200.0, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: .*mode F with values 200\.\.200: "
                                        r"expected finite values in 0\.\.1"):
        read_image(tmp_path / "f.tif")


def test_read_image_palette_alpha_and_16bit_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (H, W, 3)).astype(np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)
    gray = rgb[..., 0]
    Image.fromarray(np.stack([gray, np.full_like(gray, 7)], -1), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), np.repeat(gray[..., None], 3, 2))
    pal = Image.fromarray((gray % 4).astype(np.uint8), "P")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 8, 7)]
    pal.putpalette([c for col in colours for c in col])
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"),
                                  np.asarray(colours, np.uint8)[gray % 4])
    rgb16 = np.random.default_rng(3).integers(0, 65536, (H, W, 3)).astype(np.uint16)
    (tmp_path / "rgb16.png").write_bytes(png16_rgb(rgb16))
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.png"), (rgb16 >> 8).astype(np.uint8))


# ------------------------------------------------------------------------------------------------
# the hand-made layout
# ------------------------------------------------------------------------------------------------
def test_layout_sample_contract(hand: tuple[Path, dict[str, Any]]) -> None:
    root, info = hand
    ds = open_dataset(root, "train")
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3]
    assert ds.label_kinds == ("semantic", "instances", "panoptic", "depth", "normals", "keypoints")
    assert ds.card.name == "hand" and ds.num_keypoints == 3
    s = ds[0]
    t = info["truth"][1]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, H, W)
    assert s["image_id"] == 1 and s["file_name"] == "000001.png"
    assert s["meta"]["orig_size"] == (H, W)
    assert s["semantic"].dtype == torch.int64
    np.testing.assert_array_equal(s["semantic"].numpy(), t["semantic"])
    assert s["depth"].dtype == torch.float32 and s["depth"].shape == (H, W)
    np.testing.assert_allclose(s["depth"].numpy(), t["depth"] / 1000.0, atol=1e-6)
    assert float(s["depth"][0, 0]) == 0.0
    n = s["normals"]
    assert n.dtype == torch.float32 and n.shape == (3, H, W)
    assert torch.all(n[:, :2, :2] == 0)
    np.testing.assert_allclose(n.numpy().transpose(1, 2, 0)[2:], t["normals"][2:], atol=1e-4)
    pan = s["panoptic"]
    assert pan["ids"].dtype == torch.int64
    np.testing.assert_array_equal(pan["ids"].numpy(), t["pan"])
    assert {x["id"] for x in pan["segments"]} == set(np.unique(t["pan"]).tolist()) - {0}
    crowd_seg = next(x for x in pan["segments"] if x["id"] == 4)
    assert crowd_seg == {"id": 4, "category_id": 2, "isthing": True, "iscrowd": True}
    inst = s["instances"]
    assert inst["boxes"].dtype == torch.float32 and inst["boxes"].shape == (3, 4)
    assert inst["labels"].tolist() == [0, 1, 1] and inst["ids"].tolist() == [10, 11, 12]
    assert inst["iscrowd"].tolist() == [False, False, True]
    assert inst["masks"].dtype == torch.bool and inst["masks"].shape == (3, H, W)
    np.testing.assert_array_equal(inst["masks"][0].numpy(), info["person"])  # compressed RLE
    np.testing.assert_array_equal(inst["masks"][2].numpy(), info["crowd"])  # uncompressed RLE
    assert 50 <= int(inst["masks"][1].sum()) <= 90  # polygon 8x8
    assert inst["boxes"][0].tolist() == [3.0, 2.0, 11.0, 12.0]
    kp = inst["keypoints"]
    assert kp.dtype == torch.float32 and kp.shape == (3, 3, 3)
    assert kp[0].tolist() == [[6.5, 4.5, 2], [5.0, 3.0, 2], [9.0, 3.0, 1]]
    assert torch.all(kp[1:] == 0)
    # image 2: 8-bit normals, image 3: no normals file and no annotations
    s2 = ds[1]
    np.testing.assert_allclose(s2["normals"].numpy().transpose(1, 2, 0)[2:],
                               info["truth"][2]["normals"][2:], atol=1e-2)
    s3 = ds[2]
    assert "normals" not in s3 and "depth" in s3
    e = s3["instances"]
    assert e["boxes"].shape == (0, 4) and e["labels"].shape == (0,)
    assert e["masks"].shape == (0, H, W) and e["keypoints"].shape == (0, 3, 3)
    assert e["iscrowd"].dtype == torch.bool and e["ids"].dtype == torch.int64


def test_semantic_derived_from_panoptic(hand: tuple[Path, dict[str, Any]]) -> None:
    root, info = hand
    shutil.rmtree(root / "semantic")
    ds = CocoDataset.from_layout(root, "train")
    assert "semantic" in ds.label_kinds
    sem = ds[0]["semantic"].numpy()
    expect = info["truth"][1]["semantic"].astype(np.int64)
    expect[info["crowd"]] = 255  # crowd -> ignore
    np.testing.assert_array_equal(sem, expect)  # row 0 is void -> 255 in both


def test_missing_label_kinds_are_missing_keys(hand: tuple[Path, dict[str, Any]]) -> None:
    root, _ = hand
    for d in ("depth", "normals", "panoptic", "semantic"):
        shutil.rmtree(root / d)
    (root / "annotations" / "panoptic_train.json").unlink()
    ds = CocoDataset.from_layout(root, "train")
    assert ds.label_kinds == ("instances", "keypoints")
    s = ds[0]
    assert set(s) == {"image", "image_id", "file_name", "meta", "instances"}
    (root / "annotations" / "instances_train.json").unlink()
    ds = CocoDataset.from_layout(root, "train")  # card from meta.json, images from the folder
    assert ds.label_kinds == () and ds.image_ids == [1, 2, 3]
    assert set(ds[2]) == {"image", "image_id", "file_name", "meta"}


def test_dataloader_with_train_transforms(hand: tuple[Path, dict[str, Any]]) -> None:
    root, _ = hand
    ds = open_dataset(root, "train")
    ds.transforms = build_transforms(True, 16, ds.card)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["normals"].shape == (3, 3, 16, 16)
    assert batch["has"]["normals"].tolist() == [True, True, False]
    assert batch["image_ids"] == [1, 2, 3]


@pytest.mark.slow
def test_dataloader_workers_reproducible(hand: tuple[Path, dict[str, Any]]) -> None:
    root, _ = hand
    shutil.rmtree(root / "normals")  # 16-bit normals would import torchvision in each worker
    ds = open_dataset(root, "train", transforms=build_transforms(True, 16, None))

    def images() -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(0),
                                             multiprocessing_context=worker_context())
        return [b["image"] for b in loader]

    a, b = images(), images()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _write_coco2017(root: Path) -> None:
    """A fake COCO 2017 folder: instances (things), person_keypoints separate, panoptic."""
    hand = root.parent / "src"
    write_hand_dataset(hand, "val")
    shutil.copytree(hand / "images" / "val", root / "val2017")
    ann = root / "annotations"
    ann.mkdir(parents=True)
    inst = json.loads((hand / "annotations" / "instances_val.json").read_text())
    kp_anns = [dict(a) for a in inst["annotations"] if "keypoints" in a]
    for a in inst["annotations"]:
        a.pop("keypoints", None)
    person = dict(inst["categories"][0])
    for c in inst["categories"]:
        c.pop("keypoints", None)
        c.pop("skeleton", None)
    (ann / "instances_val2017.json").write_text(json.dumps(inst))
    (ann / "person_keypoints_val2017.json").write_text(json.dumps(
        {"images": inst["images"], "annotations": kp_anns, "categories": [person]}))
    pan = json.loads((hand / "annotations" / "panoptic_val.json").read_text())
    for c in pan["categories"]:
        c.pop("keypoints", None)
    (ann / "panoptic_val2017.json").write_text(json.dumps(pan))
    shutil.copytree(hand / "panoptic" / "val", ann / "panoptic_val2017")


def test_coco2017_layout(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _write_coco2017(root)
    ds = open_dataset(root, "val")
    assert ds.card.class_names == ["person", "ball", "grass"]
    assert [c.isthing for c in ds.card.classes] == [True, True, False]  # from panoptic
    assert ds.card.keypoints[0].flip_map == (("left_eye", "right_eye"),)  # from person_keypoints
    assert ds.label_kinds == ("semantic", "instances", "panoptic", "keypoints")
    inst = ds[0]["instances"]
    assert inst["ids"].tolist() == [10, 11, 12]  # keypoints merged by annotation id, no dupes
    assert inst["keypoints"][0, 1].tolist() == [5.0, 3.0, 2.0]
    with pytest.raises(DataError, match="train2017"):
        open_dataset(root, "train")
    with pytest.raises(DataError, match="unknown dataset layout"):
        open_dataset(tmp_path, "val")


# ------------------------------------------------------------------------------------------------
# conformance data (real COCO files from public repositories)
# ------------------------------------------------------------------------------------------------
def test_shapes_case(conformance_dir: Path) -> None:
    d = conformance_dir / "shapes_case"
    gt = json.loads((d / "gt_dataset.json").read_text())
    ds = CocoDataset(d, instances_json=d / "gt_dataset.json")
    assert len(ds) == 3 and ds.label_kinds == ("instances",)
    assert ds.card.class_names == ["cloud", "heart", "arrow", "star"]
    for i in range(len(ds)):
        s = ds[i]
        anns = [a for a in gt["annotations"] if a["image_id"] == s["image_id"]]
        inst = s["instances"]
        assert len(inst["labels"]) == len(anns)
        assert s["image"].shape == (3, 256, 256)
        for k, a in enumerate(anns):
            assert int(inst["ids"][k]) == a["id"]
            assert int(inst["labels"][k]) == ds.card.index_of_category(a["category_id"])
            area = int(inst["masks"][k].sum())
            assert abs(area - a["area"]) <= 0.02 * a["area"]
            x, y, w, h = a["bbox"]
            assert inst["boxes"][k].tolist() == [x, y, x + w, y + h]


def test_panoptic_sample(conformance_dir: Path) -> None:
    d = conformance_dir / "panoptic_sample"
    cats = json.loads((d / "panoptic_coco_categories.json").read_text())
    card = DatasetCard.from_coco_categories(cats)
    ds = CocoDataset(d / "input_images", panoptic_json=d / "panoptic_examples.json",
                     panoptic_dir=d / "panoptic_examples", card=card)
    assert len(ds) == 2 and ds.label_kinds == ("semantic", "panoptic")
    gt = {a["image_id"]: a for a in json.loads((d / "panoptic_examples.json").read_text())[
        "annotations"]}
    for i in range(len(ds)):
        s = ds[i]
        pan = s["panoptic"]
        ids = pan["ids"]
        assert ids.shape == s["image"].shape[1:]
        segs = gt[s["image_id"]]["segments_info"]
        assert set(torch.unique(ids).tolist()) - {0} == {x["id"] for x in segs}
        for seg in segs:
            assert int((ids == seg["id"]).sum()) == seg["area"]
        sem = s["semantic"]
        for seg in segs:
            want = 255 if seg["iscrowd"] else card.index_of_category(seg["category_id"])
            assert torch.all(sem[ids == seg["id"]] == want)
        assert torch.all(sem[ids == 0] == 255)
    # without a card: built from the JSON's own categories (same 133)
    ds2 = CocoDataset(d / "input_images", panoptic_json=d / "panoptic_examples.json",
                      panoptic_dir=d / "panoptic_examples")
    assert ds2.card.num_classes == 133 and len(ds2.card.stuff_indices) == 53


# ------------------------------------------------------------------------------------------------
# bad input: one-line DataError naming the file
# ------------------------------------------------------------------------------------------------
def _edit_json(path: Path, fn: Any) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _bad_cases() -> dict[str, Any]:
    def corrupt_image(root: Path) -> str:
        p = root / "images" / "train" / "000002.png"
        p.write_bytes(p.read_bytes()[:40])
        return "000002.png"

    def missing_image(root: Path) -> str:
        (root / "images" / "train" / "000002.png").unlink()
        return "000002.png"

    def json_missing_key(root: Path) -> str:
        _edit_json(root / "annotations" / "instances_train.json", lambda o: o.pop("categories"))
        return "instances_train.json"

    def json_missing_field(root: Path) -> str:
        _edit_json(root / "annotations" / "instances_train.json",
                   lambda o: o["annotations"][1].pop("bbox"))
        return "instances_train.json"

    def invalid_json(root: Path) -> str:
        (root / "annotations" / "instances_train.json").write_text("{not json")
        return "instances_train.json"

    def unknown_image_id(root: Path) -> str:
        _edit_json(root / "annotations" / "instances_train.json",
                   lambda o: o["annotations"][0].update(image_id=99))
        return "instances_train.json"

    def unknown_category_id(root: Path) -> str:
        _edit_json(root / "annotations" / "instances_train.json",
                   lambda o: o["annotations"][0].update(category_id=42))
        return "instances_train.json"

    def unknown_panoptic_category(root: Path) -> str:
        _edit_json(root / "annotations" / "panoptic_train.json",
                   lambda o: o["annotations"][0]["segments_info"][0].update(category_id=42))
        return "panoptic_train.json"

    def box_outside(root: Path) -> str:
        _edit_json(root / "annotations" / "instances_train.json",
                   lambda o: o["annotations"][1].update(bbox=[28, 5, 8, 8]))
        return "instances_train.json"

    def polygon_not_numbers(root: Path) -> str:
        _edit_json(root / "annotations" / "instances_train.json",
                   lambda o: o["annotations"][1].update(segmentation=[[15, 5, "x", 5, 23, 13]]))
        return "instances_train.json"

    def semantic_wrong_size(root: Path) -> str:
        Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(root / "semantic/train/000002.png")
        return "000002.png"

    def semantic_wrong_dtype(root: Path) -> str:
        Image.fromarray(np.zeros((H, W), np.uint16)).save(root / "semantic/train/000002.png")
        return "000002.png"

    def depth_8bit(root: Path) -> str:
        Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "depth/train/000002.png")
        return "000002.png"

    def panoptic_png_missing(root: Path) -> str:
        (root / "panoptic" / "train" / "000002.png").unlink()
        return "000002.png"

    def images_folder_missing(root: Path) -> str:
        shutil.rmtree(root / "images" / "train")
        return "images"

    return {k: v for k, v in locals().items() if callable(v)}


BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_data_error(tmp_path: Path, case: str) -> None:
    root = tmp_path / "bad"
    write_hand_dataset(root)
    name = BAD[case](root)
    with pytest.raises(DataError) as err:
        ds = CocoDataset.from_layout(root, "train")
        for i in range(len(ds)):
            ds[i]
    msg = str(err.value)
    assert name in msg and "\n" not in msg, msg
    if case == "semantic_wrong_size":
        assert f"{H}x{W}" in msg and f"{H}x{W + 1}" in msg and "uint8" in msg
    if case == "box_outside":
        assert "annotation id 11" in msg


def test_box_tolerance_one_pixel(tmp_path: Path) -> None:
    root = tmp_path / "tol"
    write_hand_dataset(root)
    _edit_json(root / "annotations" / "instances_train.json",
               lambda o: o["annotations"][1].update(bbox=[24.6, 5, 8, 8]))  # 0.6 px outside
    ds = CocoDataset.from_layout(root, "train")
    assert float(ds[0]["instances"]["boxes"][1, 2]) == W  # clipped to the image


@pytest.mark.parametrize(("polygon", "reason"), [
    ([15, 5, 23, 5], "2 point(s), fewer than 3"),
    ([15, 5, 23, 5, 23], "odd number of coordinates (5)"),
    ([15, 5, 19, 5, 23, 5, 17, 5], "zero area"),  # collinear
    ([15, 5, 15, 5, 23, 13], "fewer than 3 distinct points"),
])
def test_degenerate_polygon_dropped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 polygon: list[float], reason: str) -> None:
    root = tmp_path / "poly"
    write_hand_dataset(root)
    _edit_json(root / "annotations" / "instances_train.json",
               lambda o: o["annotations"][1].update(segmentation=[polygon]))  # annotation 11
    with caplog.at_level(logging.WARNING, logger="pipeline.data.reader"):
        ds = CocoDataset.from_layout(root, "train")
    assert ds.dropped_annotations == 1 and ds.dropped_polygons == 1
    assert ds[0]["instances"]["ids"].tolist() == [10, 12]  # not an empty mask for 11
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1, warns
    assert "dropped 1 annotation(s)" in warns[0]
    assert f"instances_train.json: annotation id 11: polygon 0: {reason}" in warns[0]


def test_invalid_polygon_dropped_valid_one_kept(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "poly"
    info = write_hand_dataset(root)
    before = CocoDataset.from_layout(root, "train")[0]["instances"]["masks"]
    square = [15, 5, 23, 5, 23, 13, 15, 13]
    _edit_json(root / "annotations" / "instances_train.json",
               lambda o: o["annotations"][1].update(segmentation=[[1, 1, 2, 2], square, [3.0]]))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.reader"):
        ds = CocoDataset.from_layout(root, "train")
    assert ds.dropped_annotations == 0 and ds.dropped_polygons == 2
    inst = ds[0]["instances"]
    assert inst["ids"].tolist() == [10, 11, 12]
    assert torch.equal(inst["masks"], before)  # valid polygons produce what they did
    assert inst["masks"][0].numpy().tolist() == info["person"].tolist()
    assert "annotation id 11: polygon 0: 2 point(s)" in caplog.text


def test_degenerate_polygon_in_instances_and_keypoints_counted_once(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    _write_coco2017(root)
    for name in ("instances_val2017.json", "person_keypoints_val2017.json"):
        _edit_json(root / "annotations" / name,
                   lambda o: o["annotations"][0].update(segmentation=[[3, 2, 11, 2]]))  # id 10
    ds = open_dataset(root, "val")
    assert ds.dropped_annotations == 1 and ds.dropped_polygons == 1
    assert ds[0]["instances"]["ids"].tolist() == [11, 12]


def test_valid_dataset_drops_nothing(hand: tuple[Path, dict[str, Any]],
                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.data.reader"):
        ds = CocoDataset.from_layout(hand[0], "train")
    assert ds.dropped_annotations == 0 and ds.dropped_polygons == 0 and not caplog.records


# ------------------------------------------------------------------------------------------------
# show-sample
# ------------------------------------------------------------------------------------------------
def test_show_sample(hand: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from pipeline.data.show import draw_sample, show_sample

    root, _ = hand
    out = show_sample(root, "train", 0, tmp_path / "viz" / "sample.png")
    img = Image.open(out)
    assert img.mode == "RGB" and img.width > 6 * W and img.height > H
    ds = open_dataset(root, "train")
    small = draw_sample({k: v for k, v in ds[2].items() if k in ("image", "depth")}, ds.card)
    assert small.width < img.width
    with pytest.raises(DataError, match="out of range"):
        show_sample(root, "train", 3, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------
# the synthetic world (the colleague's writer), once it exists
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def synthetic(request: pytest.FixtureRequest) -> Path:
    pytest.importorskip("pipeline.data.synthetic", reason="pipeline.data.synthetic not written yet")
    return request.getfixturevalue("tiny_dataset")


def test_reader_on_tiny_dataset(synthetic: Path) -> None:
    for split, n in (("train", 8), ("val", 4)):
        ds = open_dataset(synthetic, split)
        assert len(ds) == n
        assert set(ds.label_kinds) >= {"semantic", "instances", "panoptic", "depth", "normals"}
        inst_json = json.loads((synthetic / "annotations" / f"instances_{split}.json").read_text())
        K = ds.num_keypoints
        for i in range(len(ds)):
            s = ds[i]
            assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 64, 64)
            assert s["semantic"].dtype == torch.int64 and s["semantic"].shape == (64, 64)
            sem = s["semantic"]
            assert torch.all((sem < ds.card.num_classes) | (sem == 255))
            assert s["depth"].dtype == torch.float32 and s["depth"].shape == (64, 64)
            assert torch.all(s["depth"] >= 0)
            n = s["normals"]
            assert n.dtype == torch.float32 and n.shape == (3, 64, 64)
            norm = n.norm(dim=0)
            assert torch.all((norm == 0) | ((norm - 1).abs() < 1e-3))
            inst = s["instances"]
            N = len(inst["labels"])
            anns = [a for a in inst_json["annotations"] if a["image_id"] == s["image_id"]]
            assert N == len(anns)
            assert inst["boxes"].shape == (N, 4) and inst["boxes"].dtype == torch.float32
            assert inst["masks"].shape == (N, 64, 64) and inst["masks"].dtype == torch.bool
            assert inst["labels"].dtype == torch.int64 and inst["iscrowd"].dtype == torch.bool
            if "keypoints" in ds.label_kinds:
                assert inst["keypoints"].shape == (N, K, 3)
                assert inst["keypoints"].dtype == torch.float32
            pan = s["panoptic"]
            assert pan["ids"].dtype == torch.int64
            assert set(torch.unique(pan["ids"]).tolist()) - {0} == {
                x["id"] for x in pan["segments"]}
            for k in range(N):  # masks agree with the semantic map
                m = inst["masks"][k]
                assert m.any()
                assert torch.all(sem[m] == inst["labels"][k])


def test_show_sample_on_tiny_dataset(synthetic: Path, tmp_path: Path) -> None:
    from pipeline.data.show import show_sample

    out = show_sample(synthetic, "val", 1, tmp_path / "s.png")
    assert Image.open(out).width > 64 * 5
