"""Peak memory and step time of training with and without ``train.activation_checkpointing``.

Runs ``benchmarks/train_512.py`` (the demo's all-task model at 512x512, the pipeline's own train
step, each measurement in its own process) alternately without and with checkpointing,
``--repeats`` times each, and writes one JSON with both and their ratios. Peak memory: on CPU the
measuring process's max RSS (a high-water mark of the whole process), on CUDA
``torch.cuda.max_memory_allocated``. Step time: the median step of each run, the median over the
repeats (the machine is shared; interleaving spreads the noise over both).

    python benchmarks/activation_checkpointing.py [--steps 3] [--warmup 1] [--batch-size 2]
        [--repeats 2] [--device cpu|cuda] [--set KEY=VALUE ...]
        [--out benchmarks/results/train_512_checkpointing.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.io import atomic_write_json  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_512_checkpointing.json"


def _run(args: argparse.Namespace, checkpointing: bool, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_512.py"), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--device",
           args.device, "--out", str(out),
           f"--set=train.activation_checkpointing={str(checkpointing).lower()}",
           *(f"--set={o}" for o in args.overrides)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override for both runs, e.g. model.backbone=resnet50")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="densepipe-ckpt-") as tmp:
        for i in range(args.repeats):
            for key in ("off", "on"):
                runs[key].append(_run(args, key == "on", Path(tmp) / f"{key}-{i}.json"))
    first = runs["off"][0]

    def summary(key: str) -> dict[str, float]:
        return {"peak_memory_mib": max(r["peak_memory_mib"] for r in runs[key]),
                "seconds_per_step_median": statistics.median(r["seconds_per_step_median"]
                                                             for r in runs[key])}

    off, on = summary("off"), summary("on")
    result = {
        "benchmark": "train_512_checkpointing",
        "command": "python benchmarks/activation_checkpointing.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": first["device"], "threads": first["threads"], "cpu_count": os.cpu_count(),
        "tasks": first["tasks"], "backbone": first["backbone"], "image_size": 512,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "overrides": args.overrides,
        "peak_memory_kind": first["peak_memory_kind"],
        "without": off, "with": on,
        "memory_ratio": round(on["peak_memory_mib"] / off["peak_memory_mib"], 3),
        "step_time_ratio": round(on["seconds_per_step_median"] / off["seconds_per_step_median"], 3),
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "total_s": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
