"""Cost of `prepare`'s check of a user's folder (``pipeline.data.check.check_dataset``).

Renders a synthetic dataset in the densepipe layout (an image plus four label PNGs per sample)
into a temporary folder, then times, best of ``--repeats`` interleaved rounds:

- ``check``: ``check_dataset`` over both splits (every file exists, decodes fully, sizes match);
- ``open``: what `prepare` did before, opening each split and counting its images;
- ``read_pass``: one pass of ``CocoDataset.load`` over every sample (what an epoch reads).

Writes ``benchmarks/results/dataset_check.json``.

    python benchmarks/dataset_check.py [--num-train 256] [--num-val 64] [--image-size 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import cpu_description  # noqa: E402  (benchmarks/machine.py)

from pipeline.data import open_dataset  # noqa: E402
from pipeline.data.check import check_dataset  # noqa: E402
from pipeline.data.synthetic import write_synthetic_dataset  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402

SPLITS = ("train", "val")


def _open(root: Path) -> None:
    for split in SPLITS:
        len(open_dataset(root, split))


def _read_pass(root: Path) -> None:
    for split in SPLITS:
        ds = open_dataset(root, split)
        for i in range(len(ds)):
            ds.load(i)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-train", type=int, default=256)
    ap.add_argument("--num-val", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dataset_check.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="densepipe-check-") as tmp:
        root = Path(tmp) / "ds"
        write_synthetic_dataset(root, num_train=args.num_train, num_val=args.num_val,
                                image_size=args.image_size, seed=0, workers=os.cpu_count() or 1)
        files = sum(1 for p in root.rglob("*") if p.is_file())
        runs: dict[str, list[float]] = {"check": [], "open": [], "read_pass": []}
        for _ in range(args.repeats):
            for name, fn in (("check", lambda: check_dataset(root, SPLITS)), ("open", lambda: _open(root)),
                             ("read_pass", lambda: _read_pass(root))):
                t0 = time.perf_counter()
                fn()
                runs[name].append(round(time.perf_counter() - t0, 4))
    best = {name: min(times) for name, times in runs.items()}
    images = args.num_train + args.num_val
    result = {
        "benchmark": "dataset_check", "images": images, "files": files, "image_size": args.image_size,
        "seconds_best": best, "seconds_all": runs,
        "check_ms_per_image": round(1000 * best["check"] / images, 3),
        "check_over_read_pass": round(best["check"] / best["read_pass"], 3),
        "statistic": "best of the interleaved repeats (a shared machine)",
        "machine": cpu_description(), "command": "python benchmarks/dataset_check.py",
    }
    atomic_write_json(args.out, result)
    print(f"{images} images ({files} files): check {best['check']:.3f} s, open {best['open']:.3f} s, "
          f"read pass {best['read_pass']:.3f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
