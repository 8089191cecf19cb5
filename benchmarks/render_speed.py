"""Synthetic-world throughput: images per second rendered *and* written, at 128x128.

Runs ``write_synthetic_dataset`` with 1 and 2 worker processes (best of ``--repeats``) plus the
renderer alone on one core, and writes ``benchmarks/results/render_speed.json``.

    python benchmarks/render_speed.py [--images 200] [--size 128] [--repeats 2]

The target is >= 20 images/s at 128x128 with 2 workers.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

from pipeline.data.synthetic import render_scene, write_synthetic_dataset  # noqa: E402
from pipeline.data.synthetic.spec import GENERATOR_VERSION  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402

TARGET_2_WORKERS = 20.0


def _machine() -> dict[str, object]:
    import PIL

    info: dict[str, object] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    info["cpu_model"] = cpu_model()
    if hasattr(os, "getloadavg"):
        info["loadavg_1min_at_start"] = round(os.getloadavg()[0], 2)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="images per run (80%% train)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/render_speed.json")
    args = ap.parse_args()
    n_train = max(1, int(args.images * 0.8))
    n_val = max(1, args.images - n_train)
    machine = _machine()

    runs = []
    for workers in (1, 2):
        times = []
        for rep in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                write_synthetic_dataset(Path(tmp) / "ds", num_train=n_train, num_val=n_val,
                                        image_size=args.size, seed=rep, workers=workers)
                times.append(time.perf_counter() - t0)
        best = min(times)
        runs.append({"workers": workers, "images": n_train + n_val,
                     "seconds_best": round(best, 3), "seconds_all": [round(t, 3) for t in times],
                     "images_per_second": round((n_train + n_val) / best, 2)})
        print(f"workers={workers}: {runs[-1]['images_per_second']} images/s "
              f"({n_train + n_val} images, best of {args.repeats})")

    n = min(100, args.images)
    t0 = time.perf_counter()
    for i in range(n):
        render_scene(np.random.SeedSequence([0, 0, i]), args.size)
    render_ips = n / (time.perf_counter() - t0)
    print(f"render only, 1 core: {render_ips:.2f} images/s")

    two = runs[1]["images_per_second"]
    result = {
        "benchmark": "render_speed",
        "what": "write_synthetic_dataset: ray-cast render + all PNGs + COCO JSON, images/s",
        "image_size": args.size,
        "generator_version": GENERATOR_VERSION,
        "runs": runs,
        "render_only_images_per_second_1_core": round(render_ips, 2),
        "target_images_per_second_2_workers": TARGET_2_WORKERS,
        "meets_target": bool(two >= TARGET_2_WORKERS),
        "machine": machine,
        "command": "python benchmarks/render_speed.py",
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
