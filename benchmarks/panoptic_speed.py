"""PQ evaluation speed: ``plugins.panoptic.metrics`` against the straightforward reference.

Writes ``--images`` ground-truth / prediction pairs of COCO panoptic PNGs at 640x480 with 50
segments each (Voronoi regions with random 24-bit ids: 35 things, 15 stuff, one crowd region and a
VOID band; the prediction is the ground truth shifted by a few pixels with some segments relabelled,
merged or blanked), then times, image by image and interleaved:

- ``reference``: read both PNGs (PIL, panopticapi's ``rgb2id``) + ``reference_image_stats``
  (``np.unique`` over the maps and the combined 64-bit labels, dictionaries and loops);
- ``densepipe``: ``read_panoptic_png`` twice + ``pq_image_stats`` (``searchsorted`` + one
  ``bincount``, with the input checks);

each also without the PNG reading (maps decoded once beforehand), and the whole set (listed
``--parallel-repeat`` times, so that process start-up does not dominate) through
``evaluate_panoptic_files`` with 1 and with ``--workers`` processes. Both paths must give the same
counts; the script checks that.

    python benchmarks/panoptic_speed.py [--images 60] [--rounds 3] [--workers 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

from pipeline.io import atomic_write_json  # noqa: E402
from plugins.panoptic.files import (  # noqa: E402
    evaluate_panoptic_files,
    read_panoptic_png,
    write_panoptic_json,
    write_panoptic_png,
)
from plugins.panoptic.metrics import PanopticCategories, PQStats, pq_image_stats  # noqa: E402
from plugins.panoptic.reference import reference_image_stats  # noqa: E402

H, W, SEGMENTS, THINGS = 480, 640, 50, 35
NUM_THING_CATS, NUM_STUFF_CATS = 20, 15


def categories() -> list[dict[str, Any]]:
    return ([{"id": i + 1, "name": f"thing{i}", "isthing": 1} for i in range(NUM_THING_CATS)]
            + [{"id": 101 + i, "name": f"stuff{i}", "isthing": 0} for i in range(NUM_STUFF_CATS)])


def voronoi(rng: np.random.Generator) -> np.ndarray:
    """``HxW`` region index 0..SEGMENTS-1 (nearest of SEGMENTS random seeds)."""
    seeds = rng.uniform((0, 0), (H, W), size=(SEGMENTS, 2))
    yy, xx = np.mgrid[0:H, 0:W]
    best = np.full((H, W), np.inf)
    region = np.zeros((H, W), np.int64)
    for k, (sy, sx) in enumerate(seeds):
        d = (yy - sy) ** 2 + (xx - sx) ** 2
        closer = d < best
        best[closer] = d[closer]
        region[closer] = k
    return region


def make_pair(rng: np.random.Generator) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    region = voronoi(rng)
    ids = rng.choice(1 << 24, size=SEGMENTS, replace=False).astype(np.int64) + 1
    ids = np.minimum(ids, (1 << 24) - 1)
    cats = np.concatenate([rng.integers(1, NUM_THING_CATS + 1, THINGS),
                           101 + rng.permutation(NUM_STUFF_CATS)[: SEGMENTS - THINGS]])
    gt = ids[region]
    gt[:, :12] = 0  # a VOID band
    gt_segs = [{"id": int(ids[k]), "category_id": int(cats[k]), "iscrowd": int(k == 0)}
               for k in range(SEGMENTS)]
    pred = np.roll(ids[region], shift=(int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
    pred_cats = cats.copy()
    relabel = rng.choice(SEGMENTS, 4, replace=False)
    pred_cats[relabel[:2]] = rng.integers(1, NUM_THING_CATS + 1, 2)
    pred[pred == ids[relabel[2]]] = ids[relabel[3]]  # merge two segments
    blank = rng.choice(np.setdiff1d(np.arange(SEGMENTS), relabel), 2, replace=False)
    for k in blank:
        pred[pred == ids[k]] = 0
    present = set(np.unique(pred).tolist())
    pred_segs = [{"id": int(ids[k]), "category_id": int(pred_cats[k])} for k in range(SEGMENTS)
                 if int(ids[k]) in present]
    return gt, gt_segs, pred, pred_segs


def write_set(root: Path, n: int, seed: int) -> tuple[Path, Path, Path, Path]:
    rng = np.random.default_rng(seed)
    gt_anns, pred_anns = [], []
    for i in range(n):
        gt, gt_segs, pred, pred_segs = make_pair(rng)
        name = f"{i + 1:06d}.png"
        write_panoptic_png(root / "gt" / name, gt)
        write_panoptic_png(root / "pred" / name, pred)
        gt_anns.append({"image_id": i + 1, "file_name": name, "segments_info": gt_segs})
        pred_anns.append({"image_id": i + 1, "file_name": name, "segments_info": pred_segs})
    write_panoptic_json(root / "gt.json", gt_anns, categories())
    write_panoptic_json(root / "pred.json", pred_anns, categories())
    return root / "gt.json", root / "gt", root / "pred.json", root / "pred"


def panopticapi_read(path: Path) -> np.ndarray:
    """panopticapi's reading: ``np.array(Image.open(p), dtype=np.uint32)`` then ``rgb2id``."""
    color = np.array(Image.open(path), dtype=np.uint32)
    return color[:, :, 0] + 256 * color[:, :, 1] + 256 * 256 * color[:, :, 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the images per path")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parallel-repeat", type=int, default=8,
                    help="the whole-set timing lists every image this many times (new image ids)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "panoptic_speed.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="densepipe-pq-bench-") as tmp:
        t0 = time.perf_counter()
        gt_json, gt_dir, pred_json, pred_dir = write_set(Path(tmp), args.images, args.seed)
        print(f"wrote {args.images} pairs in {time.perf_counter() - t0:.1f} s")
        gt_anns = json.loads(gt_json.read_text())["annotations"]
        pred_anns = json.loads(pred_json.read_text())["annotations"]
        cats = PanopticCategories.from_json(categories())
        pairs = list(zip(gt_anns, pred_anns, strict=True))
        decoded = [(read_panoptic_png(gt_dir / g["file_name"]), read_panoptic_png(pred_dir / p["file_name"]))
                   for g, p in pairs]

        def reference_full(i: int, stats: PQStats) -> None:
            g, p = pairs[i]
            reference_image_stats(panopticapi_read(gt_dir / g["file_name"]), g["segments_info"],
                                  panopticapi_read(pred_dir / p["file_name"]), p["segments_info"],
                                  cats, stats)

        def densepipe_full(i: int, stats: PQStats) -> None:
            g, p = pairs[i]
            pq_image_stats(read_panoptic_png(gt_dir / g["file_name"]), g["segments_info"],
                           read_panoptic_png(pred_dir / p["file_name"]), p["segments_info"], cats,
                           stats=stats)

        def reference_compute(i: int, stats: PQStats) -> None:
            g, p = pairs[i]
            reference_image_stats(decoded[i][0], g["segments_info"], decoded[i][1], p["segments_info"],
                                  cats, stats)

        def densepipe_compute(i: int, stats: PQStats) -> None:
            g, p = pairs[i]
            pq_image_stats(decoded[i][0], g["segments_info"], decoded[i][1], p["segments_info"], cats,
                           stats=stats)

        paths = {"reference": reference_full, "densepipe": densepipe_full,
                 "reference_compute_only": reference_compute, "densepipe_compute_only": densepipe_compute}
        times: dict[str, list[float]] = {k: [] for k in paths}
        totals: dict[str, PQStats] = {}
        for r in range(args.rounds):
            for i in range(len(pairs)):  # interleaved: every path on the same image in turn
                for name, fn in paths.items():
                    stats = PQStats(len(cats))
                    t = time.perf_counter()
                    fn(i, stats)
                    times[name].append(time.perf_counter() - t)
                    if r == 0:
                        totals.setdefault(name, PQStats(len(cats)))
                        totals[name] += stats
        ref, ours = totals["reference"], totals["densepipe"]
        same = all(np.array_equal(getattr(ref, f), getattr(ours, f)) for f in ("tp", "fp", "fn")) \
            and bool(np.allclose(ref.iou, ours.iou, rtol=0, atol=1e-9))
        if not same:
            raise SystemExit("reference and densepipe counts differ")
        summary = ours.summarize(cats)

        big = {}
        for kind, anns in (("gt", gt_anns), ("pred", pred_anns)):
            repeated = [dict(a, image_id=r * len(anns) + a["image_id"])
                        for r in range(args.parallel_repeat) for a in anns]
            big[kind] = write_panoptic_json(Path(tmp) / f"{kind}_repeated.json", repeated, categories())
        wall: dict[str, float] = {}
        for w in (1, args.workers):
            t = time.perf_counter()
            result = evaluate_panoptic_files(big["gt"], gt_dir, big["pred"], pred_dir, workers=w)
            wall[f"workers_{w}"] = time.perf_counter() - t
            assert abs(result.all.pq - summary.all.pq) < 1e-9

    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    report = {
        "benchmark": "panoptic_speed",
        "setup": {"images": args.images, "size_hw": [H, W], "segments_per_image": SEGMENTS,
                  "rounds": args.rounds, "seed": args.seed, "timing": "median per image, interleaved"},
        "per_image_ms": {k: round(v, 2) for k, v in ms.items()},
        "speedup_vs_reference": round(ms["reference"] / ms["densepipe"], 2),
        "speedup_vs_reference_compute_only":
            round(ms["reference_compute_only"] / ms["densepipe_compute_only"], 2),
        "whole_set_images": args.images * args.parallel_repeat,
        "whole_set_seconds": {k: round(v, 3) for k, v in wall.items()},
        "parallel_speedup": round(wall["workers_1"] / wall[f"workers_{args.workers}"], 2),
        "same_counts_as_reference": same,
        "pq_of_the_set": round(summary.all.pq, 6),
        "machine": {"device": f"cpu ({os.cpu_count()} cores, {cpu_model() or platform.machine()})",
                    "python": platform.python_version(), "numpy": np.__version__,
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
    }
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
