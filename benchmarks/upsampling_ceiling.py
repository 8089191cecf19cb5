"""How much depth accuracy a dense head loses to its output stride alone.

Takes the true depth of a split, averages its log over ``s x s`` cells (valid pixels only) as a
perfect stride-``s`` prediction would be, brings it back to full size by bilinear upsampling (the
``panoptic_fpn`` head's last step) and scores it with the Eigen metrics against the truth: the
best delta1 a head of that stride can reach with bilinear upsampling. The gap to 1 is the share of
pixels within a few pixels of a depth edge (thin things in front of walls), which convex
upsampling (``upsample: convex``) is there to recover.

    python benchmarks/upsampling_ceiling.py [--root data/synthetic] [--split val] [--max-depth 20]

Writes ``benchmarks/results/upsampling_ceiling.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from pipeline.data.reader import open_dataset  # noqa: E402
from pipeline.io import atomic_write_json  # noqa: E402
from plugins.depth.metrics import DepthMetricAccumulator  # noqa: E402


def stride_prediction(depth: torch.Tensor, valid: torch.Tensor, stride: int) -> torch.Tensor:
    """1 x 1 x H x W metres -> the truth seen at ``stride`` (mean log over valid pixels per cell),
    bilinearly upsampled back to H x W; cells without a valid pixel take the image's mean log."""
    if stride == 1:
        return depth
    logd = torch.where(valid, depth.clamp_min(1e-6).log(), torch.zeros_like(depth))
    weight = F.avg_pool2d(valid.float(), stride, ceil_mode=True)
    mean_log = F.avg_pool2d(logd, stride, ceil_mode=True) / weight.clamp_min(1e-12)
    fallback = logd[valid].mean() if valid.any() else torch.tensor(0.0)
    coarse = torch.where(weight > 0, mean_log, fallback)
    return F.interpolate(coarse, size=depth.shape[-2:], mode="bilinear", align_corners=False).exp()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(ROOT / "data" / "synthetic"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--strides", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--max-depth", type=float, default=20.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "upsampling_ceiling.json"))
    args = ap.parse_args()
    ds = open_dataset(args.root, args.split)
    results = {}
    for stride in args.strides:
        acc = DepthMetricAccumulator(max_depth=args.max_depth)
        for i in range(len(ds)):
            depth = ds[i]["depth"].float()[None, None]
            valid = torch.isfinite(depth) & (depth > 0) & (depth <= args.max_depth)
            acc.update(stride_prediction(depth, valid, stride)[0], depth[0])
        metrics = acc.compute()
        results[f"stride_{stride}"] = {k: round(float(v), 4) for k, v in metrics.items()
                                       if not (isinstance(v, float) and math.isnan(v))}
        print(f"stride {stride}: delta1 {metrics['delta1']:.4f}, abs_rel {metrics['abs_rel']:.4f}")
    atomic_write_json(Path(args.out), {
        "benchmark": "upsampling_ceiling",
        "command": "python benchmarks/upsampling_ceiling.py",
        "what": "Eigen metrics of the true depth averaged (in log) over stride x stride cells and "
                "bilinearly upsampled: the ceiling of a perfect head at that output stride",
        "data": {"root": Path(args.root).name, "split": args.split, "images": len(ds),
                 "max_depth": args.max_depth},
        "results": results,
    })


if __name__ == "__main__":
    main()
