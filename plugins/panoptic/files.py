"""COCO panoptic files: RGB-encoded PNGs, their JSON, and PQ between two such sets.

Format (COCO panoptic): a JSON with ``images``, ``annotations`` (one per image: ``image_id``,
``file_name`` of its PNG, ``segments_info`` [{``id``, ``category_id``, ``iscrowd``, ``area``, ...}])
and ``categories`` (``id``, ``name``, ``isthing``); a folder of PNGs where the segment id of a pixel
is R + 256 G + 256^2 B and 0 is VOID.

``evaluate_panoptic_files`` streams: it holds the two JSONs and, per worker process, one image's
maps at a time, so 5,000 COCO images never sit in memory together. ``workers > 1`` splits the
images over processes (forkserver) and sums their counts.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.panoptic_ids import ids_to_rgb, rgb_to_ids
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_path, atomic_write_json
from plugins.panoptic.metrics import PanopticCategories, PQResult, PQStats, pq_image_stats

Pair = tuple[dict[str, Any], dict[str, Any]]


def read_panoptic_png(path: str | os.PathLike[str]) -> np.ndarray:
    """The id map (``HxW uint32``) of a COCO panoptic PNG."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                raise DataError(path, f"expected an RGB panoptic PNG, got mode {im.mode}")
            rgb = np.asarray(im)
    except FileNotFoundError:
        raise DataError(path, "panoptic PNG not found") from None
    except OSError as e:
        raise DataError(path, f"cannot read panoptic PNG ({e})") from None
    return rgb_to_ids(rgb)


def write_panoptic_png(path: str | os.PathLike[str], ids: Any) -> Path:
    """Write ``ids`` (``HxW``) as an RGB-encoded PNG (atomically)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(ids_to_rgb(ids), mode="RGB").save(tmp, format="PNG")
    return path


def load_panoptic_json(path: str | os.PathLike[str], *, need_categories: bool) -> dict[str, Any]:
    """Read and check a COCO panoptic JSON: one-line ``DataError`` naming the file and field."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "panoptic JSON not found") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list):
        raise DataError(path, "not a COCO panoptic JSON (expected an object with an 'annotations' list)")
    if need_categories and not isinstance(obj.get("categories"), list):
        raise DataError(path, "ground-truth panoptic JSON has no 'categories' list")
    for i, a in enumerate(obj["annotations"]):
        for key in ("image_id", "file_name", "segments_info"):
            if not isinstance(a, dict) or key not in a:
                raise DataError(path, f"annotations[{i}] has no {key!r}")
        for j, s in enumerate(a["segments_info"]):
            for key in ("id", "category_id"):
                if key not in s:
                    raise DataError(path, f"annotations[{i}] ({a['file_name']}) segments_info[{j}] "
                                          f"has no {key!r}")
    if need_categories:
        for i, c in enumerate(obj["categories"]):
            if "id" not in c:
                raise DataError(path, f"categories[{i}] has no 'id'")
    return obj


def match_annotations(gt: dict[str, Any], pred: dict[str, Any], *, pred_json: Path) -> list[Pair]:
    """(ground truth, prediction) annotation per ground-truth image, by ``image_id``."""
    by_id: dict[Any, dict[str, Any]] = {}
    for a in pred["annotations"]:
        if a["image_id"] in by_id:
            raise DataError(pred_json, f"image_id {a['image_id']} has two annotations")
        by_id[a["image_id"]] = a
    pairs = []
    for g in gt["annotations"]:
        p = by_id.get(g["image_id"])
        if p is None:
            raise DataError(pred_json, f"no prediction for image_id {g['image_id']} ({g['file_name']})")
        pairs.append((g, p))
    return pairs


def evaluate_pairs(pairs: Sequence[Pair], gt_dir: str, pred_dir: str,
                   categories: PanopticCategories) -> PQStats:
    """Counts over ``pairs``, one image in memory at a time (also the worker function)."""
    stats = PQStats(len(categories))
    for g, p in pairs:
        gt_png = Path(gt_dir) / g["file_name"]
        pred_png = Path(pred_dir) / p["file_name"]
        gt_ids = read_panoptic_png(gt_png)
        pred_ids = read_panoptic_png(pred_png)
        where = f"{pred_png} (image_id {g['image_id']})"
        pq_image_stats(gt_ids, g["segments_info"], pred_ids, p["segments_info"], categories,
                       where=where, stats=stats)
    return stats


def evaluate_panoptic_files(gt_json: str | os.PathLike[str], gt_dir: str | os.PathLike[str],
                            pred_json: str | os.PathLike[str], pred_dir: str | os.PathLike[str], *,
                            workers: int = 1) -> PQResult:
    """PQ of a COCO panoptic prediction against its ground truth (panopticapi's rules).

    Every ground-truth image needs a prediction (same ``image_id``); predictions of other images
    are ignored. ``workers`` processes share the images (1: in this process)."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: expected 1 or more")
    gt_json, pred_json = Path(gt_json), Path(pred_json)
    for d in (gt_dir, pred_dir):
        if not Path(d).is_dir():
            raise DataError(d, "panoptic PNG folder not found")
    gt = load_panoptic_json(gt_json, need_categories=True)
    pred = load_panoptic_json(pred_json, need_categories=False)
    categories = PanopticCategories.from_json(gt["categories"])
    pairs = match_annotations(gt, pred, pred_json=pred_json)
    workers = min(workers, max(1, len(pairs)))
    if workers == 1:
        stats = evaluate_pairs(pairs, str(gt_dir), str(pred_dir), categories)
    else:
        stats = _evaluate_parallel(pairs, str(gt_dir), str(pred_dir), categories, workers)
    return stats.summarize(categories)


def _evaluate_parallel(pairs: Sequence[Pair], gt_dir: str, pred_dir: str,
                       categories: PanopticCategories, workers: int) -> PQStats:
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    chunks = [list(c) for c in np.array_split(np.arange(len(pairs)), workers * 4) if len(c)]
    stats = PQStats(len(categories))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(evaluate_pairs, [pairs[i] for i in c], gt_dir, pred_dir, categories)
                   for c in chunks]
        for f in futures:
            stats += f.result()
    return stats


def write_panoptic_json(path: str | os.PathLike[str], annotations: list[dict[str, Any]],
                        categories: list[dict[str, Any]], images: list[dict[str, Any]] | None = None) -> Path:
    """A COCO panoptic JSON (``images``, ``annotations``, ``categories``), written atomically."""
    path = Path(path)
    atomic_write_json(path, {"images": images or [], "annotations": annotations, "categories": categories})
    return path
