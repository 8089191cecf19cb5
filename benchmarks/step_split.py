"""Where one training step of the all-task demo model goes, part by part, at any size.

``benchmarks/cost_split.py`` splits the cost ratio from whole-model step times; this times the
parts of one step directly, on the same batches: reading and augmenting a batch (``train_loader``
with ``data.num_workers: 0``, so it is the CPU cost a worker pays), the backbone's forward, each
head's forward with its losses, each head's backward (``torch.autograd.grad`` of its loss terms
into its own weights and the features it read), the rest of the backward (the backbone's), gradient
clipping and the optimizer step. Shares are of the sum of the parts' means; the parts are timed in
a step the way ``engine.step.train_step`` runs them (channels-last as configured, same loss
weights), so their sum is within a few per cent of a real step.

Used by ``benchmarks/peers.py --parts cost_split``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pipeline import stages
from pipeline.config import load_config
from pipeline.engine.loaders import train_dataset, train_loader
from pipeline.engine.trainer import build_optimizer
from pipeline.model import build_model, image_views

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def split(root: Path, *, size: int, batch: int, steps: int, smoke: bool = False,
          overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Mean seconds per part of a training step of ``params.yaml``'s model at ``size`` px
    (``overrides``: ``KEY=VALUE`` on top)."""
    cfg = load_config(ROOT / "params.yaml", [
        f"data.root={root}", f"data.image_size={size}", f"data.synthetic.image_size={size}",
        f"data.synthetic.num_train={max(8, batch * (steps + 1))}", "data.synthetic.num_val=2",
        "data.num_workers=0", f"train.batch_size={batch}", "train.device=cpu", "tracking.enabled=false",
        *overrides])
    stages.prepare(cfg)
    dataset = train_dataset(cfg)
    loader = iter(train_loader(cfg, dataset, start_step=0))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, dataset.card).use_channels_last(cfg.train.channels_last)  # type: ignore[attr-defined]
    model.train()
    optimizer = build_optimizer(cfg, model)
    parts: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        parts.setdefault(name, []).append(seconds)

    for step in range(steps + 1):  # step 0 warms up, not recorded
        record = add if step else (lambda name, seconds: None)
        b, seconds = _timed(lambda: next(loader))
        record("load a batch", seconds)
        start = time.perf_counter()
        images = b["image"]
        views = image_views(images, set(model.views), model.pixel_mean, model.pixel_std)
        if model.channels_last:
            views = {k: v.contiguous(memory_format=torch.channels_last) for k, v in views.items()}
        features = model._backbone_per_view(views)
        record("backbone forward", time.perf_counter() - start)
        size_hw = (int(images.shape[-2]), int(images.shape[-1]))
        outputs: dict[str, Any] = {}
        task_loss: dict[str, torch.Tensor] = {}
        for name, head in model.heads.items():
            task = model.tasks[name]
            extra = ({"upstream": {s: outputs[s] for s in task.shares_with if s in outputs}}
                     if task.shares_with else {})
            start = time.perf_counter()
            outputs[name] = head(features[task.input_view], image_size=size_hw, batch=b, **extra)
            terms = task.losses(outputs[name], b, options=model.options[name])
            task_loss[name] = model.loss_weights[name] * sum(terms.values())
            record(f"{name} head forward + loss", time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
        head_backward = 0.0
        for name, loss in task_loss.items():
            view = features[model.tasks[name].input_view]
            inputs = [t for t in [*model.heads[name].parameters(), *view.values()] if t.requires_grad]
            start = time.perf_counter()
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
            seconds = time.perf_counter() - start
            head_backward += seconds
            record(f"{name} head backward", seconds)
        total = sum(task_loss.values())
        _, seconds = _timed(total.backward)  # type: ignore[union-attr]
        record("backbone backward (backward minus the heads')", max(seconds - head_backward, 0.0))
        clip = cfg.train.clip_grad_norm or float("inf")
        _, seconds = _timed(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), clip))  # noqa: B023
        record("gradient clipping", seconds)
        _, seconds = _timed(optimizer.step)
        record("optimizer step", seconds)
    means = {k: sum(v) / len(v) for k, v in parts.items()}
    total_s = sum(means.values())
    ranked = sorted(means.items(), key=lambda kv: -kv[1])
    return {
        "what": f"one training step of params.yaml's model ({', '.join(model.heads)}; backbone "
                f"{cfg.model.backbone}, FPN {cfg.model.fpn_channels}) at {size}x{size}, batch {batch}, "
                f"mean of {steps} steps after one warm-up step, parts timed in place",
        "seconds": {k: round(v, 4) for k, v in means.items()},
        "share": {k: round(v / total_s, 4) for k, v in ranked},
        "largest": ranked[0][0], "step_seconds_sum_of_parts": round(total_s, 4),
        "size": size, "batch": batch, "steps": steps, "smoke": smoke, "overrides": list(overrides),
    }
