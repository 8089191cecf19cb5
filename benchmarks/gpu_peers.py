"""GPU training speed at 512 px in bf16: the all-task model and each peer pair, with peak memory
and model FLOP utilisation (``make bench-gpu``, under 8 minutes on one GPU).

Models: the all-task demo model (``params.yaml``), the semantic-only model (library defaults,
ResNet-18) and smp's ``FPN`` on the same encoder, the instance plugin and torchvision's
``MaskRCNN`` with the same settings (``benchmarks/instance_speed.py``'s like-for-like pair,
``gpu`` preset). Each trains ``--steps`` steps after ``--warmup`` on the same batches of the
rendered synthetic world (``--size`` px, ``--batch`` images) under bf16 autocast, AdamW.
Reported per model: images/s (CUDA-synchronised wall time), peak memory
(``torch.cuda.max_memory_allocated``), FLOPs of one training step (forward + backward, counted by
``torch.utils.flop_counter.FlopCounterMode``) and MFU = FLOPs/s over the GPU's dense bf16 peak
(``PEAK_BF16_FLOPS`` by device name; null for a GPU not listed). ``--device cpu`` runs the same
code on the CPU (no MFU): what the test suite checks where no GPU is.

    python benchmarks/gpu_peers.py [--size 512] [--batch 8] [--steps 20] [--warmup 5]
        [--models all_tasks,semantic,smp_fpn,instance,torchvision_maskrcnn]
        [--out benchmarks/results/gpu_peers.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import cpu_description  # noqa: E402  (benchmarks/machine.py)

from pipeline.io import atomic_write_json  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_peers.json"
MODELS = ("all_tasks", "semantic", "smp_fpn", "instance", "torchvision_maskrcnn")
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12,
                   "H100 PCIe": 756.0e12, "H100": 756.0e12, "A100": 312.0e12, "L40S": 362.05e12,
                   "L4": 121.0e12, "A10": 125.0e12}
"""Dense (no sparsity) bf16 tensor-core peak per device-name fragment, from the vendors' data
sheets; the first fragment found in ``torch.cuda.get_device_name()`` counts (listed most
specific first)."""

Step = Callable[[dict[str, Any]], None]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a collated batch (nested lists and dicts) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch


def densepipe_step(cfg: Any, card: Any, device: torch.device) -> tuple[torch.nn.Module, Step]:
    from pipeline.engine.step import train_step
    from pipeline.engine.trainer import build_optimizer
    from pipeline.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg, card).to(device).use_channels_last(cfg.train.channels_last).train()
    optimizer = build_optimizer(cfg, model)

    def step(batch: dict[str, Any]) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            train_step(model, batch, optimizer, clip_grad_norm=cfg.train.clip_grad_norm)

    return model, step


def smp_step(cfg: Any, card: Any, device: torch.device) -> tuple[torch.nn.Module, Step]:
    import segmentation_models_pytorch as smp

    from pipeline.engine.trainer import build_optimizer
    from pipeline.model import PIXEL_MEAN, PIXEL_STD

    torch.manual_seed(0)
    model = smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=card.num_classes)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = build_optimizer(cfg, model)
    mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)

    def step(batch: dict[str, Any]) -> None:
        x = ((batch["image"].float() - mean) / std).contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), batch["semantic"], ignore_index=card.ignore_index)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    return model, step


def rcnn_steps(root: Path, card: Any, size: int,
               device: torch.device) -> dict[str, tuple[torch.nn.Module, Step]]:
    """The instance plugin and torchvision's Mask R-CNN from the same weights, stepped as
    ``instance_speed`` steps them (SGD), under bf16 autocast; built on the CPU: the caller moves
    each to ``device`` when it is measured (``Module.to`` moves the parameters in place, so the
    optimizers built before the move keep working, and the model waiting its turn does not count
    in the other's peak memory)."""
    import instance_speed as ins

    built = ins.build_all(root, card, ["plugin_sem_inst", "torchvision_sem_inst"], size=size)
    out = {}
    for name, key in (("instance", "plugin_sem_inst"), ("torchvision_maskrcnn", "torchvision_sem_inst")):
        model, plain = built[key]

        def step(batch: dict[str, Any], plain: Step = plain) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                plain(batch)

        out[name] = (model, step)
    return out


def step_flops(step: Step, batch: dict[str, Any]) -> int:
    """FLOPs of one training step (forward + backward; the optimizer's elementwise work is not
    counted, as MFU conventions do)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return int(counter.get_total_flops())


def measure(name: str, step: Step, batches: list[dict[str, Any]], *, warmup: int, steps: int,
            device: torch.device, batch_size: int) -> dict[str, Any]:
    for i in range(warmup):
        step(batches[i % len(batches)])
    flops = step_flops(step, batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = peak_flops(device)
    achieved = flops * steps / seconds
    return {"model": name, "images_per_s": round(steps * batch_size / seconds, 2),
            "seconds_per_step": round(seconds / steps, 4),
            "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda" else None,
            "step_tflops": round(flops / 1e12, 3), "achieved_tflops_per_s": round(achieved / 1e12, 2),
            "mfu": round(achieved / peak, 4) if peak else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_peers.py: no CUDA device here (torch.cuda.is_available() is false); "
                         "--device cpu runs the same code on the CPU")

    from pipeline import stages
    from pipeline.config import load_config
    from pipeline.engine.loaders import train_dataset, train_loader

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="densepipe-gpu-peers-") as tmp:
        root = Path(tmp) / "data"
        base = [f"data.root={root}", f"data.image_size={args.size}", f"data.synthetic.image_size={args.size}",
                f"data.synthetic.num_train={args.batch * 4}", "data.synthetic.num_val=2",
                f"train.batch_size={args.batch}", f"train.device={device.type}", "tracking.enabled=false",
                "data.num_workers=0"]
        demo = load_config(ROOT / "params.yaml", base)
        stages.prepare(demo)
        dataset = train_dataset(demo)
        card = dataset.card  # type: ignore[attr-defined]
        loader = iter(train_loader(demo, dataset, start_step=0))
        batches = [to_device(next(loader), device) for _ in range(4)]
        semantic = load_config(None, [*base, "model.tasks=[semantic]", "model.backbone=resnet18"])
        results = []
        rcnn: dict[str, tuple[torch.nn.Module, Step]] = {}
        for name in models:
            if name in ("instance", "torchvision_maskrcnn"):
                rcnn = rcnn or rcnn_steps(root, card, args.size, device)  # the pair, built once
                model, step = rcnn.pop(name)
                model.to(device)
            elif name == "smp_fpn":
                model, step = smp_step(semantic, card, device)
            else:
                model, step = densepipe_step(demo if name == "all_tasks" else semantic, card, device)
            print(f"== {name}", flush=True)
            result = measure(name, step, batches, warmup=args.warmup, steps=args.steps, device=device,
                             batch_size=args.batch)
            result["parameters"] = sum(p.numel() for p in model.parameters())
            results.append(result)
            print(json.dumps(result), flush=True)
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    by_name = {r["model"]: r for r in results}
    ratios = {}
    for ours, theirs in (("semantic", "smp_fpn"), ("instance", "torchvision_maskrcnn")):
        if ours in by_name and theirs in by_name:
            ratios[f"{ours} / {theirs} images/s"] = round(
                by_name[ours]["images_per_s"] / by_name[theirs]["images_per_s"], 4)
    report = {
        "benchmark": "gpu_peers",
        "command": "python benchmarks/gpu_peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description(),
        "precision": "bf16 autocast", "size": args.size, "batch": args.batch, "steps": args.steps,
        "warmup": args.warmup, "results": results, "ratios": ratios, "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
