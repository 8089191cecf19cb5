"""Joint transforms, collate and the drawing primitives."""

from __future__ import annotations

import copy
import io
import pickle
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import viz
from pipeline.data.card import ClassInfo, DatasetCard, KeypointSpec
from pipeline.data.transforms import (
    Batch,
    ColorJitter,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomScaleCrop,
    Resize,
    build_transforms,
    collate,
    crop_sample,
    hflip_sample,
    masks_to_boxes,
    resize_sample,
    scale_crop_sample,
)

H, W = 20, 30


def make_card() -> DatasetCard:
    return DatasetCard(
        name="hand",
        classes=[ClassInfo(1, "person", (220, 20, 60), True),
                 ClassInfo(2, "ball", (0, 0, 142), True),
                 ClassInfo(3, "grass", (50, 200, 50), False)],
        keypoints=[KeypointSpec(1, ("nose", "left_eye", "right_eye"), ((1, 2), (1, 3)),
                                (("left_eye", "right_eye"),), (0.05, 0.05, 0.05))],
    )


def make_sample(seed: int = 0) -> dict[str, Any]:
    """Every label kind, by hand: a person (box [3, 2, 9, 10], 3 keypoints) and a ball."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 2:10, 3:9] = True
    masks[1, 12:18, 20:27] = True
    kp = torch.zeros(2, 3, 3)
    kp[0] = torch.tensor([[6.0, 4.0, 2.0], [4.5, 3.0, 2.0], [7.5, 3.0, 1.0]])
    sem = torch.full((H, W), 2, dtype=torch.int64)
    sem[masks[0]], sem[masks[1]] = 0, 1
    sem[0] = 255
    ids = torch.full((H, W), 1, dtype=torch.int64)
    ids[masks[0]], ids[masks[1]] = 2, 3
    normals = torch.randn(3, H, W, generator=g)
    normals = normals / normals.norm(dim=0, keepdim=True)
    normals[:, :3, :3] = 0
    depth = torch.rand(H, W, generator=g) * 5 + 0.5
    depth[-1] = 0
    return {
        "image": torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8),
        "image_id": 7, "file_name": "000007.png", "meta": {"orig_size": (H, W)},
        "semantic": sem, "depth": depth, "normals": normals,
        "panoptic": {"ids": ids, "segments": [
            {"id": 1, "category_id": 3, "isthing": False, "iscrowd": False},
            {"id": 2, "category_id": 1, "isthing": True, "iscrowd": False},
            {"id": 3, "category_id": 2, "isthing": True, "iscrowd": False}]},
        "instances": {
            "boxes": torch.tensor([[3.0, 2.0, 9.0, 10.0], [20.0, 12.0, 27.0, 18.0]]),
            "labels": torch.tensor([0, 1]), "masks": masks,
            "iscrowd": torch.tensor([False, False]), "ids": torch.tensor([1, 2]),
            "keypoints": kp,
        },
    }


def assert_samples_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b)
    for k in ("image", "semantic", "depth", "normals"):
        if k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    if "panoptic" in a:
        assert torch.equal(a["panoptic"]["ids"], b["panoptic"]["ids"])
        assert a["panoptic"]["segments"] == b["panoptic"]["segments"]
    if "instances" in a:
        assert set(a["instances"]) == set(b["instances"])
        for k, v in a["instances"].items():
            torch.testing.assert_close(v, b["instances"][k], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# flip
# ------------------------------------------------------------------------------------------------
def test_flip_every_label_kind() -> None:
    card = make_card()
    s = make_sample()
    f = hflip_sample(s, card)
    assert torch.equal(f["image"], s["image"].flip(-1))
    assert torch.equal(f["semantic"], s["semantic"].flip(-1))
    assert torch.equal(f["depth"], s["depth"].flip(-1))
    assert torch.equal(f["panoptic"]["ids"], s["panoptic"]["ids"].flip(-1))
    assert torch.equal(f["normals"][0], -s["normals"][0].flip(-1))  # x negated
    assert torch.equal(f["normals"][1:], s["normals"][1:].flip(-1))
    assert torch.all(f["normals"][:, :3, -3:] == 0)  # unknown stays unknown
    inst = f["instances"]
    assert torch.equal(inst["masks"], s["instances"]["masks"].flip(-1))
    assert inst["boxes"].tolist() == [[W - 9, 2, W - 3, 10], [W - 27, 12, W - 20, 18]]
    assert torch.equal(inst["boxes"], masks_to_boxes(inst["masks"]))  # boxes follow masks
    # keypoints: x -> W - x, and left/right swapped by the card's flip map
    assert inst["keypoints"][0].tolist() == [[W - 6.0, 4.0, 2.0],  # nose
                                             [W - 7.5, 3.0, 1.0],  # left eye <- right eye
                                             [W - 4.5, 3.0, 2.0]]  # right eye <- left eye
    assert torch.all(inst["keypoints"][1] == 0)  # ball: no keypoints, stays zero
    assert_samples_equal(hflip_sample(f, card), s)  # twice = identity


def test_flip_keypoint_follows_its_pixel() -> None:
    """Pixel-centre convention: a keypoint at the centre of column c lands on the centre of the
    column that pixel c is mirrored to."""
    s = make_sample()
    c = 4
    s["instances"]["keypoints"][0, 0] = torch.tensor([c + 0.5, 5.5, 2.0])
    marker = torch.zeros(H, W, dtype=torch.int64)
    marker[5, c] = 1
    s["semantic"] = marker
    f = hflip_sample(s, make_card())
    x, y, _ = f["instances"]["keypoints"][0, 0].tolist()
    assert f["semantic"][int(y), int(x)] == 1


def test_random_flip_probability() -> None:
    card = make_card()
    s = make_sample()
    assert RandomHorizontalFlip(card, p=0.0)(s) is s
    assert_samples_equal(RandomHorizontalFlip(card, p=1.0)(s), hflip_sample(s, card))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t1, t2 = RandomHorizontalFlip(card, generator=g1), RandomHorizontalFlip(card, generator=g2)
    for _ in range(5):
        assert_samples_equal(t1(s), t2(s))


# ------------------------------------------------------------------------------------------------
# resize, crop
# ------------------------------------------------------------------------------------------------
def test_resize_shapes_and_geometry() -> None:
    s = make_sample()
    r = Resize((40, 60))(s)
    assert r["image"].shape == (3, 40, 60) and r["image"].dtype == torch.uint8
    assert r["semantic"].shape == (40, 60) and r["semantic"].dtype == torch.int64
    assert r["depth"].shape == (40, 60) and r["normals"].shape == (3, 40, 60)
    assert r["panoptic"]["ids"].shape == (40, 60)
    assert r["instances"]["masks"].shape == (2, 40, 60)
    # 2x upscale: nearest maps are exact repeats; boxes, keypoints and masks scale together
    assert torch.equal(r["semantic"], s["semantic"].repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(r["instances"]["boxes"], s["instances"]["boxes"] * 2)
    assert torch.equal(r["instances"]["boxes"], masks_to_boxes(r["instances"]["masks"]))
    assert r["instances"]["keypoints"][0, 1].tolist() == [9.0, 6.0, 2.0]
    assert set(torch.unique(r["semantic"]).tolist()) <= {0, 1, 2, 255}
    assert Resize((H, W))(s) is s  # no-op at the same size
    d = resize_sample(s, 10)
    assert d["image"].shape == (3, 10, 10) and d["instances"]["masks"].shape == (2, 10, 10)


def test_crop_window_drops_and_clips() -> None:
    s = make_sample()
    c = crop_sample(s, 0, 5, H, 20)  # columns 5..24: person cut at the left, ball cut right
    inst = c["instances"]
    assert c["image"].shape == (3, H, 20)
    assert inst["boxes"].tolist() == [[0.0, 2.0, 4.0, 10.0], [15.0, 12.0, 20.0, 18.0]]
    kp = inst["keypoints"][0]
    assert kp[0].tolist() == [1.0, 4.0, 2.0]  # nose at x 6 -> 1
    assert kp[1].tolist() == [0.0, 0.0, 0.0]  # left eye at x 4.5 is outside now
    assert kp[2].tolist() == [2.5, 3.0, 1.0]
    c = crop_sample(s, 10, 10, 10, 20)  # person entirely outside: dropped
    assert c["instances"]["labels"].tolist() == [1] and c["instances"]["ids"].tolist() == [2]
    assert c["instances"]["keypoints"].shape == (1, 3, 3)
    assert {x["id"] for x in c["panoptic"]["segments"]} == {1, 3}
    # a window past the image pads with each map's unknown value
    c = crop_sample(s, -5, -4, H + 10, W + 8)
    assert c["semantic"].shape == (H + 10, W + 8)
    assert torch.all(c["semantic"][:5] == 255) and torch.all(c["depth"][:, :4] == 0)
    assert torch.all(c["normals"][:, -5:] == 0) and torch.all(c["panoptic"]["ids"][:5] == 0)
    assert torch.all(c["image"][:, :5] == 0)
    assert c["instances"]["boxes"][0].tolist() == [7.0, 7.0, 13.0, 15.0]
    assert c["instances"]["keypoints"][0, 0].tolist() == [10.0, 9.0, 2.0]


@pytest.mark.parametrize("scale", [(0.5, 0.5), (1.0, 1.0), (1.6, 1.6), (0.75, 1.25)])
def test_random_scale_crop(scale: tuple[float, float]) -> None:
    s = make_sample()
    t = RandomScaleCrop(scale, (16, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        c = t(s)
        assert c["image"].shape == (3, 16, 24) and c["semantic"].shape == (16, 24)
        assert c["depth"].shape == (16, 24) and c["normals"].shape == (3, 16, 24)
        inst = c["instances"]
        n = len(inst["labels"])
        assert inst["masks"].shape == (n, 16, 24) and inst["keypoints"].shape == (n, 3, 3)
        assert torch.all(inst["masks"].flatten(1).any(1))  # no empty instance survives
        assert torch.equal(inst["boxes"], masks_to_boxes(inst["masks"]))
        kp = inst["keypoints"]
        vis = kp[..., 2] > 0
        assert torch.all((kp[..., 0][vis] >= 0) & (kp[..., 0][vis] < 24))
        assert torch.all(kp[~vis] == 0)
    a = RandomScaleCrop(scale, (16, 24), generator=torch.Generator().manual_seed(5))(s)
    b = RandomScaleCrop(scale, (16, 24), generator=torch.Generator().manual_seed(5))(s)
    assert_samples_equal(a, b)


@pytest.mark.parametrize("scaled,y0,x0", [((40, 60), 3, 7), ((10, 15), -3, -5), ((26, 37), 0, 9),
                                           ((20, 30), 2, -2)])
def test_scale_crop_equals_resize_then_crop(scaled: tuple[int, int], y0: int, x0: int) -> None:
    s = make_sample()
    a = scale_crop_sample(s, scaled, y0, x0, 16, 24)
    b = crop_sample(resize_sample(s, scaled), y0, x0, 16, 24)
    assert_samples_equal(a, b)


def test_random_scale_crop_uses_global_rng() -> None:
    s = make_sample()
    t = RandomScaleCrop((0.5, 1.5), (16, 16))
    torch.manual_seed(11)
    a = t(s)
    torch.manual_seed(11)
    b = t(s)
    assert_samples_equal(a, b)


# ------------------------------------------------------------------------------------------------
# photometric
# ------------------------------------------------------------------------------------------------
def test_color_jitter_and_normalize() -> None:
    s = make_sample()
    j = ColorJitter(0.4, 0.4, 0.4, generator=torch.Generator().manual_seed(0))(s)
    assert j["image"].dtype == torch.uint8 and not torch.equal(j["image"], s["image"])
    for k in ("semantic", "depth", "normals", "panoptic", "instances"):
        assert j[k] is s[k]
    n = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(s)
    assert n["image"].dtype == torch.float32
    torch.testing.assert_close(n["image"], s["image"].float() / 127.5 - 1)
    with pytest.raises(TypeError, match="before Normalize"):
        ColorJitter()(n)


def test_build_transforms() -> None:
    card = make_card()
    s = make_sample()
    train = build_transforms(True, 16, card)
    assert isinstance(train, Compose) and "RandomScaleCrop" in repr(train)
    out = train(s)
    assert out["image"].shape == (3, 16, 16) and out["image"].dtype == torch.uint8
    # evaluation keeps the sample at its own size: the model applies the test-size rule
    ev = build_transforms(False, 16, card)(s)
    assert ev is s and ev["image"].shape == (3, 20, 30)


def test_build_transforms_scale_range_one_keeps_geometry_and_depth() -> None:
    """``scale=(1, 1)`` (``data.scale_range: [1, 1]``): no zoom, so every view is the image itself
    or its mirror, and depth is never divided by a zoom factor."""
    card = make_card()
    s = crop_sample(make_sample(), 0, 0, H, H)  # square, as build_transforms crops
    torch.manual_seed(0)
    train = build_transforms(True, H, card, scale=(1.0, 1.0))
    assert "scale=(1.0, 1.0)" in repr(train)
    flipped = 0
    for _ in range(8):
        out = train(s)
        same = torch.equal(out["depth"], s["depth"])
        mirrored = torch.equal(out["depth"], s["depth"].flip(-1))
        assert same or mirrored
        assert torch.equal(out["semantic"], s["semantic"] if same else s["semantic"].flip(-1))
        flipped += not same
    assert 0 < flipped < 8


@pytest.mark.parametrize("scale", [[0.5, 2.0], [1.0, 1.0]])
def test_train_dataset_takes_data_scale_range(tiny_dataset: Path, scale: list[float]) -> None:
    from pipeline.config import config_from_dict
    from pipeline.engine.loaders import train_dataset

    cfg = config_from_dict({"data": {"root": str(tiny_dataset), "image_size": 64, "scale_range": scale}})
    assert f"RandomScaleCrop(scale={tuple(scale)}, crop=(64, 64)" in repr(train_dataset(cfg).transforms)


# ------------------------------------------------------------------------------------------------
# collate
# ------------------------------------------------------------------------------------------------
def test_collate_with_missing_labels() -> None:
    a = make_sample(0)
    b = make_sample(1)
    for k in ("depth", "instances", "panoptic"):
        del b[k]
    batch = collate([a, b])
    assert batch["image"].shape == (2, 3, H, W) and batch["image"].dtype == torch.uint8
    assert batch["image_ids"] == [7, 7] and batch["file_names"] == ["000007.png"] * 2
    assert batch["depth"].shape == (2, H, W) and torch.all(batch["depth"][1] == 0)
    assert torch.equal(batch["depth"][0], a["depth"])
    assert batch["semantic"].dtype == torch.int64 and batch["normals"].shape == (2, 3, H, W)
    assert batch["instances"][1] is None and batch["instances"][0] is a["instances"]
    assert batch["panoptic"][1] is None
    has = batch["has"]
    assert has["depth"].tolist() == [True, False] and has["semantic"].tolist() == [True, True]
    assert has["instances"].tolist() == [True, False]
    assert has["keypoints"].tolist() == [True, False]
    only = collate([b])
    assert "depth" not in only and "instances" not in only
    assert only["has"]["depth"].tolist() == [False]
    c = make_sample(2)
    del c["semantic"]
    assert torch.all(collate([a, c])["semantic"][1] == 255)
    with pytest.raises(ValueError, match="one size"):
        collate([a, resize_sample(b, 8)])


def test_batch_pickles_packed() -> None:
    a, b = make_sample(0), make_sample(1)
    del b["depth"]
    batch = collate([a, b])
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(batch)  # what DataLoader workers use
    back = pickle.loads(buf.getvalue())
    assert type(back) is Batch and set(back) == set(batch)
    for k in ("image", "semantic", "depth", "normals"):
        assert torch.equal(back[k], batch[k]) and back[k].dtype == batch[k].dtype
    for k in batch["has"]:
        assert torch.equal(back["has"][k], batch["has"][k])
    for x, y in zip(back["instances"], batch["instances"], strict=True):
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert back["panoptic"][0]["segments"] == a["panoptic"]["segments"]
    assert torch.equal(back["panoptic"][0]["ids"], a["panoptic"]["ids"])
    assert back["image_ids"] == batch["image_ids"] and back["meta"] == batch["meta"]
    shallow = copy.copy(batch)
    assert type(shallow) is Batch and shallow["image"] is batch["image"]


# ------------------------------------------------------------------------------------------------
# drawing primitives
# ------------------------------------------------------------------------------------------------
def test_viz_primitives() -> None:
    card = make_card()
    s = make_sample()
    col = viz.colorize_labels(s["semantic"], card.palette())
    assert col.shape == (H, W, 3) and col.dtype == np.uint8
    assert tuple(col[0, 0]) == (0, 0, 0) and tuple(col[5, 5]) == card.classes[0].color
    assert viz.overlay(s["image"], col, 0.5).shape == (H, W, 3)
    inst = s["instances"]
    drawn = viz.draw_instances(s["image"], inst["boxes"], inst["labels"], masks=inst["masks"],
                               scores=torch.tensor([0.9, 0.5]), keypoints=inst["keypoints"],
                               class_names=card.class_names, palette=card.palette(),
                               skeletons={0: card.keypoints[0].skeleton})
    assert drawn.shape == (H, W, 3) and not np.array_equal(drawn, viz.as_hwc_uint8(s["image"]))
    dep = viz.colorize_depth(s["depth"])
    assert dep.shape == (H, W, 3) and np.all(dep[-1] == 0) and dep[:-1].any()
    t = viz.turbo(np.array([0.0, 0.5, 1.0]))
    assert t[0, 2] > t[0, 0] and t[1, 1] > 200 and t[2, 0] > t[2, 2]  # blue -> green -> red
    bar = viz.depth_colorbar(0.5, 5.5, height=64)
    assert bar.shape[0] == 64 and bar.dtype == np.uint8
    nrm = viz.normals_to_rgb(s["normals"])
    assert nrm.shape == (H, W, 3) and np.all(nrm[:3, :3] == 0)
    pal = {c.id: c.color for c in card.classes}
    pan = viz.colorize_panoptic(s["panoptic"]["ids"], s["panoptic"]["segments"], pal)
    assert pan.shape == (H, W, 3) and tuple(pan[15, 2]) == card.classes[2].color  # stuff as is
    leg = viz.legend(card.class_names, card.palette())
    assert isinstance(leg, Image.Image) and leg.height > 3 * 10
    grid = viz.panel_grid([("a", col), ("b", dep), ("c", bar)], ncols=2)
    assert isinstance(grid, Image.Image) and grid.width >= 2 * W and grid.height >= 2 * H


# ------------------------------------------------------------------------------------------------
# on the synthetic world, once it exists
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def synthetic(request: pytest.FixtureRequest) -> Path:
    pytest.importorskip("pipeline.data.synthetic", reason="pipeline.data.synthetic not written yet")
    return request.getfixturevalue("tiny_dataset")


def test_flip_on_tiny_dataset(synthetic: Path) -> None:
    from pipeline.data.reader import open_dataset

    ds = open_dataset(synthetic, "train")
    for i in range(3):
        s = ds[i]
        f = hflip_sample(s, ds.card)
        assert_samples_equal(hflip_sample(f, ds.card), s)
        assert torch.equal(f["semantic"], s["semantic"].flip(-1))
        assert torch.equal(f["normals"][0], -s["normals"][0].flip(-1) + 0.0)
        b, fb = s["instances"]["boxes"], f["instances"]["boxes"]
        torch.testing.assert_close(fb[:, 0], 64 - b[:, 2])
        torch.testing.assert_close(fb[:, 2], 64 - b[:, 0])
        c = build_transforms(True, 48, ds.card)(s)
        assert c["image"].shape == (3, 48, 48)
    batch = collate([build_transforms(True, 48, ds.card)(ds[i]) for i in range(4)])
    assert batch["image"].shape == (4, 3, 48, 48) and batch["has"]["depth"].all()


@pytest.mark.parametrize("zoom", [0.5, 1.0, 1.6])
def test_random_scale_crop_divides_depth_by_the_zoom(zoom: float) -> None:
    """A zoom by s makes the scene look s times closer: depth / s (unknown stays 0); with
    ``depth_follows_zoom=False`` the values are only resampled."""
    s = make_sample()
    s["depth"][0, 0] = 0.0
    follow = RandomScaleCrop((zoom, zoom), (16, 24), generator=torch.Generator().manual_seed(3))(s)
    plain = RandomScaleCrop((zoom, zoom), (16, 24), generator=torch.Generator().manual_seed(3),
                            depth_follows_zoom=False)(s)
    known = plain["depth"] > 0
    assert torch.equal(follow["depth"] > 0, known)
    assert torch.allclose(follow["depth"][known], plain["depth"][known] / zoom)
    assert set(plain["depth"][known].unique().tolist()) <= set(s["depth"].unique().tolist())
    assert torch.equal(follow["normals"], plain["normals"])
