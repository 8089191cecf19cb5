"""Training speed and peak memory of the demo's all-task model at 512x512.

The model is the one ``params.yaml`` trains (its ``model.tasks``: semantic, instance, keypoints,
panoptic, depth, normals, colorization; its heads and loss weights), only ``data.image_size`` is
512. Its data is the synthetic world rendered at 512x512 into a temporary folder (two batches'
worth of images; the endless training sampler draws the batches from them, augmentation on). The training
step is the pipeline's own (``engine.trainer.train_step``: forward, losses, backward, clipping,
the configured optimizer; ``train.precision`` resolved as training does, i.e. bf16 autocast on
CUDA, fp32 on CPU; channels-last as training runs it). After ``--warmup`` untimed steps,
``--steps`` steps are timed on batches read beforehand (reading is not timed); ``images_per_s``
is over the whole timed window, ``images_per_s_median_step`` from the median step (robust to
another process taking the cores for a while on a shared machine), ``images_per_s_fastest_step``
from the fastest (the least disturbed; compare ``loadavg_1min_*`` with the core count).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed window (reset after the
warm-up); on CPU the max RSS of the measuring process (``resource.getrusage``, a high-water mark
of the whole process: model, optimizer state, batches, activations). The measurement runs in its
own process so rendering does not count.

    python benchmarks/train_512.py [--steps 8] [--warmup 2] [--batch-size N] [--device cpu|cuda]
        [--set KEY=VALUE ...] [--out benchmarks/results/train_512.json]

``--batch-size`` defaults to ``train.batch_size`` of params.yaml (8), on CPU and CUDA alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import cpu_description  # noqa: E402  (benchmarks/machine.py)

from pipeline.io import atomic_write_json  # noqa: E402

SIZE = 512
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_512.json"


def overrides(data_root: str, device: str, batch_size: int, extra: list[str]) -> list[str]:
    return [f"data.root={data_root}", f"data.image_size={SIZE}", f"data.synthetic.image_size={SIZE}",
            "data.num_workers=0", f"train.batch_size={batch_size}", f"train.device={device}",
            "tracking.enabled=false", *extra]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in the child process: time ``args.steps`` train steps after ``args.warmup``."""
    from pipeline.config import load_config
    from pipeline.engine.loaders import train_dataset, train_loader
    from pipeline.engine.precision import configure_backends, resolve_precision
    from pipeline.engine.trainer import build_optimizer, train_step
    from pipeline.model import build_model

    device = torch.device(args.device)
    cfg = load_config(args.params, overrides(args.measure, args.device, args.batch_size, args.overrides))
    configure_backends(device=device, tf32=cfg.train.tf32, deterministic=False)
    precision = resolve_precision(cfg.train.precision, device)
    dataset = train_dataset(cfg)
    it = iter(train_loader(cfg, dataset, start_step=0))
    batches = [next(it) for _ in range(args.warmup + args.steps)]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, dataset.card).to(device).use_channels_last(cfg.train.channels_last)  # type: ignore[attr-defined]
    model.backbone.activation_checkpointing = cfg.train.activation_checkpointing  # as the trainer
    model.train()
    optimizer = build_optimizer(cfg, model)
    scaler = precision.scaler() if precision.needs_scaler else None

    def step(batch: dict[str, Any]) -> None:
        # the batch as the trainer passes it: the model moves what it uses to its device
        train_step(model, batch, optimizer, clip_grad_norm=cfg.train.clip_grad_norm,
                   precision=precision, scaler=scaler)

    for batch in batches[:args.warmup]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for batch in batches[args.warmup:]:
        t0 = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = sum(times)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"
    return {
        "tasks": list(cfg.model.tasks), "backbone": cfg.model.backbone,
        "fpn_channels": cfg.model.fpn_channels, "heads": cfg.model.heads,
        "optimizer": cfg.train.optimizer, "precision": precision.name,
        "channels_last": cfg.train.channels_last, "batch_size": cfg.train.batch_size,
        "images_per_s": round(args.steps * cfg.train.batch_size / seconds, 3),
        "seconds_per_step": round(seconds / args.steps, 3),
        "seconds_per_step_all": [round(t, 3) for t in times],
        "seconds_per_step_median": round(statistics.median(times), 3),
        "images_per_s_median_step": round(cfg.train.batch_size / statistics.median(times), 3),
        "seconds_per_step_min": round(min(times), 3),
        "images_per_s_fastest_step": round(cfg.train.batch_size / min(times), 3),
        "peak_memory_mib": round(peak, 1), "peak_memory_kind": kind,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # child: the rendered data root
    args = ap.parse_args(argv)
    if args.batch_size is None:
        from pipeline.config import load_config

        args.batch_size = load_config(args.params).train.batch_size
    if args.measure:
        result = measure(args)
        print(json.dumps(result))
        return result

    from pipeline.data.synthetic import write_synthetic_dataset

    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train512-") as tmp:
        root = Path(tmp) / "synthetic"
        n = 2 * args.batch_size  # the loader cycles (endless sampler): batches repeat images
        t0 = time.perf_counter()
        write_synthetic_dataset(root, num_train=n, num_val=1, image_size=SIZE, seed=0,
                                workers=min(2, os.cpu_count() or 1))
        render_s = time.perf_counter() - t0
        cmd = [sys.executable, __file__, "--measure", str(root), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
               "--device", args.device, "--params", args.params,
               *(f"--set={o}" for o in args.overrides)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(proc.returncode)
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {
        "benchmark": "train_512",
        "command": "python benchmarks/train_512.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "image_size": SIZE, "data": f"synthetic, {n} train images rendered at {SIZE}x{SIZE}",
        "steps": args.steps, "warmup": args.warmup, "overrides": args.overrides,
        **measured,
        "render_s": round(render_s, 1), "total_s": round(time.perf_counter() - started, 1),
        "loadavg_1min_at_start": round(load_start, 2), "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "cuda": torch.version.cuda if args.device == "cuda" else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
