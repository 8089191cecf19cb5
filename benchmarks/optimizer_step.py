"""One optimizer step in torch's three implementations, on the parameters of real models.

``build_optimizer`` uses torch's fused SGD / AdamW kernels where every parameter is on a CPU or
CUDA device; this measures what that buys against torch's default (the per-tensor loop on a
CPU) and ``foreach``, for AdamW and SGD with momentum, on ResNet-18 (the semantic-only model's
backbone) and ResNet-50, with random gradients. Also the gradient clipping every step does.
Median of ``--repeats`` steps after 3 untimed ones; milliseconds per step.

    python benchmarks/optimizer_step.py [--device cpu|cuda] [--repeats 30]
        [--out benchmarks/results/optimizer_step.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torchvision  # noqa: E402
from machine import cpu_description  # noqa: E402  (benchmarks/machine.py)

from pipeline.io import atomic_write_json  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "optimizer_step.json"
IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def median_ms(fn: Any, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 3)


def measure(name: str, device: torch.device, repeats: int) -> dict[str, Any]:
    model = getattr(torchvision.models, name)().to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    row: dict[str, Any] = {"model": name, "parameters": sum(p.numel() for p in params),
                           "tensors": len(params)}
    for opt_name, make in (("adamw", lambda **kw: torch.optim.AdamW(params, lr=1e-4, **kw)),
                           ("sgd", lambda **kw: torch.optim.SGD(params, lr=1e-4, momentum=0.9, **kw))):
        for impl, kw in IMPLEMENTATIONS.items():
            row[f"{opt_name}_{impl}_ms"] = median_ms(make(**kw).step, device, repeats)
        default, fused = row[f"{opt_name}_default_ms"], row[f"{opt_name}_fused_ms"]
        row[f"{opt_name}_fused_speedup"] = round(default / fused, 2)
    row["clip_grad_norm_ms"] = median_ms(lambda: torch.nn.utils.clip_grad_norm_(params, 5.0), device, repeats)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure(m, device, args.repeats) for m in args.models.split(",") if m]
    command = " ".join(argv if argv is not None else sys.argv[1:])
    report = {"benchmark": "optimizer_step", "command": f"python benchmarks/optimizer_step.py {command}",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats,
              "rows": rows}
    atomic_write_json(args.out, report)
    for r in rows:
        print(r)
    return report


if __name__ == "__main__":
    main()
