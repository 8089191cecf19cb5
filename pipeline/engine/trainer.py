"""Training loop: one optimizer over the task losses combined by ``train.loss_weighting``.

Warm-up then cosine/poly schedule, gradient clipping, autocast (``train.precision``, bf16 on CUDA
by default, fp16 with a gradient scaler), DDP under torchrun (``train.batch_size`` is the global
batch; rank 0 writes), a progress bar with each task's loss, images/s and ETA, evaluation every
``train.eval_every`` steps with ``best.pt`` and early stopping on a metric, lifecycle hooks
(``pipeline.hookspecs``), and atomic ``last.pt`` / ``best.pt``.

Outputs (``train.out_dir``): ``last.pt``, ``best.pt`` (weights, config, card, step, metrics; no
resume state: ``checkpoint.weights_payload``), ``config.yaml`` and ``train_log.csv``
(``TRACKED_OUTPUTS``: the same params and seed give the same bytes), and
``mlflow_run.json`` (``checkpoint.RunRecord``: the MLflow run id, which differs from run to run).

Resume: rerunning the same command continues from ``<train.out_dir>/last.pt``, which carries the
model, optimizer, scheduler, scaler, loss-weighting state, step, epoch, sample position, every RNG
state and hook state; it continues the MLflow run that ``mlflow_run.json`` names for that very
file (a new run when the record is missing or names other files). Augmentation is seeded by each
sample's position in the stream (``engine.loaders``), so on CPU the resumed run's weights equal an
uninterrupted run's, bit for bit.
``train_log.csv`` is rewritten before each ``last.pt``: after a crash and resume it holds every
step once (``TrainLog``).

Crashes: rank 0 holds ``<train.out_dir>/.lock`` for the whole run (one training per folder); at
start-up it removes the temporary files that killed writers of its outputs left there
(``checkpoint.remove_stale_temp_files``). Loader workers exit when the training process dies, even
by ``kill -9`` (``loaders.exit_when_gone``).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console  # at import, not in training: rich.style draws from Python's RNG
from torch import nn

from pipeline.config import Config, resolve_best_metric
from pipeline.engine import distributed
from pipeline.engine.checkpoint import (
    RUN_RECORD,
    RunRecord,
    hold_out_dir,
    load_checkpoint,
    load_model_state,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
    weights_payload,
)
from pipeline.engine.evaluation import evaluate_model
from pipeline.engine.hooks import TrainState, build_hooks
from pipeline.engine.loaders import eval_dataset, eval_loader, train_dataset, train_loader
from pipeline.engine.precision import Precision, configure_backends, resolve_precision
from pipeline.engine.schedule import lr_factor
from pipeline.errors import ConfigError, DensepipeError
from pipeline.io import atomic_write_text
from pipeline.losses import LossWeighting, build_loss_weighting
from pipeline.metrics.multitask import metric_goal
from pipeline.model import MultiTaskModel, build_model
from pipeline.registry import TaskRegistry
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.csv"
TRACKED_OUTPUTS = ("best.pt", "config.yaml", "last.pt", TRAIN_LOG)
"""What a training writes into ``train.out_dir`` whose bytes depend only on the params and seed:
DVC's ``train`` outs (dvc.yaml)."""
OUTPUTS = (*TRACKED_OUTPUTS, RUN_RECORD)
"""What a training writes into ``train.out_dir`` (atomically, holding its lock): the names whose
temporary files a new training may remove as stale."""


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
    skipped_nonfinite: int = 0
    stopped_early: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DensepipeError("train.device: 'cuda' requested but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all of which ``last.pt`` stores:
    an unseeded one would make its bytes differ from process to process)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg: Config, model: torch.nn.Module, *,
                    extra: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on norms, biases and ``extra`` (loss-weighting
    parameters)."""
    decay, no_decay = [], list(extra or [])
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


class NonFiniteLoss(ArithmeticError):
    """A loss term is NaN or infinite (on any rank); the message names the terms and values."""


class TrainingModule(nn.Module):
    """``forward(batch) -> {"<task>/<term>": loss}``: what DDP wraps, so the loss tensors it
    returns are what DDP traces to find parameters a step did not use."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.losses(self.model(batch), batch)


def train_step(model: MultiTaskModel, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
               clip_grad_norm: float | None = None, forward: nn.Module | None = None,
               weighting: LossWeighting | None = None, precision: Precision | None = None,
               scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One optimisation step over the weighted task losses.

    ``forward`` is the module computing the loss terms (a DDP-wrapped ``TrainingModule`` under
    torchrun; default the model itself), ``weighting`` combines the per-task losses (default
    ``model.loss_weights``), ``precision`` sets autocast and ``scaler`` scales fp16 gradients.
    Returns ``{"<task>/<term>": value, ..., "weight/<task>": weight in force, "loss": total}``;
    raises ``NonFiniteLoss`` before touching the weights when any term on any rank is not
    finite (all ranks raise together, so none waits for the others' gradients)."""
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        terms = forward(batch) if forward is not None else model.losses(model(batch), batch)
    terms = {k: v.float() for k, v in terms.items()}
    per_task = model.task_losses(terms) if weighting is not None else {}
    if weighting is None:
        loss = model.total_loss(terms)
        weights = {t: w for t, w in model.loss_weights.items() if t in model.heads}
    else:
        loss = weighting.combine(per_task,
                                 shared_parameters=model.last_shared_parameters()
                                 if weighting.needs_shared_parameters else ())
        weights = weighting.weights()
    if distributed.any_rank(not bool(torch.isfinite(loss))):
        bad = [f"{k} = {float(v.detach())}" for k, v in terms.items() if not torch.isfinite(v)]
        own = f"total = {float(loss.detach())}" if not torch.isfinite(loss) else "another process's loss"
        raise NonFiniteLoss(", ".join(bad) or own)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if weighting is not None:
        distributed.average_gradients(weighting.parameters())
    if clip_grad_norm:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    row = {k: float(v.detach()) for k, v in terms.items()}
    if weighting is not None:
        weighting.after_step({k: float(v.detach()) for k, v in per_task.items()})
    row.update({f"weight/{k}": float(v) for k, v in weights.items()})
    row["loss"] = float(loss.detach())
    return row


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class _Progress:
    """Rich progress bar on a terminal; a plain log line every ``log_every`` steps otherwise;
    nothing at all when ``silent`` (ranks other than 0)."""

    def __init__(self, *, total: int, start: int, enabled: bool, silent: bool = False) -> None:
        self.console = Console(stderr=True)
        self.silent = silent
        self.live = enabled and not silent and self.console.is_terminal
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
        elif log_line and not self.silent:
            self.console.print(f"step {step}/{self.total} {info}", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _build_weighting(cfg: Config, model: MultiTaskModel) -> LossWeighting:
    lw = cfg.train.loss_weighting
    tasks = [t for t in model.tasks if t in model.heads]
    return build_loss_weighting(lw.method, tasks=tasks,
                                base_weights={t: model.loss_weights[t] for t in tasks}, **lw.options)


@dataclass
class _EarlyStopping:
    """``train.early_stopping``: counts evaluations without an improvement of ``min_delta``."""

    patience: int
    min_delta: float
    goal: str
    best: float | None = None
    bad_evals: int = 0
    stopped: bool = False

    def update(self, value: float | None) -> bool:
        """Record one evaluation; True when training should stop."""
        if self.patience <= 0 or value is None or not math.isfinite(value):
            return False
        gain = (value - self.best if self.goal == "max" else self.best - value) \
            if self.best is not None else math.inf
        if gain > self.min_delta:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        self.stopped = self.bad_evals >= self.patience
        return self.stopped

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "stopped": self.stopped}

    def load(self, state: dict[str, Any] | None) -> None:
        if state:
            self.best, self.bad_evals = state["best"], int(state["bad_evals"])
            self.stopped = bool(state["stopped"])


class TrainLog:
    """``train_log.csv``: ``step`` then the sorted union of the rows' keys (a value a row lacks is
    ``nan``), one row per step, numbers as ``%.6g``.

    ``TrainLog(path, resume_step=s)`` keeps the rows of an existing file with ``step <= s`` (the
    steps the checkpoint being resumed holds; none when starting afresh) and drops later ones,
    which the resumed run does again. The trainer writes the file before each ``last.pt``, so
    whenever a run is killed the file covers at least the steps of the checkpoint."""

    def __init__(self, path: Path, *, resume_step: int) -> None:
        self.path = path
        self.rows: dict[int, dict[str, float]] = {}
        if resume_step > 0 and path.is_file():
            with open(path, newline="") as f:
                for record in csv.DictReader(f):
                    try:
                        step = int(record.pop("step"))
                        row = {k: float(v) for k, v in record.items() if k and v}
                    except (KeyError, TypeError, ValueError):
                        continue  # a damaged line: that step is left out
                    if 0 < step <= resume_step:
                        self.rows[step] = row

    def add(self, step: int, row: dict[str, float]) -> None:
        self.rows[step] = row

    def write(self) -> None:
        """Rewrite the file atomically with every row so far, in step order."""
        keys = sorted({k for r in self.rows.values() for k in r})
        lines = [",".join(["step", *keys])]
        for step in sorted(self.rows):
            row = self.rows[step]
            lines.append(",".join([str(step), *(f"{row.get(k, math.nan):.6g}" for k in keys)]))
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def train(cfg: Config, *, registry: TaskRegistry | None = None, tracker: Tracker | None = None,
          hooks: list[tuple[str, Any]] | tuple = ()) -> TrainResult:
    """Train (or resume) the model of ``cfg``; returns where the checkpoints are and metrics.

    Under torchrun every process calls this; rank 0 alone writes checkpoints and logs (pass
    ``tracker`` only there) and holds ``train.out_dir`` (another training there raises a
    ``DensepipeError``). ``hooks``: extra ``(name, plugin)`` lifecycle hook plugins (see
    ``pipeline.hookspecs``) besides the ``densepipe.hooks`` entry points and built-ins."""
    with contextlib.ExitStack() as held:
        return _train(cfg, registry=registry, tracker=tracker, hooks=hooks, held=held)


def _train(cfg: Config, *, registry: TaskRegistry | None, tracker: Tracker | None,
           hooks: list[tuple[str, Any]] | tuple, held: contextlib.ExitStack) -> TrainResult:
    """``train``; ``held`` keeps the ``train.out_dir`` lock until training returns."""
    device = resolve_device(cfg.train.device)
    env = distributed.init_distributed(device)
    device = distributed.local_device(device, env)
    distributed.per_rank_batch(cfg.train.batch_size, env)  # divisible, or a ConfigError
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    configure_backends(device=device, tf32=cfg.train.tf32, deterministic=cfg.train.deterministic)
    precision = resolve_precision(cfg.train.precision, device)
    seed_everything(cfg.train.seed)
    train_ds = train_dataset(cfg)
    card = train_ds.card  # type: ignore[attr-defined]
    model = build_model(cfg, card, registry)
    if cfg.train.sync_bn and env.enabled:
        if device.type != "cuda":
            raise ConfigError("train.sync_bn: SyncBatchNorm runs on CUDA only (PyTorch has no CPU "
                              "version); on CPU use model.backbone_norm: gn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device).use_channels_last(cfg.train.channels_last)
    weighting = _build_weighting(cfg, model).to(device)
    optimizer = build_optimizer(cfg, model, extra=list(weighting.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(kind=cfg.train.schedule, total_steps=cfg.train.steps,
                             warmup_steps=cfg.train.warmup_steps))
    scaler = precision.scaler()
    out_dir = Path(cfg.train.out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if held.enter_context(hold_out_dir(out_dir)):  # no live writer of ours is left there
            remove_stale_temp_files(out_dir, OUTPUTS)
        atomic_write_text(out_dir / "config.yaml",
                          yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True))
    # auto: the first enabled task's main metric; None (no task has one): best.pt = the last
    best_metric = resolve_best_metric(cfg.train.best_metric, cfg.model.tasks, model.tasks.values())
    if best_metric is None:
        log.info("train.best_metric auto: no enabled task has a main_metric; best.pt is the last "
                 "checkpoint")
    best_goal = metric_goal(best_metric or "", model.tasks.values())  # "min" for errors
    stop_metric = cfg.train.early_stopping.metric or best_metric or ""
    early = _EarlyStopping(patience=cfg.train.early_stopping.patience,
                           min_delta=cfg.train.early_stopping.min_delta,
                           goal=metric_goal(stop_metric, model.tasks.values()))
    step, best_value, run_id, metrics, skipped = 0, None, None, {}, 0
    ckpt: dict[str, Any] | None = None
    record = RunRecord(out_dir)  # the run's checkpoints: none yet
    if last_path.exists():
        ckpt = load_checkpoint(last_path, resume=True)
        load_model_state(model, ckpt["model"], source=last_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("loss_weighting"):
            weighting.load_state_dict(ckpt["loss_weighting"])
        set_rng_state(ckpt["rng"])
        step, best_value = int(ckpt["step"]), ckpt.get("best_value")
        run_id, metrics = ckpt.get("mlflow_run_id"), dict(ckpt.get("metrics") or {})
        if run_id is not None:  # the record names this last.pt: its checkpoints are this run's
            record = RunRecord.read(out_dir) or record
        skipped = int(ckpt.get("skipped_nonfinite", 0))
        early.load(ckpt.get("early_stopping"))
        log.info("resuming from %s at step %d", last_path, step)
    train_log = TrainLog(out_dir / TRAIN_LOG, resume_step=step) if env.is_main else None

    if tracker is not None and step < cfg.train.steps and not early.stopped:  # else: nothing to
        # train, and the run that trained the checkpoint is left as it is
        run_id = tracker.start(run_id=run_id, run_name=f"train-{'-'.join(cfg.model.tasks)}",
                               tags={"densepipe.stage": "train"})
        tracker.log_params(cfg.flat())

    runner = build_hooks(cfg, hooks)
    state = TrainState(cfg=cfg, model=model, optimizer=optimizer, out_dir=out_dir, step=step,
                       rank=env.rank, world_size=env.world_size, metrics=metrics, resumed_from=ckpt)

    def save(path: Path) -> None:
        payload = {"step": step, "epoch": step * cfg.train.batch_size // len(train_ds),
                   "samples_seen": step * cfg.train.batch_size, "world_size": env.world_size,
                   "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                   "loss_weighting": weighting.state_dict(), "rng": rng_state(),
                   "config": cfg.model_dump(mode="json"), "card": card.to_json(),
                   "best_value": best_value, "metrics": metrics,
                   "skipped_nonfinite": skipped, "early_stopping": early.state(), "hooks": {}}
        runner.call("densepipe_on_checkpoint", state=state, payload=payload, path=path)
        if path == last_path and train_log is not None:
            train_log.write()  # first: the log covers at least the checkpoint's steps
        record.start(run_id)  # the MLflow run id stays out of the checkpoint's bytes
        save_checkpoint(path, payload if path == last_path else weights_payload(payload),
                        record=record)

    if cfg.train.compile:
        model.backbone.compile()
    forward: nn.Module = TrainingModule(model)
    if env.enabled:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # a task without labels in a batch leaves its head unused
    runner.call("densepipe_train_start", state=state)
    val_loader = None
    history: list[dict[str, float]] = []
    images_per_s = 0.0
    fixed = cfg.train.loss_weighting.method == "fixed"
    try:
        if step < cfg.train.steps and not early.stopped:
            loader = iter(train_loader(cfg, train_ds, start_step=step, rank=env.rank,
                                       world_size=env.world_size))
            progress = _Progress(total=cfg.train.steps, start=step,
                                 enabled=cfg.train.progress, silent=not env.is_main)
            model.train()
            t0, seen = time.perf_counter(), 0
            try:
                while step < cfg.train.steps:
                    batch = next(loader)
                    runner.call("densepipe_before_step", state=state, batch=batch)
                    try:
                        row = train_step(model, batch, optimizer, scheduler,
                                         clip_grad_norm=cfg.train.clip_grad_norm, forward=forward,
                                         weighting=weighting, precision=precision,
                                         scaler=scaler if precision.needs_scaler else None)
                    except NonFiniteLoss as e:
                        if not cfg.train.skip_nonfinite:
                            kept = f"last good checkpoint: {last_path}" if last_path.exists() \
                                else "no checkpoint written yet"
                            raise DensepipeError(f"non-finite loss at step {step + 1}: {e}; "
                                                 f"{kept}") from None
                        skipped += 1
                        scheduler.step()  # the schedule follows the step count
                        log.warning("step %d: skipped a batch with a non-finite loss (%s); %d so far",
                                    step + 1, e, skipped)
                        row = {"skipped_nonfinite": float(skipped)}
                    step += 1
                    state.step = step
                    seen += batch["image"].shape[0] * env.world_size
                    images_per_s = seen / max(time.perf_counter() - t0, 1e-9)
                    history.append(row)
                    if train_log is not None:
                        train_log.add(step, row)
                    runner.call("densepipe_after_step", state=state, losses=row)
                    log_now = step % cfg.train.log_every == 0 or step == cfg.train.steps
                    info = " ".join(f"{k}={v:.3f}" for k, v in row.items()
                                    if not k.startswith("weight/")) + f" {images_per_s:.1f} img/s"
                    progress.update(step, info, log_line=log_now)
                    if tracker is not None and (log_now or not fixed):
                        logged = {f"train/{k}": v for k, v in row.items()
                                  if log_now or k.startswith("weight/")}
                        if log_now:
                            logged.update({"train/lr": scheduler.get_last_lr()[0],
                                           "train/images_per_s": images_per_s,
                                           "train/skipped_nonfinite": skipped})
                        tracker.log_metrics(logged, step)
                    do_eval = (cfg.train.eval_every and step % cfg.train.eval_every == 0) \
                        or step == cfg.train.steps
                    if do_eval:
                        if val_loader is None:
                            val_loader = eval_loader(cfg, eval_dataset(cfg, tasks=list(model.tasks)),
                                                     batch_size=cfg.evaluate.batch_size,
                                                     rank=env.rank, world_size=env.world_size)
                        runner.call("densepipe_before_evaluation", state=state)
                        metrics, _ = evaluate_model(model, val_loader, device=device,
                                                    distributed=env.enabled)
                        state.metrics = metrics
                        runner.call("densepipe_after_evaluation", state=state, metrics=metrics)
                        if tracker is not None:
                            tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
                        value = metrics.get(best_metric) if best_metric else None
                        if value is not None and math.isfinite(value) and \
                                _is_better(value, best_value, best_goal):
                            best_value = value
                            if env.is_main:
                                save(best_path)
                        if early.update(metrics.get(stop_metric)):
                            state.should_stop = True
                            log.warning("early stopping at step %d: %s did not improve by more than "
                                        "%g in %d evaluations", step, stop_metric,
                                        early.min_delta, early.patience)
                    if env.is_main and (step % cfg.train.checkpoint_every == 0
                                        or step == cfg.train.steps or do_eval or state.should_stop):
                        save(last_path)
                    if state.should_stop:
                        break
            finally:
                progress.close()
        runner.call("densepipe_train_end", state=state)
        if env.is_main and not best_path.exists():
            save(best_path)
        distributed.barrier()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    if tracker is not None and tracker.run_id is not None:
        tracker.set_tags({"densepipe.best_metric": best_metric or "none (last)",
                          "densepipe.best_value": str(best_value),
                          "densepipe.skipped_nonfinite": str(skipped),
                          "densepipe.stopped_early": str(early.stopped)})
    return TrainResult(step=step, out_dir=out_dir, last=last_path, best=best_path,
                       metrics=metrics, run_id=run_id, losses=history, images_per_s=images_per_s,
                       skipped_nonfinite=skipped, stopped_early=early.stopped)


def load_trained_model(cfg: Config | None, checkpoint: str | Path, card: Any = None, *,
                       registry: TaskRegistry | None = None,
                       device: torch.device | None = None) -> tuple[MultiTaskModel, dict[str, Any]]:
    """The model of ``cfg`` with the weights of ``checkpoint`` (mismatches named): the moving
    average of the weights when training kept one (``train.ema``), else the trained weights.

    ``cfg`` / ``card`` default to the config and dataset card stored in the checkpoint, which is
    read once."""
    from pipeline.config import config_from_dict
    from pipeline.data.card import DatasetCard

    ckpt = load_checkpoint(checkpoint)
    if cfg is None:
        cfg = config_from_dict(ckpt["config"], source=str(checkpoint))
    if card is None:
        card = DatasetCard.from_json(ckpt["card"], source=str(checkpoint))
    model = build_model(cfg, card, registry, load_weights=False)  # the checkpoint's weights replace them
    load_model_state(model, ckpt.get("model_ema") or ckpt["model"], source=checkpoint)
    model.to(device or torch.device("cpu")).eval()
    return model, ckpt
