"""Reading speed: samples/s of ``CocoDataset`` + train transforms + ``collate`` via a DataLoader.

Renders a synthetic dataset (``write_synthetic_dataset``) into a temporary folder, then times
steady-state epochs (after one warm-up epoch; workers persistent; best of interleaved repeats)
with 0 and 2 workers, batch 8, 128x128 images, and writes ``benchmarks/results/read_speed.json``.
The main process runs torch with one intra-op thread (``--threads``): on a 2-core machine the
default two threads make the small per-sample tensor ops of ``workers=0`` several times slower
(workers always use one).

    python benchmarks/read_speed.py [--num-train 256] [--epochs 2] [--repeats 5] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

from pipeline.data.reader import open_dataset  # noqa: E402
from pipeline.data.transforms import build_transforms, collate  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402

TARGET_2_WORKERS = 200.0  # samples/s


def make_loader(root: Path, workers: int, batch: int, image_size: int
                ) -> torch.utils.data.DataLoader:
    ds = open_dataset(root, "train")
    ds.transforms = build_transforms(True, image_size, ds.card)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
    )


def time_epochs(loader: torch.utils.data.DataLoader, epochs: int) -> tuple[int, float]:
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for b in loader:
            n += b["image"].shape[0]
    return n, time.perf_counter() - t0


def measure(root: Path, workers: list[int], batch: int, image_size: int, epochs: int,
            repeats: int) -> list[dict[str, Any]]:
    """Best and median of ``repeats`` timings per worker count, interleaved so that a burst of
    load from other processes on a shared machine hits every setting alike."""
    loaders = {w: make_loader(root, w, batch, image_size) for w in workers}
    warm = {}
    for w, loader in loaders.items():  # warm-up epoch: worker start, page cache, lazy imports
        t0 = time.perf_counter()
        for _ in loader:
            pass
        warm[w] = time.perf_counter() - t0
    rates: dict[int, list[float]] = {w: [] for w in workers}
    samples = 0
    for _ in range(repeats):
        for w, loader in loaders.items():
            samples, dt = time_epochs(loader, epochs)
            rates[w].append(samples / dt)
    del loaders
    return [{
        "workers": w,
        "batch": batch,
        "samples_per_repeat": samples,
        "samples_per_s": round(max(rates[w]), 1),
        "samples_per_s_median": round(statistics.median(rates[w]), 1),
        "samples_per_s_all": [round(r, 1) for r in rates[w]],
        "warmup_epoch_seconds": round(warm[w], 3),
    } for w in workers]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads_main_process": torch.get_num_threads(),
    }
    try:
        info["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    info["cpu_model"] = cpu_model()
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-train", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per timing")
    ap.add_argument("--repeats", type=int, default=5, help="timings per worker count")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of the main process (DataLoader workers use 1)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "read_speed.json")
    args = ap.parse_args(argv)

    from pipeline.data.synthetic import write_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="densepipe-read-speed-") as tmp:
        root = Path(tmp) / "synthetic"
        t0 = time.perf_counter()
        write_synthetic_dataset(root, num_train=args.num_train, num_val=1,
                                image_size=args.image_size, seed=0, workers=2)
        render_s = time.perf_counter() - t0
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        runs = measure(root, args.workers, args.batch, args.image_size, args.epochs,
                       args.repeats)
    best2 = next((r["samples_per_s"] for r in runs if r["workers"] == 2), None)
    result = {
        "benchmark": "read_speed",
        "what": "CocoDataset.from_layout + build_transforms(train) + collate via DataLoader, "
                "steady-state epochs after one warm-up epoch (persistent workers)",
        "image_size": args.image_size,
        "batch": args.batch,
        "num_images": args.num_train,
        "epochs_per_timing": args.epochs,
        "repeats": args.repeats,
        "statistic": "samples_per_s = best of the repeats (shared machine: other processes "
                     "only ever slow a run down); median and all runs alongside",
        "render_seconds": round(render_s, 2),
        "runs": runs,
        "target_samples_per_s_2_workers": TARGET_2_WORKERS,
        "meets_target": None if best2 is None else best2 >= TARGET_2_WORKERS,
        "machine": machine(),
    }
    atomic_write_json(args.out, result)
    for r in runs:
        print(f"workers={r['workers']}: {r['samples_per_s']} samples/s")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
