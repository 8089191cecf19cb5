"""Training loop: one optimizer over the weighted sum of all task losses.

Warm-up then cosine/poly schedule, gradient clipping, a progress bar with each task's loss,
images/s and ETA, evaluation every ``train.eval_every`` steps, atomic ``last.pt``/``best.pt``, and
automatic resume from ``<train.out_dir>/last.pt``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.config import Config
from pipeline.engine.checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.engine.evaluation import evaluate_model
from pipeline.engine.loaders import eval_dataset, eval_loader, train_dataset, train_loader
from pipeline.engine.schedule import lr_factor
from pipeline.errors import DensepipeError
from pipeline.io import atomic_write_text
from pipeline.metrics.multitask import metric_goal
from pipeline.model import MultiTaskModel, build_model
from pipeline.registry import TaskRegistry
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    last: Path
    best: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    losses: list[dict[str, float]] = field(default_factory=list)
    images_per_s: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DensepipeError("train.device: 'cuda' requested but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


class NonFiniteLoss(ArithmeticError):
    """A loss term is NaN or infinite; the message names the terms."""


def train_step(model: MultiTaskModel, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
               clip_grad_norm: float | None = None) -> dict[str, float]:
    """One optimisation step over the weighted sum of all task losses.

    Returns ``{"<task>/<term>": value, ..., "loss": total}``; raises ``NonFiniteLoss`` before
    touching the weights when any term is not finite."""
    outputs = model(batch)
    terms = model.losses(outputs, batch)
    loss = model.total_loss(terms)
    if not torch.isfinite(loss):
        bad = [k for k, v in terms.items() if not torch.isfinite(v)]
        raise NonFiniteLoss(", ".join(bad) or "total")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    row = {k: float(v.detach()) for k, v in terms.items()}
    row["loss"] = float(loss.detach())
    return row


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class _Progress:
    """Rich progress bar on a terminal; a plain log line every ``log_every`` steps otherwise."""

    def __init__(self, *, total: int, start: int, enabled: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.total = total
        self.bar = None
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=self.console)
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, info: str, *, log_line: bool) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif log_line:
            self.console.print(f"step {step}/{self.total} {info}", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train(cfg: Config, *, registry: TaskRegistry | None = None,
          tracker: Tracker | None = None) -> TrainResult:
    """Train (or resume) the model of ``cfg``; returns where the checkpoints are and metrics."""
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    train_ds = train_dataset(cfg)
    card = train_ds.card  # type: ignore[attr-defined]
    model = build_model(cfg, card, registry).to(device).use_channels_last(cfg.train.channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(kind=cfg.train.schedule, total_steps=cfg.train.steps,
                             warmup_steps=cfg.train.warmup_steps))
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml",
                      yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True))
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    best_goal = metric_goal(cfg.train.best_metric, model.tasks.values())  # "min" for errors
    step, best_value, run_id, metrics = 0, None, None, {}
    if last_path.exists():
        ckpt = load_checkpoint(last_path)
        load_model_state(model, ckpt["model"], source=last_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        step, best_value = int(ckpt["step"]), ckpt.get("best_value")
        run_id, metrics = ckpt.get("mlflow_run_id"), dict(ckpt.get("metrics") or {})
        log.info("resuming from %s at step %d", last_path, step)

    if tracker is not None:
        run_id = tracker.start(run_id=run_id, run_name=f"train-{'-'.join(cfg.model.tasks)}",
                               tags={"densepipe.stage": "train"})
        tracker.log_params(cfg.flat())

    def payload() -> dict[str, Any]:
        return {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "config": cfg.model_dump(mode="json"), "card": card.to_json(),
                "best_value": best_value, "metrics": metrics, "mlflow_run_id": run_id}

    val_loader = None
    history: list[dict[str, float]] = []
    images_per_s = 0.0
    if step < cfg.train.steps:
        loader = iter(train_loader(cfg, train_ds, start_step=step))
        progress = _Progress(total=cfg.train.steps, start=step, enabled=cfg.train.progress)
        model.train()
        t0, seen = time.perf_counter(), 0
        try:
            while step < cfg.train.steps:
                batch = next(loader)
                try:
                    row = train_step(model, batch, optimizer, scheduler,
                                     clip_grad_norm=cfg.train.clip_grad_norm)
                except NonFiniteLoss as e:
                    raise DensepipeError(f"non-finite loss at step {step + 1} in {e}; "
                                         f"last good checkpoint: {last_path}") from None
                step += 1
                seen += batch["image"].shape[0]
                images_per_s = seen / max(time.perf_counter() - t0, 1e-9)
                history.append(row)
                log_now = step % cfg.train.log_every == 0 or step == cfg.train.steps
                info = " ".join(f"{k}={v:.3f}" for k, v in row.items()) + f" {images_per_s:.1f} img/s"
                progress.update(step, info, log_line=log_now)
                if tracker is not None and log_now:
                    tracker.log_metrics({**{f"train/{k}": v for k, v in row.items()},
                                         "train/lr": scheduler.get_last_lr()[0],
                                         "train/images_per_s": images_per_s}, step)
                do_eval = (cfg.train.eval_every and step % cfg.train.eval_every == 0) \
                    or step == cfg.train.steps
                if do_eval:
                    if val_loader is None:
                        val_loader = eval_loader(cfg, eval_dataset(cfg),
                                                 batch_size=cfg.evaluate.batch_size)
                    metrics, _ = evaluate_model(model, val_loader, device=device)
                    if tracker is not None:
                        tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
                    value = metrics.get(cfg.train.best_metric)
                    if value is not None and math.isfinite(value) and \
                            _is_better(value, best_value, best_goal):
                        best_value = value
                        save_checkpoint(best_path, payload())
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or do_eval:
                    save_checkpoint(last_path, payload())
        finally:
            progress.close()
    if not best_path.exists():
        save_checkpoint(best_path, payload())
    if tracker is not None:
        tracker.set_tags({"densepipe.best_metric": cfg.train.best_metric,
                          "densepipe.best_value": str(best_value)})
    return TrainResult(step=step, out_dir=out_dir, last=last_path, best=best_path,
                       metrics=metrics, run_id=run_id, losses=history, images_per_s=images_per_s)


def load_trained_model(cfg: Config | None, checkpoint: str | Path, card: Any = None, *,
                       registry: TaskRegistry | None = None,
                       device: torch.device | None = None) -> tuple[MultiTaskModel, dict[str, Any]]:
    """The model of ``cfg`` with the weights of ``checkpoint`` (mismatches named).

    ``cfg`` / ``card`` default to the config and dataset card stored in the checkpoint, which is
    read once."""
    from pipeline.config import config_from_dict
    from pipeline.data.card import DatasetCard

    ckpt = load_checkpoint(checkpoint)
    if cfg is None:
        cfg = config_from_dict(ckpt["config"], source=str(checkpoint))
    if card is None:
        card = DatasetCard.from_json(ckpt["card"], source=str(checkpoint))
    model = build_model(cfg, card, registry)
    load_model_state(model, ckpt["model"], source=checkpoint)
    model.to(device or torch.device("cpu")).eval()
    return model, ckpt
