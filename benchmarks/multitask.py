"""What the shared backbone buys: one multi-task model against one model per task, side by side.

One run trains, on the same rendered synthetic data and with the same settings (params.yaml, the
demo's backbone and heads, ``--steps`` steps each), the multi-task model of ``--tasks`` (default
semantic + depth + normals + colorization, one optimizer, the configured loss weights) and then
one single-task model per task, and evaluates each on the synthetic val split. It records:

- cost: each model's training time (the training loop alone, from ``stages.train``'s throughput;
  the final evaluation is timed apart) and ``cost_ratio`` = multi-task time / the sum of the
  single-task times (target <= 0.5).
- quality: Delta_m (Vandenhende et al. 2021; ``pipeline.metrics.multitask``) over each task's
  main metric (semantic mIoU, depth rmse, normals mean angle, colorization PSNR), in percent
  (target >= -2 %), with each task's row.

Colorization runs the shared backbone on the gray view, a second backbone pass in the multi-task
model: with ``B`` the cost of a backbone pass, ``h`` of a head and ``L`` of reading a batch, the
ratio is about ``(L + 2B + 4h) / (4L + 4B + 4h)``, which is above 0.5 unless ``L >= 2h``.

    python benchmarks/multitask.py [--steps 300] [--tasks semantic,depth,normals,colorization]
        [--set KEY=VALUE ...] [--multi-set KEY=VALUE ...] [--out FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import json
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

from pipeline.config import load_config  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "multitask.json"
DEFAULT_TASKS = ("semantic", "depth", "normals", "colorization")
TARGET_COST_RATIO, TARGET_DELTA_M = 0.5, -2.0


def base_overrides(data_root: Path, *, steps: int, smoke: bool) -> list[str]:
    values: dict[str, Any] = {
        "data.root": str(data_root), "train.steps": steps, "train.eval_every": 0,
        "train.checkpoint_every": 1_000_000, "train.progress": False, "train.device": "cpu",
        "train.warmup_steps": min(50, max(1, steps // 10)), "evaluate.num_visualizations": 0,
        "tracking.enabled": False,
    }
    if smoke:
        values.update({"data.synthetic.num_train": 16, "data.synthetic.num_val": 4, "data.image_size": 64,
                       "data.synthetic.image_size": 64, "train.batch_size": 4, "evaluate.batch_size": 4})
    return [f"{k}={v}" for k, v in values.items()]


def train_one(base: list[str], tasks: list[str], out_dir: Path, extra: list[str]) -> dict[str, Any]:
    """Train and evaluate the model of ``tasks``; its times and metrics."""
    from pipeline import stages

    cfg = load_config(ROOT / "params.yaml", [*base, *extra, f"model.tasks=[{','.join(tasks)}]",
                                             f"train.out_dir={out_dir}"])
    t0 = time.perf_counter()
    result = stages.train(cfg)
    wall = time.perf_counter() - t0
    train_s = cfg.train.steps * cfg.train.batch_size / max(result["images_per_s"], 1e-9)
    return {"tasks": tasks, "steps": cfg.train.steps, "train_seconds": round(train_s, 2),
            "wall_seconds_with_final_eval": round(wall, 2),
            "images_per_s": round(result["images_per_s"], 2),
            "metrics": {k: round(v, 5) for k, v in result["metrics"].items() if k.count("/") == 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--multi-set", dest="multi_overrides", action="append", default=[],
                    help="KEY=VALUE for the multi-task model only (e.g. train.loss_weighting.method=dwa)")
    ap.add_argument("--data-root", default=None, help="a rendered synthetic dataset to reuse")
    ap.add_argument("--out", default=None, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--smoke", action="store_true", help="seconds: 16 images at 64x64, the steps you give")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    out_path = Path(args.out) if args.out else (None if args.smoke else DEFAULT_OUT)

    from pipeline import stages
    from pipeline.metrics.multitask import multitask_delta
    from pipeline.registry import default_registry

    registry = default_registry()
    with tempfile.TemporaryDirectory(prefix="densepipe-multitask-") as tmp:
        data_root = Path(args.data_root) if args.data_root else Path(tmp) / "data"
        base = base_overrides(data_root, steps=args.steps, smoke=args.smoke)
        t0 = time.perf_counter()
        stages.prepare(load_config(ROOT / "params.yaml", [*base, *args.overrides]))
        prepare_s = time.perf_counter() - t0
        print(f"== multi-task: {', '.join(tasks)}", flush=True)
        multi = train_one(base, tasks, Path(tmp) / "multi", [*args.overrides, *args.multi_overrides])
        print(json.dumps(multi), flush=True)
        singles: dict[str, dict[str, Any]] = {}
        for task in tasks:
            print(f"== single-task: {task}", flush=True)
            singles[task] = train_one(base, [task], Path(tmp) / task, args.overrides)
            print(json.dumps(singles[task]), flush=True)

    single_total = sum(s["train_seconds"] for s in singles.values())
    delta, rows = multitask_delta(multi["metrics"], {t: s["metrics"] for t, s in singles.items()},
                                  [registry.get(t) for t in tasks])
    report: dict[str, Any] = {
        "benchmark": "multitask",
        "command": "python benchmarks/multitask.py " + " ".join(sys.argv[1:]),
        "smoke": args.smoke, "tasks": tasks, "steps": args.steps, "overrides": args.overrides,
        "multi_overrides": args.multi_overrides,
        "settings": "params.yaml (the demo's backbone, heads and loss weights), tracking off, "
                    "evaluation once at the end; every model trained for the same steps",
        "prepare_seconds": round(prepare_s, 1),
        "cost_ratio": round(multi["train_seconds"] / single_total, 4),
        "single_total_train_seconds": round(single_total, 2),
        "delta_m_percent": round(delta, 3),
        "delta_m_rows": [{"task": r.task, "metric": r.metric, "goal": r.goal, "single": r.single,
                          "multi": r.multi, "relative_percent": round(100 * r.relative, 3)} for r in rows],
        "targets": {"cost_ratio_at_most": TARGET_COST_RATIO, "delta_m_percent_at_least": TARGET_DELTA_M},
        "multi": multi, "singles": singles,
        "device": cpu_description(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    report["meets_cost"] = report["cost_ratio"] <= TARGET_COST_RATIO
    report["meets_delta_m"] = delta >= TARGET_DELTA_M
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_path, report)
        print(f"wrote {out_path}")
    print(json.dumps({k: report[k] for k in ("cost_ratio", "delta_m_percent", "delta_m_rows")}, indent=2))


if __name__ == "__main__":
    main()
