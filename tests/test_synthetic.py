"""The synthetic world: exact, mutually consistent labels; COCO files; determinism; atomicity."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.card import IGNORE_INDEX, DatasetCard
from pipeline.data.synthetic import (
    decode_depth,
    decode_normals,
    panoptic_from_scene,
    render_scene,
    scene_seed,
    synthetic_card,
    write_synthetic_dataset,
)
from pipeline.data.synthetic import spec as sspec
from pipeline.data.synthetic.geometry import Capsule, Cylinder, OrientedBox, Sphere, rotation_z
from pipeline.errors import ConfigError

# pycocotools 2.0.x calls np.array(copy=False) on its own objects under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 64
THINGS = (sspec.SPHERE, sspec.BOX, sspec.CYLINDER, sspec.FIGURE)


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(np.random.SeedSequence([7, i]), SIZE) for i in range(10)]


def _rays(size: int) -> np.ndarray:
    cam = sspec.camera_for(size)
    jj, ii = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    return np.stack([(jj - cam["cx"]) / cam["fx"], (ii - cam["cy"]) / cam["fy"],
                     np.ones_like(jj)], -1)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


# -- labels of one scene ----------------------------------------------------------------------
def test_scene_arrays_have_the_documented_types(scenes):
    s = scenes[0]
    assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
    assert s.semantic.shape == (SIZE, SIZE) and s.semantic.dtype == np.uint8
    assert s.instance_ids.shape == (SIZE, SIZE)
    assert s.depth.shape == (SIZE, SIZE) and s.depth.dtype == np.float32
    assert s.normals.shape == (SIZE, SIZE, 3) and s.normals.dtype == np.float32
    assert len(s.instances) >= 1
    assert set(np.unique(s.semantic)) <= set(range(7)) | {IGNORE_INDEX}


def test_instance_masks_cover_exactly_the_thing_pixels(scenes):
    for s in scenes:
        thing_px = np.isin(s.semantic, THINGS)
        assert np.array_equal(thing_px, s.instance_ids > 0)
        assert sorted(np.unique(s.instance_ids[s.instance_ids > 0])) == [
            r.instance_id for r in s.instances]
        for r in s.instances:
            m = s.instance_ids == r.instance_id
            assert (s.semantic[m] == r.class_index).all()
            assert r.category_id == sspec.CLASSES[r.class_index].id
            assert r.area == m.sum() >= 20
            ys, xs = np.nonzero(m)
            assert r.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert (r.keypoints is not None) == (r.class_index == sspec.FIGURE)


def test_panoptic_agrees_with_semantic_and_instances(scenes):
    for s in scenes:
        ids, segments = panoptic_from_scene(s)
        assert np.array_equal(ids == 0, s.semantic == IGNORE_INDEX)
        assert len({seg["id"] for seg in segments}) == len(segments)
        for seg in segments:
            m = ids == seg["id"]
            cls = seg["category_id"] - 1
            assert seg["area"] == m.sum() > 0
            assert (s.semantic[m] == cls).all()
            if sspec.CLASSES[cls].isthing:
                assert np.array_equal(m, s.instance_ids == seg["id"])
            else:  # one segment per stuff class
                assert np.array_equal(m, s.semantic == cls)
        assert set(np.unique(ids)) - {0} == {seg["id"] for seg in segments}


def test_depth_positive_on_geometry_and_normals_face_the_camera(scenes):
    rays = _rays(SIZE)
    for s in scenes:
        sky = s.semantic == sspec.SKY
        assert (s.depth[~sky] > 0).all() and (s.depth[sky] == 0).all()
        assert (s.normals[sky] == 0).all()
        norm = np.linalg.norm(s.normals[~sky], axis=-1)
        np.testing.assert_allclose(norm, 1.0, atol=1e-5)
        assert ((s.normals[~sky] * rays[~sky]).sum(-1) < 1e-6).all()


def test_floor_depth_and_normals_describe_one_plane(scenes):
    """Back-projected floor pixels lie on the plane their (shared) normal defines."""
    rays = _rays(SIZE)
    for s in scenes:
        floor = s.semantic == sspec.FLOOR
        n = s.normals[floor]
        np.testing.assert_allclose(n, np.broadcast_to(n[0], n.shape), atol=1e-5)
        assert n[0, 1] < 0  # the floor's normal points up, i.e. -y in the camera frame
        pts = rays[floor] * s.depth[floor][:, None]
        offset = pts @ n[0]  # = -camera height for every floor point
        assert offset.std() < 1e-4 and -2.5 < offset.mean() < -1.0


def test_visible_keypoints_lie_on_their_mask(scenes):
    seen = {0: 0, 1: 0, 2: 0}
    for s in scenes:
        for r in s.instances:
            if r.keypoints is None:
                continue
            assert r.keypoints.shape == (len(sspec.KEYPOINT_NAMES), 3)
            m = s.instance_ids == r.instance_id
            for x, y, v in r.keypoints:
                seen[int(v)] += 1
                if v == 0:
                    assert x == 0 and y == 0
                    continue
                assert 0 <= x < SIZE and 0 <= y < SIZE
                if v == 2:
                    i, j = int(y), int(x)
                    assert m[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].any()
    assert seen[2] > 0 and seen[1] > 0


def test_render_scene_is_deterministic():
    a = render_scene(123, 48)
    b = render_scene(np.random.default_rng(123), 48)
    for field in ("image", "semantic", "instance_ids", "depth", "normals"):
        assert np.array_equal(getattr(a, field), getattr(b, field))


# -- geometry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prim", [
    Sphere(np.array([0.0, 0.0, 1.0]), 0.5),
    Capsule(np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.3, 2.0]), 0.3),
    OrientedBox(np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.3, 0.7]), rotation_z(0.7)),
    Cylinder(np.array([0.0, 0.0, 0.5]), np.array([0.6, 0.0, 0.8]), 0.4, 1.2),
], ids=["sphere", "capsule", "box", "cylinder"])
def test_primitive_hits_lie_on_the_surface_facing_the_ray(prim):
    rng = np.random.default_rng(0)
    ro = rng.normal(size=(500, 3)) * 6
    target = np.array([0.0, 0.0, 1.0]) + rng.normal(size=(500, 3)) * 0.5
    d = target - ro
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    t = prim.intersect(ro, d)
    hit = np.isfinite(t)
    assert 50 < hit.sum() < 500
    p = ro[hit] + t[hit, None] * d[hit]
    n = prim.normal(p)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-9)
    assert ((n * d[hit]).sum(1) <= 1e-9).all()
    # just before the hit the ray is still outside: stepping back along -n leaves the solid
    back = prim.intersect(p - d[hit] * 1e-3, d[hit])
    np.testing.assert_allclose(back, 1e-3, atol=1e-7)
    # a single origin broadcasts like a repeated one
    np.testing.assert_allclose(prim.intersect(ro[0], d), prim.intersect(ro[[0] * 500], d), rtol=1e-9)


# -- files on disk ----------------------------------------------------------------------------
def test_layout_card_and_png_encodings(tiny_dataset: Path):
    card = DatasetCard.load(tiny_dataset / "meta.json")
    assert card.class_names == ["floor", "wall", "sky", "sphere", "box", "cylinder", "figure"]
    assert [c.id for c in card.classes] == list(range(1, 8))
    assert card.thing_indices == [3, 4, 5, 6]
    kp = card.keypoints_for(7)
    assert kp is not None and kp.num_keypoints >= 5 and len(kp.oks_sigmas) == kp.num_keypoints
    assert kp.flip_permutation() != list(range(kp.num_keypoints))
    assert card.camera == synthetic_card(64).camera and card.camera["width"] == 64
    assert card.extra["splits"] == {"train": 8, "val": 4} and card.extra["seed"] == 0
    for split, n in (("train", 8), ("val", 4)):
        for folder, mode in (("images", "RGB"), ("semantic", "L"), ("depth", "I;16"),
                             ("normals", "RGB"), ("panoptic", "RGB")):
            files = sorted((tiny_dataset / folder / split).iterdir())
            assert [f.name for f in files] == [f"{i:06d}.png" for i in range(1, n + 1)]
            with Image.open(files[0]) as im:
                assert im.mode == mode and im.size == (64, 64)
    # the files decode back to the rendered scene: scene_seed names each file's seed
    # (image 1 of val = SeedSequence([0, 1, 0]), image 3 of train = SeedSequence([0, 0, 2]))
    assert scene_seed(0, "val", 0).entropy == np.random.SeedSequence([0, 1, 0]).entropy
    train3 = render_scene(scene_seed(0, "train", 2), 64)
    assert np.array_equal(_read(tiny_dataset / "images/train/000003.png"), train3.image)
    s = render_scene(scene_seed(0, "val", 0), 64)
    assert np.array_equal(_read(tiny_dataset / "images/val/000001.png"), s.image)
    assert np.array_equal(_read(tiny_dataset / "semantic/val/000001.png"), s.semantic)
    depth = decode_depth(_read(tiny_dataset / "depth/val/000001.png"))
    np.testing.assert_allclose(depth, s.depth, atol=5e-4 + 1e-6)
    enc = _read(tiny_dataset / "normals/val/000001.png")
    known = enc.any(-1)
    assert np.array_equal(known, s.depth > 0)
    np.testing.assert_allclose(enc[known] / 127.5 - 1.0, s.normals[known], atol=1 / 255 + 1e-6)
    normals = decode_normals(enc)
    np.testing.assert_allclose(np.linalg.norm(normals[known], axis=-1), 1.0, atol=1e-5)
    assert (normals[~known] == 0).all()
    # within a degree of the rendered normal
    assert ((normals[known] * s.normals[known]).sum(-1) > np.cos(np.radians(1))).all()


def test_written_panoptic_agrees_with_semantic_and_instances(tiny_dataset: Path):
    from pycocotools import mask as mask_utils

    for split in ("train", "val"):
        inst = json.loads((tiny_dataset / f"annotations/instances_{split}.json").read_text())
        pan = json.loads((tiny_dataset / f"annotations/panoptic_{split}.json").read_text())
        assert {c["id"]: c["isthing"] for c in pan["categories"]} == {
            i + 1: int(c.isthing) for i, c in enumerate(sspec.CLASSES)}
        assert [c["id"] for c in inst["categories"]] == [4, 5, 6, 7]
        assert [a["id"] for a in inst["annotations"]] == list(range(1, len(inst["annotations"]) + 1))
        by_image: dict[int, list[dict]] = {}
        for a in inst["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for entry in pan["annotations"]:
            name = entry["file_name"]
            rgb = _read(tiny_dataset / "panoptic" / split / name).astype(np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
            sem = _read(tiny_dataset / "semantic" / split / name)
            assert np.array_equal(ids == 0, sem == IGNORE_INDEX)
            thing_masks = []
            for seg in entry["segments_info"]:
                m = ids == seg["id"]
                assert seg["area"] == m.sum() and seg["iscrowd"] == 0
                assert (sem[m] == seg["category_id"] - 1).all()
                if seg["category_id"] >= 4:
                    thing_masks.append((seg["category_id"], m))
            anns = by_image.get(entry["image_id"], [])
            assert len(anns) == len(thing_masks)
            for a in anns:
                m = mask_utils.decode(a["segmentation"]).astype(bool)
                assert a["area"] == m.sum()
                assert any(c == a["category_id"] and np.array_equal(m, pm)
                           for c, pm in thing_masks)
                assert ("keypoints" in a) == (a["category_id"] == 7)


def test_writing_is_byte_identical_with_two_workers(tiny_dataset: Path, tmp_path: Path):
    other = tmp_path / "again"
    summary = write_synthetic_dataset(other, num_train=8, num_val=4, image_size=64, seed=0,
                                      workers=2)
    assert summary["splits"] == {"train": 8, "val": 4} and summary["workers"] == 2
    assert summary["seconds"] > 0 and summary["instances"]["train"] > 0
    a = sorted(p.relative_to(tiny_dataset) for p in tiny_dataset.rglob("*") if p.is_file())
    b = sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert a == b and len(a) == 4 + 5 * 12 + 2  # JSONs, PNGs, meta.json, the render's marker
    for rel in a:
        assert (tiny_dataset / rel).read_bytes() == (other / rel).read_bytes(), rel


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_ground_truth_scores_ap_one_against_itself(tiny_dataset: Path, iou_type: str):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    card = DatasetCard.load(tiny_dataset / "meta.json")
    path = tiny_dataset / "annotations/instances_train.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        results = []
        for a in gt.dataset["annotations"]:
            r = {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0}
            r.update({"bbox": a["bbox"], "segmentation": a["segmentation"]})
            if iou_type == "keypoints":
                if "keypoints" not in a:
                    continue
                r["keypoints"] = a["keypoints"]
            results.append(r)
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        if iou_type == "keypoints":
            spec = card.keypoints_for(7)
            assert spec is not None
            ev.params.catIds = [spec.category_id]
            ev.params.kpt_oks_sigmas = np.array(spec.oks_sigmas)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


# -- bad input and atomicity ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"num_train": 0}, {"num_val": 0}, {"image_size": 16}, {"seed": -1}, {"workers": 0},
    {"num_train": 2.5}, {"image_size": True}, {"image_size": 100000},
])
def test_bad_parameters_raise_config_error(tmp_path: Path, kwargs: dict):
    args = {"num_train": 2, "num_val": 1, "image_size": 32, "seed": 0, "workers": 1, **kwargs}
    with pytest.raises(ConfigError) as err:
        write_synthetic_dataset(tmp_path / "ds", **args)
    assert "\n" not in str(err.value) and next(iter(kwargs)) in str(err.value)
    assert not (tmp_path / "ds").exists()


def test_a_failed_run_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pipeline.data.synthetic import writer

    real = writer._render_one

    def flaky(job):
        if job[2] == 2:  # (root, split, index, size, seed)
            raise RuntimeError("disk on fire")
        return real(job)

    monkeypatch.setattr(writer, "_render_one", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic_dataset(tmp_path / "ds", num_train=4, num_val=1, image_size=32, seed=0)
    assert list(tmp_path.iterdir()) == []
