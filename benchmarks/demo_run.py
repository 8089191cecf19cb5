"""The demo's budget: `densepipe run` (the whole pipeline as a Prefect flow) on the default params.

Runs in a fresh temporary folder (so the dataset is rendered and the model trained from scratch),
times it and records the metrics. Targets: under 10 minutes on 2 CPU cores and the quality targets
of ``DEFAULT_TARGETS`` (``--target`` and ``--target-seconds`` set others, e.g. for a longer
quality run). A target is ``METRIC>=VALUE`` (``METRIC=VALUE`` means the same), ``METRIC<=VALUE``
or ``METRIC>OTHER_METRIC`` (e.g. colorization PSNR above its gray-input baseline).

With ``--match-demo-time`` the overridden model gets the demo's training time on this machine
instead of its step count: after rendering the dataset, ``--calibration-steps`` training steps of
the demo's model (the default params) and of the overridden one are timed on the same machine
(``cost_split.seconds_per_step``, after 3 warm-up steps), and ``train.steps`` becomes the demo's
steps times their ratio. ``--set model.tasks=[semantic,depth,normals,colorization]
--match-demo-time`` is the dense-task model trained for as long as the demo trains.

    python benchmarks/demo_run.py [--out benchmarks/results/demo_run.json] [--set KEY=VALUE ...]
        [--target instance/segm_AP>=0.30 ...] [--target-seconds 600]
        [--match-demo-time [--calibration-steps 12]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_description  # benchmarks/machine.py

from pipeline.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGETS = ("depth/delta1>=0.80", "normals/mean_angle<=20", "colorization/psnr>colorization/psnr_gray")


def check_target(target: str, metrics: dict[str, float]) -> bool:
    """Whether ``metrics`` meet ``target`` (see the module doc); a missing metric fails it."""
    for op in (">=", "<=", "=", ">"):
        if op in target:
            key, rhs = (s.strip() for s in target.split(op, 1))
            break
    else:
        raise SystemExit(f"--target {target!r}: expected METRIC>=VALUE, METRIC<=VALUE or METRIC>METRIC")
    if key not in metrics:
        return False
    if op == ">":
        return rhs in metrics and metrics[key] > metrics[rhs]
    value = float(rhs)
    return metrics[key] <= value if op == "<=" else metrics[key] >= value


def demo_equivalent_steps(params: Path, data_root: Path, overrides: list[str], *,
                          timed_steps: int, warmup: int = 3) -> dict[str, float | int]:
    """Training steps of the ``overrides`` model that take as long as the demo's training (the
    default params' ``train.steps``) on this machine: both models timed here, on their own
    batches (their batch sizes may differ), in the layout training uses."""
    from cost_split import first_batches, seconds_per_step  # benchmarks/cost_split.py

    from pipeline.config import load_config

    def per_step(extra: list[str]) -> tuple[float, int]:
        cfg = load_config(params, ["tracking.enabled=false", f"data.root={data_root}", *extra])
        batches, card, _ = first_batches(cfg, warmup + timed_steps)
        return seconds_per_step(cfg, card, batches, warmup=warmup)[0], cfg.train.steps

    demo_s, demo_steps = per_step([])
    model_s, _ = per_step(overrides)
    return {"demo_step_s": round(demo_s, 4), "demo_steps": demo_steps, "model_step_s": round(model_s, 4),
            "timed_steps": timed_steps, "steps": max(1, round(demo_steps * demo_s / model_s))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_run.json"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--target", dest="targets", action="append", default=[],
                    help="METRIC>=VALUE, METRIC<=VALUE or METRIC>METRIC "
                         f"(default {', '.join(DEFAULT_TARGETS)})")
    ap.add_argument("--target-seconds", type=float, default=600.0)
    ap.add_argument("--match-demo-time", action="store_true",
                    help="train the overridden model for the demo's training time, not its steps")
    ap.add_argument("--calibration-steps", type=int, default=12)
    args = ap.parse_args()
    targets = list(args.targets or DEFAULT_TARGETS)
    densepipe = str(Path(sys.executable).parent / "densepipe")
    with tempfile.TemporaryDirectory(prefix="densepipe-demo-") as tmp:
        shutil.copy(ROOT / "params.yaml", tmp)
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / ".prefect"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        overrides = list(args.overrides)
        calibration = None
        prepare_seconds = 0.0
        if args.match_demo_time:
            t0 = time.perf_counter()
            proc = subprocess.run([densepipe, "prepare"], cwd=tmp, env=env, capture_output=True, text=True)
            prepare_seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"densepipe prepare failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            calibration = demo_equivalent_steps(Path(tmp) / "params.yaml", Path(tmp) / "data" / "synthetic",
                                                overrides, timed_steps=args.calibration_steps)
            overrides.append(f"train.steps={calibration['steps']}")
        cmd = [densepipe, "run", *[a for o in overrides for a in ("--set", o)]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0 + prepare_seconds
        if proc.returncode != 0:
            sys.exit(f"densepipe run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
        log_path = Path(tmp) / "runs" / "train" / "train_log.csv"
        train_log = log_path.read_text().splitlines() if log_path.exists() else []
        train_dir = Path(tmp) / "runs" / "train"  # config.yaml is written when training starts
        train_seconds = ((train_dir / "last.pt").stat().st_mtime - (train_dir / "config.yaml").stat().st_mtime
                         if (train_dir / "last.pt").exists() else None)
    import torch

    report = {
        "benchmark": "demo_run", "command": "densepipe run (as make demo, install excluded)",
        "overrides": overrides, "seconds": round(seconds, 1),
        "match_demo_time": calibration,
        "train_seconds": None if train_seconds is None else round(train_seconds, 1),
        "target_seconds": args.target_seconds,
        "metrics": {k: v for k, v in metrics.items() if k.count("/") == 1},
        "per_class_iou": {k.split("/")[-1]: round(v, 4) for k, v in metrics.items() if "/IoU/" in k},
        "targets": targets, "meets_time": seconds < args.target_seconds,
        "meets_quality": {t: check_target(t, metrics) for t in targets},
        "train_log_tail": train_log[-3:],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_description(),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
