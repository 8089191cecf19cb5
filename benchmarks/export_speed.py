"""Inference speed of the dense-task model: PyTorch eager vs the exported ONNX graph in onnxruntime.

The model is params.yaml's (backbone, FPN and head settings) with its four dense tasks (semantic,
depth, normals, colorization), random weights (speed does not depend on them), exported with
``pipeline.export.export_onnx`` at 512x512 into a temporary folder. Both sides run the same
computation: ``DenseExportModule`` (normalisation, one backbone pass per view, every head and its
outputs) on float32 images, on the CPU, with the same number of threads (``--threads``; torch's
intra-op threads and onnxruntime's ``intra_op_num_threads``). For batch 1 and 4 the two are timed in
interleaved rounds (one forward each per round, after ``--warmup`` each); images/s is the batch size
over the median time of a forward (the best one is kept too: the machine is shared). The largest
difference between the two outputs at 512x512 is recorded as well.

    python benchmarks/export_speed.py [--rounds 5] [--warmup 1] [--threads 2] [--out FILE.json]
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import cpu_description  # noqa: E402  (benchmarks/machine.py)

from pipeline.config import load_config  # noqa: E402
from pipeline.data.synthetic.spec import synthetic_card  # noqa: E402
from pipeline.export import DenseExportModule, export_onnx  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.registry import default_registry  # noqa: E402

DENSE = ("semantic", "depth", "normals", "colorization")
SIZE = 512
BATCHES = (1, 4)


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export_speed.json")
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    cfg = load_config(REPO / "params.yaml", [f"model.tasks=[{','.join(DENSE)}]"])
    torch.manual_seed(0)
    model = build_model(cfg, synthetic_card(SIZE), default_registry()).eval()
    module = DenseExportModule(model, tasks=DENSE).eval()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = export_onnx(model, Path(tmp) / "dense.onnx", tasks=DENSE, image_size=SIZE)
        export_s = time.perf_counter() - t0
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
        size_mb = report.path.stat().st_size / 1e6

    results: dict[str, Any] = {}
    max_diff: dict[str, float] = {}
    for batch in BATCHES:
        images = torch.randint(0, 256, (batch, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(batch),
                               dtype=torch.uint8).float()
        feed = {"image": images.numpy()}
        with torch.no_grad():
            for _ in range(args.warmup):
                module(images)
                session.run(None, feed)
            eager_s, onnx_s = [], []
            for r in range(args.rounds):  # interleaved, alternating order
                runs = [("eager", lambda x=images: module(x)), ("onnx", lambda f=feed: session.run(None, f))]
                for name, fn in runs if r % 2 == 0 else runs[::-1]:
                    (eager_s if name == "eager" else onnx_s).append(_timed(fn))
            ref = module(images)
        got = session.run(None, feed)
        for name, g, e in zip([o["name"] for o in report.outputs], got, ref, strict=True):
            max_diff[name] = max(max_diff.get(name, 0.0), float((torch.from_numpy(g) - e).abs().max()))
        results[f"batch_{batch}"] = {
            "pytorch_eager_images_per_s": round(batch / statistics.median(eager_s), 2),
            "onnxruntime_images_per_s": round(batch / statistics.median(onnx_s), 2),
            "onnxruntime_over_eager": round(statistics.median(eager_s) / statistics.median(onnx_s), 2),
            "pytorch_eager_best_images_per_s": round(batch / min(eager_s), 2),
            "onnxruntime_best_images_per_s": round(batch / min(onnx_s), 2),
            "seconds_per_forward": {"pytorch_eager": [round(s, 4) for s in eager_s],
                                    "onnxruntime": [round(s, 4) for s in onnx_s]},
        }
        print(f"batch {batch}: eager {results[f'batch_{batch}']['pytorch_eager_images_per_s']} img/s, "
              f"onnxruntime {results[f'batch_{batch}']['onnxruntime_images_per_s']} img/s", flush=True)

    result = {
        "benchmark": "export_speed",
        "what": "inference images/s at 512x512 on CPU of the four dense tasks: PyTorch eager "
                "(DenseExportModule) vs the exported ONNX graph in onnxruntime (CPUExecutionProvider)",
        "command": "python benchmarks/export_speed.py",
        "image_size": SIZE,
        "batch_sizes": list(BATCHES),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "statistic": "images/s = batch / median seconds per forward, interleaved rounds (best also given)",
        "model": {"backbone": cfg.model.backbone, "fpn_channels": cfg.model.fpn_channels,
                  "tasks": list(DENSE), "heads": {t: cfg.model.heads.get(t, {}) for t in DENSE},
                  "weights": "random (speed only)"},
        "export": {"seconds": round(export_s, 1), "opset": report.opset, "exporter": report.exporter,
                   "file_mb": round(size_mb, 1), "fixed_size_reason": report.fixed_size_reason,
                   "input_shape": report.inputs[0]["shape"]},
        "max_abs_diff_512": {k: float(f"{v:.3g}") for k, v in max_diff.items()},
        "results": results,
        "machine": {"device": cpu_description(), "threads": args.threads, "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                    "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
                    "note": "a 2-core machine shared with other developers' processes while measured"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
