"""Write synthetic scenes to disk in the formats real datasets use.

Layout under ``root`` (``{id}`` = the COCO image id as 6 digits, ids start at 1 in each split)::

    images/{split}/{id}.png           RGB uint8
    annotations/instances_{split}.json   COCO instances (things only): RLE segmentation, bbox,
                                         area; figures also carry keypoints + num_keypoints
    annotations/panoptic_{split}.json    COCO panoptic: segments_info per image, all categories
    panoptic/{split}/{id}.png         RGB, segment id = R + 256 G + 256^2 B, 0 = void
    semantic/{split}/{id}.png         uint8 class index (position in meta.json classes), 255 ignore
    depth/{split}/{id}.png            uint16 z-depth in millimetres, 0 = unknown (sky)
    normals/{split}/{id}.png          uint8 RGB round((n + 1) / 2 * 255), camera frame (OpenCV:
                                      x right, y down, z forward); (0, 0, 0) = unknown (sky)
    meta.json                         the dataset card (``synthetic_card``)

Splits are "train" and "val". Output is a pure function of the arguments other than ``workers``:
image ``i`` of split ``s`` is rendered from ``SeedSequence([seed, s, i])``, PNGs carry no
metadata, JSON keys are sorted (byte-identical on one platform; other CPUs, numpy or zlib builds
may differ in the last float bit or in PNG bytes). Everything is written to a temporary folder
that replaces ``root`` only when complete, sealed by a marker (``ownership.MARKER``) with a
fingerprint of its files. An existing ``root`` is replaced only when it is empty or such a sealed
render with its files unchanged; anything else is refused with ``OutputError`` before any work.

``workers > 1`` uses a "forkserver" (else "spawn") process pool, never plain fork (the caller may
hold threads: MLflow, Prefect). As with any such pool, a script that calls this at import time
needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.panoptic_ids import ids_to_rgb
from pipeline.data.synthetic import ownership, spec
from pipeline.data.synthetic.render import MIN_VISIBLE_PIXELS, RenderedScene, render_scene
from pipeline.errors import ConfigError
from pipeline.io import atomic_dir, atomic_write_json

SPLITS = ("train", "val")
FOLDERS = ("images", "semantic", "depth", "normals", "panoptic")
MAX_IMAGE_SIZE = 2048
PNG_COMPRESS_LEVEL = 3  # as fast as 1 and smaller; 6 costs ~60% more time for ~10% less disk


def scene_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed that image ``index`` (0-based; its image id is ``index + 1``) of ``split`` is
    rendered from: ``render_scene(scene_seed(...), size)`` (or ``sample_scene`` on
    ``np.random.default_rng`` of it) gives that image's scene again."""
    return np.random.SeedSequence([seed, SPLITS.index(split), index])


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"synthetic data: {name} must be an integer (got {value!r})")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"synthetic data: {name} must be {bound} (got {value})")
    return int(value)


def write_synthetic_dataset(
    root: str | os.PathLike[str],
    *,
    num_train: int,
    num_val: int,
    image_size: int,
    seed: int,
    workers: int = 1,
) -> dict[str, Any]:
    """Render ``num_train`` + ``num_val`` scenes of ``image_size``^2 pixels into ``root``.

    Returns a summary: ``{"root", "splits": {split: images}, "instances": {split: annotations},
    "image_size", "seed", "workers", "seconds", "images_per_second"}``.
    Raises ``ConfigError`` for bad arguments and ``OutputError`` when ``root`` holds anything but
    an earlier render of this writer (see the module doc); ``root`` is replaced atomically."""
    counts = {
        "train": _check_int("num_train", num_train, 1),
        "val": _check_int("num_val", num_val, 1),
    }
    size = _check_int("image_size", image_size, 32, MAX_IMAGE_SIZE)
    seed = _check_int("seed", seed, 0)
    workers = _check_int("workers", workers, 1, 256)
    try:
        root = Path(root)
    except TypeError as e:
        raise ConfigError(f"synthetic data: root must be a path (got {root!r})") from e
    ownership.check_replaceable(root)
    ownership.remove_stale_renders(root)

    start = time.perf_counter()
    n_ann: dict[str, int] = {}
    with atomic_dir(root, may_replace=ownership.replace_refusal) as tmp:
        ownership.write_rendering_marker(tmp)
        for folder in FOLDERS:
            for split in SPLITS:
                (tmp / folder / split).mkdir(parents=True)
        (tmp / "annotations").mkdir()
        jobs = [(str(tmp), split, i, size, seed) for split in SPLITS for i in range(counts[split])]
        results = {split: [] for split in SPLITS}  # type: dict[str, list[dict[str, Any]]]
        if workers == 1 or len(jobs) == 1:
            for job, res in zip(jobs, map(_render_one, jobs), strict=True):
                results[job[1]].append(res)
        else:
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods()
                                 else "spawn")
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload([__name__])
            chunk = max(1, min(16, len(jobs) // (workers * 4)))
            with ctx.Pool(min(workers, len(jobs))) as pool:
                for job, res in zip(jobs, pool.imap(_render_one, jobs, chunksize=chunk),
                                    strict=True):
                    results[job[1]].append(res)
        for split in SPLITS:
            n_ann[split] = _write_split_json(tmp, split, results[split])
        card = spec.synthetic_card(size)
        card.extra.update(seed=seed, image_size=size, splits=dict(counts),
                          min_visible_pixels=MIN_VISIBLE_PIXELS,
                          class_pixel_fraction={split: _fractions(results[split])
                                                for split in SPLITS})
        card.save(tmp / "meta.json")
        ownership.write_done_marker(tmp, {"seed": seed, "image_size": size, "splits": dict(counts)})
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    return {
        "root": str(root),
        "splits": counts,
        "instances": n_ann,
        "image_size": size,
        "seed": seed,
        "workers": workers,
        "seconds": round(seconds, 3),
        "images_per_second": round(total / seconds, 2) if seconds > 0 else None,
    }


def _fractions(results: list[dict[str, Any]]) -> list[float]:
    """Share of labelled pixels per class over a split (rounded: stable JSON)."""
    totals = np.sum([r["pixels"] for r in results], axis=0)
    return [round(float(v), 6) for v in totals / max(int(totals.sum()), 1)]


# -- one image ---------------------------------------------------------------------------------
def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """HxWx3 unit normals (0 = unknown) -> uint8 RGB; unknown pixels become (0, 0, 0)."""
    enc = np.clip(np.rint((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)
    enc[~normals.any(-1)] = 0
    return enc


def decode_normals(enc: np.ndarray) -> np.ndarray:
    """Inverse of ``encode_normals``: uint8 HxWx3 -> float32 unit normals, 0 where unknown."""
    n = enc.astype(np.float32) / 127.5 - 1.0
    known = enc.any(-1)
    n[known] /= np.linalg.norm(n[known], axis=-1, keepdims=True)
    n[~known] = 0.0
    return n


def encode_depth(depth: np.ndarray) -> np.ndarray:
    """HxW metres (0 = unknown) -> uint16 millimetres."""
    return np.clip(np.rint(depth * 1000.0), 0, 65535).astype(np.uint16)


def decode_depth(enc: np.ndarray) -> np.ndarray:
    """Inverse of ``encode_depth``: uint16 millimetres -> float32 metres (0 = unknown)."""
    return enc.astype(np.float32) / 1000.0


def panoptic_from_scene(scene: RenderedScene) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Panoptic segment ids (HxW int32, 0 = void) and COCO ``segments_info``.

    Things keep their instance ids (1..n); each stuff class present gets one segment after them;
    pixels of dropped things (semantic ``IGNORE_INDEX``) are void."""
    ids = scene.instance_ids.astype(np.int32).copy()
    segments: list[dict[str, Any]] = []
    for rec in scene.instances:
        segments.append({"id": rec.instance_id, "category_id": rec.category_id, "iscrowd": 0,
                         "bbox": list(rec.bbox), "area": rec.area})
    next_id = len(scene.instances) + 1
    for cls in (spec.FLOOR, spec.WALL, spec.SKY):
        m = scene.semantic == cls
        if not m.any():
            continue
        ids[m] = next_id
        ys, xs = np.nonzero(m)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1)]
        segments.append({"id": next_id, "category_id": spec.CLASSES[cls].id, "iscrowd": 0,
                         "bbox": bbox, "area": int(m.sum())})
        next_id += 1
    return ids, segments


def _render_one(job: tuple[str, str, int, int, int]) -> dict[str, Any]:
    root_s, split, index, size, seed = job
    root = Path(root_s)
    scene = render_scene(scene_seed(seed, split, index), size)
    image_id = index + 1
    name = f"{image_id:06d}.png"
    _save_png(scene.image, root / "images" / split / name)
    _save_png(scene.semantic, root / "semantic" / split / name)
    _save_png(encode_depth(scene.depth), root / "depth" / split / name)
    _save_png(encode_normals(scene.normals), root / "normals" / split / name)
    pan, segments = panoptic_from_scene(scene)
    _save_png(ids_to_rgb(pan), root / "panoptic" / split / name)

    anns = []
    for rec in scene.instances:
        mask = np.asfortranarray((scene.instance_ids == rec.instance_id).astype(np.uint8))
        rle = mask_utils.encode(mask)
        ann: dict[str, Any] = {
            "image_id": image_id,
            "category_id": rec.category_id,
            "segmentation": {"size": [int(v) for v in rle["size"]],
                             "counts": rle["counts"].decode("ascii")},
            "area": rec.area,
            "bbox": list(rec.bbox),
            "iscrowd": 0,
        }
        if rec.keypoints is not None:
            flat: list[float | int] = []
            for x, y, v in rec.keypoints.tolist():
                flat += [round(x, 2), round(y, 2), int(v)] if v > 0 else [0, 0, 0]
            ann["keypoints"] = flat
            ann["num_keypoints"] = int((rec.keypoints[:, 2] > 0).sum())
        anns.append(ann)
    return {
        "pixels": np.bincount(scene.semantic.ravel(), minlength=256)[:len(spec.CLASSES)].tolist(),
        "image": {"id": image_id, "file_name": name, "width": size, "height": size},
        "annotations": anns,
        "panoptic": {"image_id": image_id, "file_name": name, "segments_info": segments},
    }


# -- JSON --------------------------------------------------------------------------------------
def _categories(*, things_only: bool) -> list[dict[str, Any]]:
    cats = []
    for i, c in enumerate(spec.CLASSES):
        if things_only and not c.isthing:
            continue
        cat: dict[str, Any] = {"id": c.id, "name": c.name, "supercategory": spec.SUPERCATEGORY[c.name],
                               "isthing": int(c.isthing), "color": list(c.color)}
        if i == spec.FIGURE:
            cat["keypoints"] = list(spec.KEYPOINT_NAMES)
            cat["skeleton"] = [list(p) for p in spec.SKELETON]
        cats.append(cat)
    return cats


def _write_split_json(root: Path, split: str, results: list[dict[str, Any]]) -> int:
    info = {"description": f"densepipe synthetic world ({split})",
            "version": str(spec.GENERATOR_VERSION), "contributor": spec.GENERATOR}
    images = [r["image"] for r in results]
    annotations = []
    for r in results:
        for ann in r["annotations"]:
            annotations.append({"id": len(annotations) + 1, **ann})
    atomic_write_json(root / "annotations" / f"instances_{split}.json", {
        "info": info, "licenses": [], "images": images, "annotations": annotations,
        "categories": _categories(things_only=True),
    }, indent=None)
    atomic_write_json(root / "annotations" / f"panoptic_{split}.json", {
        "info": info, "licenses": [], "images": images,
        "annotations": [r["panoptic"] for r in results],
        "categories": _categories(things_only=False),
    }, indent=None)
    return len(annotations)
