"""Label decoding: ms per sample when the dataset decodes every label kind vs only what the tasks need.

Renders a synthetic dataset (128 px, every label kind) and a few 480x640 "photos" (the synthetic
world rendered at 640 px, cropped to 480 rows and stored as JPEG, with its semantic, depth, normals,
panoptic and instance labels cropped alike), then times ``train_dataset(cfg)[i]`` (reader + train
transforms, ``num_workers: 0``, one torch thread) for a semantic-only config and for all tasks.

"Before" is ``label_kinds=None`` (every kind on disk decoded, what the reader did whatever the tasks;
also what any task set got before); "after" is ``label_kinds=required_label_kinds(tasks)``, what
``train_dataset`` now passes. Best and median of interleaved repeats (shared machine).

    python benchmarks/label_decoding.py [--num-128 64] [--num-640 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import cpu_description  # noqa: E402  (benchmarks/machine.py)
from read_speed import machine  # noqa: E402

from pipeline.data.reader import open_dataset  # noqa: E402
from pipeline.data.transforms import build_transforms  # noqa: E402
from pipeline.engine.loaders import required_label_kinds  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402

CONFIGS = {"semantic-only": ["semantic"],
           "all tasks": ["semantic", "panoptic", "depth", "normals", "keypoints"]}


def crop_to_480x640(root: Path, split: str = "train", rows: int = 480) -> None:
    """Crop a 640x640 synthetic render in place to ``rows`` x 640; images become JPEGs."""
    from pycocotools import mask as mask_utils

    from pipeline.data.panoptic_ids import rgb_to_ids

    for kind in ("semantic", "depth", "normals", "panoptic"):
        for p in sorted((root / kind / split).glob("*.png")):
            with Image.open(p) as im:
                im.load()
                im.crop((0, 0, im.width, rows)).save(p)
    pan_json = root / "annotations" / f"panoptic_{split}.json"
    pan = json.loads(pan_json.read_text())
    for a in pan["annotations"]:
        ids = set(np.unique(rgb_to_ids(np.asarray(Image.open(root / "panoptic" / split /
                                                              a["file_name"])))).tolist())
        a["segments_info"] = [s for s in a["segments_info"] if s["id"] in ids]
    inst_json = root / "annotations" / f"instances_{split}.json"
    inst = json.loads(inst_json.read_text())
    for obj in (inst, pan):
        for im in obj["images"]:
            im["height"] = rows
            im["file_name"] = Path(im["file_name"]).stem + ".jpg"
    kept = []
    for a in inst["annotations"]:
        h, w = 640, 640
        seg = a["segmentation"]
        rle = (mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list)
               else mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg)
        m = np.asfortranarray(mask_utils.decode(rle)[:rows])
        if not m.any():
            continue
        r = mask_utils.encode(m)
        r["counts"] = r["counts"].decode()
        a["segmentation"], a["area"] = r, float(m.sum())
        a["bbox"] = [float(v) for v in mask_utils.toBbox(r)]
        if a.get("keypoints"):
            kp = np.asarray(a["keypoints"], np.float64).reshape(-1, 3)
            kp[kp[:, 1] >= rows] = 0
            a["keypoints"], a["num_keypoints"] = kp.ravel().tolist(), int((kp[:, 2] > 0).sum())
        kept.append(a)
    inst["annotations"] = kept
    inst_json.write_text(json.dumps(inst))
    pan_json.write_text(json.dumps(pan))
    for p in sorted((root / "images" / split).glob("*.png")):
        with Image.open(p) as im:
            im.convert("RGB").crop((0, 0, im.width, rows)).save(p.with_suffix(".jpg"), quality=90)
        p.unlink()


def time_config(root: Path, kinds: tuple[str, ...] | None, image_size: int) -> float:
    """Seconds for one pass over the train split (reader + train transforms), per sample."""
    ds = open_dataset(root, "train", label_kinds=kinds)
    ds.transforms = build_transforms(True, image_size, ds.card)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return (time.perf_counter() - t0) / len(ds)


def measure(root: Path, image_size: int, repeats: int) -> list[dict[str, Any]]:
    settings = [(name, when, None if when == "before" else required_label_kinds(tasks))
                for name, tasks in CONFIGS.items() for when in ("before", "after")]
    for _, _, kinds in settings:  # warm-up: page cache, lazy imports
        time_config(root, kinds, image_size)
    ms: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    for _ in range(repeats):
        for i, (_, _, kinds) in enumerate(settings):
            ms[i].append(1000 * time_config(root, kinds, image_size))
    return [{"tasks": name, "model.tasks": CONFIGS[name], "when": when,
             "label_kinds": "all (None)" if kinds is None else list(kinds),
             "ms_per_sample": round(min(ms[i]), 2),
             "ms_per_sample_median": round(statistics.median(ms[i]), 2),
             "ms_per_sample_all": [round(v, 2) for v in ms[i]]}
            for i, (name, when, kinds) in enumerate(settings)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-128", type=int, default=64)
    ap.add_argument("--num-640", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path,
                    default=REPO / "benchmarks" / "results" / "label_decoding.json")
    args = ap.parse_args(argv)

    from pipeline.data.synthetic import write_synthetic_dataset

    torch.set_num_threads(1)
    cases = []
    with tempfile.TemporaryDirectory(prefix="densepipe-label-decoding-") as tmp:
        for name, n, size, crop_size in (("synthetic 128x128 PNG", args.num_128, 128, 128),
                                         ("480x640 JPEG", args.num_640, 640, 480)):
            root = Path(tmp) / f"d{size}"
            write_synthetic_dataset(root, num_train=n, num_val=1, image_size=size, seed=0,
                                    workers=2)
            if size == 640:
                crop_to_480x640(root)
            runs = measure(root, crop_size, args.repeats)
            cases.append({"data": name, "num_images": n, "train_crop": crop_size, "runs": runs})
            for r in runs:
                print(f"{name}: {r['tasks']:>13} {r['when']:>6}: {r['ms_per_sample']} ms/sample")
    result = {
        "benchmark": "label_decoding",
        "what": "open_dataset(label_kinds=...)[i] with build_transforms(train) (reader + "
                "augmentation, no DataLoader, num_workers 0, 1 torch thread); before = every "
                "label kind decoded (label_kinds=None), after = required_label_kinds(model.tasks)",
        "statistic": "ms_per_sample = best of the interleaved repeats (one pass over the split "
                     "each); median and all alongside",
        "repeats": args.repeats,
        "cases": cases,
        "machine": {**machine(), "cpu": cpu_description()},
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
