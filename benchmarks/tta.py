"""What multi-scale and flip inference (``evaluate.scales``, ``evaluate.flip``; ``pipeline.nn.tta``)
buys each task, and what it costs.

One run renders the synthetic world, trains a short model of the demo's seven tasks (params.yaml:
its backbone, heads and loss weights; ``--steps`` steps) or loads ``--checkpoint``, then evaluates
it on the val split with four sets of test views: ``{1.0}`` (the single prediction),
``{1.0} + flip``, ``{0.75, 1.0, 1.25}`` and ``{0.75, 1.0, 1.25} + flip``. Dense tasks average
their outputs over the views (semantic logits, depth in metres, normals, a*b*), instance and
keypoint detections are merged by NMS, panoptic fuses the combined predictions. It records each
task's main metric per set (``rows``), the change against the single prediction in the metric's
direction (``gains``: positive = better), and the time: ``predict_s_per_image`` (the model's
``predict`` alone, every view included) and ``eval_s_per_image`` (the whole evaluation pass,
metrics included), after one warm-up batch; the machine's load average is recorded before and
after, since the machine may be shared.

    python benchmarks/tta.py [--steps 200] [--checkpoint CKPT] [--data-root DIR]
        [--set KEY=VALUE ...] [--out FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
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
from pipeline.nn.tta import TestViews  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "tta.json"
VIEW_SETS = {
    "single": TestViews(scales=(1.0,), flip=False),
    "flip": TestViews(scales=(1.0,), flip=True),
    "scales": TestViews(scales=(0.75, 1.0, 1.25), flip=False),
    "scales_flip": TestViews(scales=(0.75, 1.0, 1.25), flip=True),
}
EXTRA_METRICS = ("instance/bbox_AP", "depth/delta1", "semantic/pixel_acc", "normals/within_11.25")
"""Reported besides each task's main metric."""


def base_overrides(data_root: Path, out_dir: Path, *, steps: int, smoke: bool) -> list[str]:
    values: dict[str, Any] = {
        "data.root": str(data_root), "data.synthetic.num_train": 400, "train.steps": steps,
        "train.eval_every": 0, "train.checkpoint_every": 1_000_000, "train.progress": False,
        "train.device": "cpu", "train.warmup_steps": min(50, max(1, steps // 10)),
        "train.out_dir": str(out_dir), "evaluate.num_visualizations": 0, "tracking.enabled": False,
    }
    if smoke:
        values.update({"data.synthetic.num_train": 16, "data.synthetic.num_val": 4, "data.image_size": 64,
                       "data.synthetic.image_size": 64, "train.batch_size": 4, "evaluate.batch_size": 4})
    return [f"{k}={v}" for k, v in values.items()]


def timed_predict(model: Any) -> list[float]:
    """Wrap ``model.predict`` so each call's seconds are appended to the returned list."""
    times: list[float] = []
    predict = model.predict

    def run(batch: dict[str, Any], outputs: Any = None) -> Any:
        t0 = time.perf_counter()
        result = predict(batch, outputs)
        times.append(time.perf_counter() - t0)
        return result

    model.predict = run
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--checkpoint", default=None, help="evaluate this checkpoint instead of training one")
    ap.add_argument("--data-root", default=None, help="a rendered synthetic dataset to reuse")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--smoke", action="store_true", help="seconds: 16 images at 64x64, the steps you give")
    args = ap.parse_args()
    out_path = Path(args.out) if args.out else (None if args.smoke else DEFAULT_OUT)

    from pipeline import stages
    from pipeline.engine.evaluation import evaluate_model
    from pipeline.engine.loaders import eval_dataset, eval_loader
    from pipeline.engine.trainer import load_trained_model

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="densepipe-tta-") as tmp:
        data_root = Path(args.data_root) if args.data_root else Path(tmp) / "data"
        base = base_overrides(data_root, Path(tmp) / "train", steps=args.steps, smoke=args.smoke)
        cfg = load_config(ROOT / "params.yaml", [*base, *args.overrides])
        t0 = time.perf_counter()
        if args.data_root is None:
            stages.prepare(cfg)
        prepare_s = time.perf_counter() - t0
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        train_s = None
        if checkpoint is None:
            t0 = time.perf_counter()
            stages.train(cfg)
            train_s = time.perf_counter() - t0
            checkpoint = Path(tmp) / "train" / "last.pt"
        dataset = eval_dataset(cfg)
        model, ckpt = load_trained_model(cfg, checkpoint, dataset.card)  # type: ignore[attr-defined]
        loader = eval_loader(cfg, dataset, batch_size=cfg.evaluate.batch_size)
        images = len(dataset)  # type: ignore[arg-type]
        model.predict(next(iter(loader)))  # warm-up: one-time allocations are not any set's cost
        times = timed_predict(model)
        rows: list[dict[str, Any]] = []
        for name, views in VIEW_SETS.items():
            times.clear()
            t0 = time.perf_counter()
            metrics, _ = evaluate_model(model, loader, device=torch.device("cpu"), test_views=views)
            eval_s = time.perf_counter() - t0
            keys = [f"{t}/{task.main_metric}" for t, task in model.tasks.items() if task.main_metric]
            keys += [k for k in EXTRA_METRICS if k in metrics and k not in keys]
            row = {"views": name, "scales": list(views.scales), "flip": views.flip,
                   "num_views": len(views.views),
                   "predict_s_per_image": round(sum(times) / images, 4),
                   "eval_s_per_image": round(eval_s / images, 4),
                   "metrics": {k: round(metrics[k], 5) for k in keys if k in metrics}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    load_after = os.getloadavg()

    single = rows[0]
    gains = []
    for key, value in single["metrics"].items():
        task, metric = key.split("/", 1)
        lower = metric in model.tasks[task].lower_is_better
        gain = {"metric": key, "goal": "min" if lower else "max", "single": value}
        for row in rows[1:]:
            delta = row["metrics"][key] - value
            gain[row["views"]] = round(-delta if lower else delta, 5)
        gains.append(gain)
    base_s = single["predict_s_per_image"]
    cost = {row["views"]: round(row["predict_s_per_image"] / base_s, 2) for row in rows}
    report: dict[str, Any] = {
        "benchmark": "tta",
        "command": "python benchmarks/tta.py " + " ".join(sys.argv[1:]),
        "smoke": args.smoke, "steps": int(ckpt["step"]), "tasks": list(model.tasks),
        "overrides": args.overrides, "checkpoint": args.checkpoint,
        "settings": "params.yaml (the demo's backbone, heads and loss weights; 400 rendered training "
                    "images), tracking off; test size data.image_size (128), the val split; gains: "
                    "the change of each metric against the single prediction, positive = better "
                    "(min-goal metrics negated); cost: predict seconds per image over the single "
                    "prediction's",
        "images": images, "prepare_seconds": round(prepare_s, 1),
        "train_seconds": None if train_s is None else round(train_s, 1),
        "rows": rows, "gains": gains, "cost_ratio": cost,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "device": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_path, report)
        print(f"wrote {out_path}")
    print(json.dumps({k: report[k] for k in ("gains", "cost_ratio")}, indent=2))


if __name__ == "__main__":
    main()
