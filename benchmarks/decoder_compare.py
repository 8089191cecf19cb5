"""Every dense decoder on the same backbone, in one run: size, cost, speed and quality.

For each row (decoder, backbone, output stride) the semantic-only model is built exactly as
``densepipe train`` builds it (``pipeline.model.build_model`` with ``--set`` style overrides of
``params.yaml``), then:

- ``params_total``: parameters of the trained model (backbone body + FPN + decoder);
  ``params_used``: those that receive a gradient (the FPN is unused by decoders that read body
  levels only); ``params_decoder``: the decoder's.
- ``gflops_total`` / ``gflops_decoder`` / ``gflops_fpn``: GFLOPs of one 1x3x128x128 forward pass
  counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; FLOPs
  = 2 x multiply-adds; pooling, interpolation and unpooling are not counted).
- ``train_images_per_s``: CPU training throughput of the timed run (``stages.train``'s figure).
- ``mIoU``: semantic mIoU on the synthetic val split after the same fixed CPU budget: the number
  of steps is the budget (``--budget-s``) times the throughput measured in a short calibration,
  divided by the batch size, so every decoder gets a complete schedule (warm-up, poly decay) in
  about the same training time; ``train_seconds`` records the time it actually took.

Backbone: resnet18 (FPN 64 channels, random init, as the project's default settings) for every
decoder, at output stride 32, except where the decoder is defined on a dilated front-end
(``aspp``: required; ``context_*``: Yu and Koltun's front-end, output stride 8), and ``segnet``,
which needs an encoder that returns its pooling indices (``vgg11_bn``; ``panoptic_fpn`` on
``vgg11_bn`` is the reference row for that backbone). Training settings are params.yaml's (poly,
batch 8, 128x128 crops, the semantic head's ``norm: BN``) with ``model.tasks=[semantic]`` and SGD lr 0.1
(pinned: the recorded results predate the AdamW default).

    python benchmarks/decoder_compare.py [--budget-s 240] [--decoders fcn8s,aspp] [--out FILE]
        [--data-root DIR]
    python benchmarks/decoder_compare.py --smoke     # seconds: 2 decoders, tiny data and budget

Results: ``benchmarks/results/decoder_compare.json`` and a Markdown table on stdout
(docs/benchmarks.md renders it from the JSON: ``docs/gen_benchmarks.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

from pipeline.config import Config, load_config  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "decoder_compare.json"
BACKBONE = "resnet18"
DILATED = {"aspp": 8, "context_basic": 8, "context_large": 8}
# (decoder, backbone, output stride), in table order
ROWS: list[tuple[str, str, int]] = [
    ("fcn32s", BACKBONE, 32), ("fcn16s", BACKBONE, 32), ("fcn8s", BACKBONE, 32), ("unet", BACKBONE, 32),
    ("hypercolumns", BACKBONE, 32), ("psp", BACKBONE, 32), ("panoptic_fpn", BACKBONE, 32),
    ("context_basic", BACKBONE, 8), ("context_large", BACKBONE, 8), ("aspp", BACKBONE, 8),
    ("segnet", "vgg11_bn", 32), ("panoptic_fpn", "vgg11_bn", 32),
]
FLOP_SIZE = 128
SETTINGS = ("params.yaml with model.tasks=[semantic] (fpn_channels 64, semantic head norm BN, SGD lr 0.1 "
            "poly, batch 8, 128x128 crops); every decoder with its default options")
CALIBRATION_STEPS = (2, 6)  # warm-up steps, timed steps


def base_overrides(data_root: Path, out_dir: Path, *, smoke: bool) -> list[str]:
    values: dict[str, Any] = {
        "data.root": str(data_root), "data.num_workers": 0, "model.tasks": "[semantic]",
        "train.eval_every": 0, "train.checkpoint_every": 1000000, "train.progress": False,
        "train.device": "cpu", "train.out_dir": str(out_dir), "evaluate.num_visualizations": 0,
        "tracking.enabled": False,
        "train.optimizer": "sgd", "train.lr": 0.1,  # the settings decoder_compare.json was measured with
    }
    if smoke:
        values.update({"data.synthetic.num_train": 16, "data.synthetic.num_val": 4, "data.image_size": 64,
                       "data.synthetic.image_size": 64, "train.batch_size": 4, "train.warmup_steps": 1,
                       "evaluate.batch_size": 4})
    return [f"{k}={v}" for k, v in values.items()]


def row_config(base: list[str], decoder: str, backbone: str, output_stride: int, **extra: Any) -> Config:
    overrides = [*base, f"model.backbone={backbone}", f"model.output_stride={output_stride}",
                 f"model.heads={{semantic: {{conv_dims: 64, norm: BN, decoder: {decoder}}}}}"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(ROOT / "params.yaml", overrides)


def measure_static(cfg: Config, card: Any) -> dict[str, Any]:
    """Parameters (total, used, decoder) and GFLOPs of one 128x128 forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg, card)
    batch = {"image": torch.randint(0, 256, (2, 3, FLOP_SIZE, FLOP_SIZE), dtype=torch.uint8),
             "semantic": torch.randint(0, card.num_classes, (2, FLOP_SIZE, FLOP_SIZE))}
    model.train()
    model.total_loss(model.losses(model(batch), batch)).backward()
    used = sum(p.numel() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model({"image": batch["image"][:1]})
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return {
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_used": used,
        "params_decoder": sum(p.numel() for p in model.heads["semantic"].parameters()),
        "gflops_total": round(counter.get_total_flops() / 1e9, 3),
        "gflops_decoder": round(counts.get("MultiTaskModel.heads.semantic", 0) / 1e9, 3),
        "gflops_fpn": round(counts.get("MultiTaskModel.backbone.fpn", 0) / 1e9, 3),
    }


def calibrate(cfg: Config) -> float:
    """Training images/s over a few steps of the real model, optimizer and loader."""
    from pipeline.engine.loaders import train_dataset, train_loader
    from pipeline.engine.trainer import build_optimizer, seed_everything, train_step
    from pipeline.model import build_model

    seed_everything(cfg.train.seed)
    ds = train_dataset(cfg)
    model = build_model(cfg, ds.card).use_channels_last(cfg.train.channels_last).train()  # type: ignore[attr-defined]
    optimizer = build_optimizer(cfg, model)
    loader = iter(train_loader(cfg, ds, start_step=0))
    warm, timed = CALIBRATION_STEPS
    for _ in range(warm):
        train_step(model, next(loader), optimizer, clip_grad_norm=cfg.train.clip_grad_norm)
    t0 = time.perf_counter()
    for _ in range(timed):
        train_step(model, next(loader), optimizer, clip_grad_norm=cfg.train.clip_grad_norm)
    return timed * cfg.train.batch_size / (time.perf_counter() - t0)


def run_row(base: list[str], decoder: str, backbone: str, output_stride: int, *, budget_s: float,
            card: Any, out_dir: Path) -> dict[str, Any]:
    from pipeline import stages

    row: dict[str, Any] = {"decoder": decoder, "backbone": backbone, "output_stride": output_stride}
    cfg = row_config(base, decoder, backbone, output_stride)
    row.update(measure_static(cfg, card))
    ips = calibrate(cfg)
    steps = max(1, round(budget_s * ips / cfg.train.batch_size))
    row["calibrated_images_per_s"] = round(ips, 2)
    row["steps"] = steps
    cfg = row_config(base, decoder, backbone, output_stride, **{
        "train.steps": steps, "train.warmup_steps": min(cfg.train.warmup_steps, max(1, steps // 10)),
        "train.out_dir": str(out_dir / f"{decoder}-{backbone}-os{output_stride}")})
    t0 = time.perf_counter()
    result = stages.train(cfg)
    row["train_seconds_with_final_eval"] = round(time.perf_counter() - t0, 1)
    row["train_seconds"] = round(steps * cfg.train.batch_size / max(result["images_per_s"], 1e-9), 1)
    row["train_images_per_s"] = round(result["images_per_s"], 2)
    metrics = result["metrics"]
    row["mIoU"] = round(metrics["semantic/mIoU"], 4)
    row["pixel_acc"] = round(metrics["semantic/pixel_acc"], 4)
    return row


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Budget {report['budget_s']:.0f} s of CPU training per decoder ({report['device']}, "
        f"{report['threads']} threads); GFLOPs of one {FLOP_SIZE}x{FLOP_SIZE} forward pass.",
        "",
        "| decoder | backbone (output stride) | params total / used / decoder (M) | GFLOPs total / decoder "
        "| train img/s | steps | mIoU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| `{r['decoder']}` | {r['backbone']} ({r['output_stride']}) | failed: "
                         f"{r['error']} | | | | |")
            continue
        lines.append(
            f"| `{r['decoder']}` | {r['backbone']} ({r['output_stride']}) | "
            f"{r['params_total'] / 1e6:.2f} / {r['params_used'] / 1e6:.2f} / "
            f"{r['params_decoder'] / 1e6:.2f} | "
            f"{r['gflops_total']:.2f} / {r['gflops_decoder']:.2f} | {r['train_images_per_s']:.1f} | "
            f"{r['steps']} | {r['mIoU']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=240.0, help="CPU training seconds per decoder")
    ap.add_argument("--decoders", default=None,
                    help="comma-separated decoder names (rows of those decoders only)")
    ap.add_argument("--data-root", default=None, help="a rendered synthetic dataset to reuse")
    ap.add_argument("--out", default=None, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--smoke", action="store_true",
                    help="prove it works in seconds: fcn32s and aspp, 16 images at 64x64, 3 s budget")
    args = ap.parse_args()

    rows = ROWS
    budget = args.budget_s
    if args.smoke:
        rows = [r for r in ROWS if r[0] in ("fcn32s", "aspp")]
        budget = min(budget, 3.0)
    if args.decoders:
        wanted = args.decoders.split(",")
        rows = [r for r in rows if r[0] in wanted]
        if not rows:
            sys.exit(f"no row for {wanted}; decoders: {', '.join(sorted({r[0] for r in ROWS}))}")
    out_path = Path(args.out) if args.out else (None if args.smoke else DEFAULT_OUT)

    from pipeline import stages
    from pipeline.data.card import DatasetCard

    with tempfile.TemporaryDirectory(prefix="densepipe-decoders-") as tmp:
        data_root = Path(args.data_root) if args.data_root else Path(tmp) / "data"
        base = base_overrides(data_root, Path(tmp) / "runs", smoke=args.smoke)
        t0 = time.perf_counter()
        stages.prepare(load_config(ROOT / "params.yaml", base))
        prepare_s = time.perf_counter() - t0
        card = DatasetCard.load(data_root / "meta.json")
        results = []
        for decoder, backbone, output_stride in rows:
            print(f"== {decoder} on {backbone} (output stride {output_stride})", flush=True)
            try:
                row = run_row(base, decoder, backbone, output_stride, budget_s=budget, card=card,
                              out_dir=Path(tmp) / "runs")
            except Exception as exc:  # record and go on: one failing decoder must not lose the others
                traceback.print_exc()
                row = {"decoder": decoder, "backbone": backbone, "output_stride": output_stride,
                       "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:200]}
            print(json.dumps(row), flush=True)
            results.append(row)

    report = {
        "benchmark": "decoder_compare",
        "command": "python benchmarks/decoder_compare.py " + " ".join(sys.argv[1:]),
        "smoke": args.smoke, "budget_s": budget, "flop_input": [1, 3, FLOP_SIZE, FLOP_SIZE],
        "settings": SETTINGS + (" (smoke: 16 images at 64x64, batch 4)" if args.smoke else ""),
        "prepare_seconds": round(prepare_s, 1),
        "device": f"cpu ({cpu_model() or platform.processor()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "rows": results,
    }
    table = markdown(report)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out_path}")
    print(table)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
