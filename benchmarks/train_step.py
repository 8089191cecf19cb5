"""Training-step speed: the pipeline's step vs a bare PyTorch loop over the same modules.

Both variants train the same resnet18-FPN backbone and Panoptic-FPN semantic head on the same
in-memory uint8 batches (128x128, batch 8) with AdamW and gradient clipping; the pipeline variant
goes through ``MultiTaskModel`` (views, task losses, loss weighting) and ``engine.trainer.train_step``.
A third variant is the reference point of the issue: backbone + a 1x1 head on p2.
Each variant runs in its own process so its peak memory (max RSS, or CUDA max allocated) is its own.

    python benchmarks/train_step.py [--steps 30] [--device cpu|cuda] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_CLASSES, SIZE, BATCH = 7, 128, 8


def _batches(n: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        out.append({
            "image": torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), generator=g, dtype=torch.uint8),
            "semantic": torch.randint(0, NUM_CLASSES, (BATCH, SIZE, SIZE), generator=g),
            "has": {"semantic": torch.ones(BATCH, dtype=torch.bool)},
        })
    return out


def _card():
    from pipeline.data.card import ClassInfo, DatasetCard

    return DatasetCard("bench", [ClassInfo(i + 1, f"c{i}", (i, i, i), i > 2) for i in range(NUM_CLASSES)])


def run_variant(variant: str, steps: int, warmup: int, device: torch.device) -> dict:
    from pipeline.config import load_config
    from pipeline.engine.trainer import train_step
    from pipeline.model import PIXEL_MEAN, PIXEL_STD, build_model
    from pipeline.nn import SemanticFPNHead, build_backbone

    torch.manual_seed(0)
    batches = _batches(4, device)
    if variant == "pipeline":
        cfg = load_config(None, ["train.device=" + device.type])
        model = build_model(cfg, _card()).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(b: dict) -> None:
            b = {**b, "semantic": b["semantic"].to(device)}
            train_step(model, b, opt, clip_grad_norm=5.0)
    else:
        backbone = build_backbone("resnet18", fpn_channels=128)
        if variant == "bare":
            head: nn.Module = SemanticFPNHead(backbone.feature_spec, num_outputs=NUM_CLASSES, conv_dims=128)
        else:
            head = nn.Conv2d(128, NUM_CLASSES, 1)
        net = nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)

        def step(b: dict) -> None:
            x = (b["image"].to(device).float() - mean) / std
            feats = net["backbone"](x)
            if variant == "bare":
                logits = net["head"](feats, output_size=(SIZE, SIZE))
            else:
                logits = F.interpolate(net["head"](feats["p2"]), size=(SIZE, SIZE), mode="bilinear")
            loss = F.cross_entropy(logits, b["semantic"].to(device), ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()

    for i in range(warmup):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "images_per_s": steps * BATCH / seconds,
            "seconds_per_step": seconds / steps, "peak_memory_mib": peak,
            "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process max RSS"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.warmup, device)))
        return
    results = {}
    # interleave the two compared variants twice to even out machine noise
    for variant in ("bare", "pipeline", "bare", "pipeline", "reference_1x1"):
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--device", args.device],
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        best = results.get(variant)
        if best is None or r["images_per_s"] > best["images_per_s"]:
            results[variant] = r
    overhead = results["bare"]["images_per_s"] / results["pipeline"]["images_per_s"] - 1
    report = {
        "benchmark": "train_step", "image_size": SIZE, "batch_size": BATCH, "steps": args.steps,
        "backbone": "resnet18-FPN (128 ch)", "head": "Panoptic FPN semantic branch (128 ch)",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else
        f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "results": results, "pipeline_overhead": overhead, "target_overhead": 0.10,
        "meets_target": overhead < 0.10,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
