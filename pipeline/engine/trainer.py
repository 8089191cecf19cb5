"""Training loop: one optimizer over the task losses combined by ``train.loss_weighting``.

Warm-up then cosine/poly schedule, gradient clipping, autocast (``train.precision``, bf16 on CUDA
by default, fp16 with a gradient scaler), DDP under torchrun (``train.batch_size`` is the global
batch; rank 0 writes), a progress bar with each task's loss, images/s and ETA, evaluation every
``train.eval_every`` steps with ``best.pt`` and early stopping on a metric, lifecycle hooks
(``pipeline.hookspecs``), and atomic ``last.pt`` / ``best.pt``.

Shape: ``train`` builds the model, optimizer and schedule and hands them to ``train_loop.Trainer``,
whose short loop calls hooks (``train_loop.HookBase``) for every other concern: the built-ins of
``train_hooks`` (schedule, plugin lifecycle hooks, progress, evaluation, checkpoints and
``best.pt``, early stopping), MLflow as ``MLflowTracking`` (given by the caller: no tracker, no
hook), and any ``trainer_hooks``. Each hook keeps its state in ``last.pt``.

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
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from pipeline.config import Config, config_from_dict, resolve_best_metric
from pipeline.data.card import DatasetCard
from pipeline.engine import distributed
from pipeline.engine.checkpoint import (
    RUN_RECORD,
    hold_out_dir,
    load_checkpoint,
    load_model_state,
    remove_stale_temp_files,
)
from pipeline.engine.loaders import train_dataset, train_loader
from pipeline.engine.loss_weighting import LossWeighting, build_loss_weighting
from pipeline.engine.precision import configure_backends, resolve_precision
from pipeline.engine.schedule import lr_factor
from pipeline.engine.step import NonFiniteLoss, TrainingModule, train_step
from pipeline.engine.train_hooks import (
    TRAIN_LOG,
    Checkpointer,
    EarlyStopping,
    LRScheduler,
    MLflowTracking,
    PeriodicEvaluation,
    PluginHooks,
    ProgressLogger,
    TrainLog,
)
from pipeline.engine.train_loop import HookBase, Trainer
from pipeline.errors import ConfigError, DensepipeError
from pipeline.io import atomic_write_text
from pipeline.metrics.multitask import metric_goal
from pipeline.model import MultiTaskModel, build_model
from pipeline.registry import TaskRegistry

__all__ = ["OUTPUTS", "TRACKED_OUTPUTS", "TRAIN_LOG", "HookBase", "MLflowTracking", "NonFiniteLoss",
           "TrainLog", "TrainResult", "TrainingModule", "build_optimizer", "load_trained_model",
           "train", "train_step"]

log = logging.getLogger(__name__)

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


FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")
"""Devices where ``build_optimizer`` uses torch's fused SGD / AdamW kernels."""


def build_optimizer(cfg: Config, model: torch.nn.Module, *,
                    extra: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW; no weight decay on norms, biases and ``extra`` (loss-weighting
    parameters). Build it after the model is on its device: where every parameter is a float
    tensor on a device of ``FUSED_OPTIMIZER_DEVICES``, torch's fused kernel does the update (the
    same arithmetic in one pass over all tensors; a ResNet-18's AdamW step 42 -> 7 ms on 2 CPU
    cores, benchmarks/results/optimizer_step.json), else torch's default implementation."""
    decay, no_decay = [], list(extra or [])
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_floating_point() and p.device.type in FUSED_OPTIMIZER_DEVICES
                for p in decay + no_decay) or None  # None: torch picks its default
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=fused)


def _build_weighting(cfg: Config, model: MultiTaskModel) -> LossWeighting:
    lw = cfg.train.loss_weighting
    tasks = [t for t in model.tasks if t in model.heads]
    return build_loss_weighting(lw.method, tasks=tasks,
                                base_weights={t: model.loss_weights[t] for t in tasks}, **lw.options)


def train(cfg: Config, *, registry: TaskRegistry | None = None,
          hooks: list[tuple[str, Any]] | tuple = (),
          trainer_hooks: Iterable[HookBase] = ()) -> TrainResult:
    """Train (or resume) the model of ``cfg``; returns where the checkpoints are and metrics.

    Under torchrun every process calls this; rank 0 alone writes checkpoints and logs and holds
    ``train.out_dir`` (another training there raises a ``DensepipeError``). ``hooks``: extra
    ``(name, plugin)`` lifecycle hook plugins (see ``pipeline.hookspecs``) besides the
    ``densepipe.hooks`` entry points and built-ins. ``trainer_hooks``: extra loop hooks
    (``train_loop.HookBase``; ``MLflowTracking(tracker)`` on rank 0 to track the run), called
    after the progress logger and before evaluation and checkpointing."""
    with contextlib.ExitStack() as held:
        return _train(cfg, registry=registry, hooks=hooks, trainer_hooks=trainer_hooks, held=held)


def _train(cfg: Config, *, registry: TaskRegistry | None, hooks: list[tuple[str, Any]] | tuple,
           trainer_hooks: Iterable[HookBase], held: contextlib.ExitStack) -> TrainResult:
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
    model = build_model(cfg, train_ds.card, registry)  # type: ignore[attr-defined]
    if cfg.train.sync_bn and env.enabled:
        if device.type != "cuda":
            raise ConfigError("train.sync_bn: SyncBatchNorm runs on CUDA only (PyTorch has no CPU "
                              "version); on CPU use model.backbone_norm: gn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device).use_channels_last(cfg.train.channels_last)
    model.backbone.activation_checkpointing = cfg.train.activation_checkpointing
    weighting = _build_weighting(cfg, model).to(device)
    optimizer = build_optimizer(cfg, model, extra=list(weighting.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(kind=cfg.train.schedule, total_steps=cfg.train.steps,
                             warmup_steps=cfg.train.warmup_steps))
    out_dir = Path(cfg.train.out_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if held.enter_context(hold_out_dir(out_dir)):  # no live writer of ours is left there
            remove_stale_temp_files(out_dir, OUTPUTS)
        atomic_write_text(out_dir / "config.yaml",
                          yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True))
    # auto: the first enabled task's main metric; None (no task has one): best.pt = the last
    best_metric = resolve_best_metric(cfg.train.best_metric, cfg.model.tasks, model.tasks.values(),
                                      cfg.data.sources)
    if best_metric is None:
        log.info("train.best_metric auto: no enabled task has a main_metric; best.pt is the last "
                 "checkpoint")
    stop = cfg.train.early_stopping
    stop_metric = stop.metric or best_metric or ""
    checkpointer = Checkpointer(goal=metric_goal(best_metric or "", model.tasks.values())) \
        if env.is_main else None  # "min" for errors
    loop_hooks = [LRScheduler(scheduler), PluginHooks(hooks), ProgressLogger(), *trainer_hooks,
                  PeriodicEvaluation(), *([checkpointer] if checkpointer else []),
                  EarlyStopping(metric=stop_metric, patience=stop.patience, min_delta=stop.min_delta,
                                goal=metric_goal(stop_metric, model.tasks.values()))]
    trainer = Trainer(cfg, model=model, optimizer=optimizer, scheduler=scheduler,
                      precision=precision, weighting=weighting, env=env, device=device,
                      train_ds=train_ds, out_dir=out_dir, best_metric=best_metric, hooks=loop_hooks)
    trainer.checkpointer = checkpointer
    if trainer.last_path.exists():
        trainer.load_state_dict(load_checkpoint(trainer.last_path, resume=True))
        log.info("resuming from %s at step %d", trainer.last_path, trainer.step)
    if cfg.train.compile:
        model.backbone.compile()
    if env.enabled:
        trainer.forward = nn.parallel.DistributedDataParallel(
            TrainingModule(model), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # a task without labels in a batch leaves its head unused
    else:
        trainer.forward = TrainingModule(model)
    try:
        trainer.train(lambda start: train_loader(cfg, train_ds, start_step=start, rank=env.rank,
                                                 world_size=env.world_size))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    return TrainResult(step=trainer.step, out_dir=out_dir, last=trainer.last_path,
                       best=trainer.best_path, metrics=trainer.state.metrics, run_id=trainer.run_id,
                       losses=trainer.history, images_per_s=trainer.images_per_s,
                       skipped_nonfinite=trainer.skipped, stopped_early=trainer.stopped_early)


def load_trained_model(cfg: Config | None, checkpoint: str | Path, card: Any = None, *,
                       registry: TaskRegistry | None = None,
                       device: torch.device | None = None) -> tuple[MultiTaskModel, dict[str, Any]]:
    """The model of ``cfg`` with the weights of ``checkpoint`` (mismatches named): the moving
    average of the weights when training kept one (``train.ema``), else the trained weights.

    ``cfg`` / ``card`` default to the config and dataset card stored in the checkpoint, which is
    read once."""
    ckpt = load_checkpoint(checkpoint)
    if cfg is None:
        cfg = config_from_dict(ckpt["config"], source=str(checkpoint))
    if card is None:
        card = DatasetCard.from_json(ckpt["card"], source=str(checkpoint))
    model = build_model(cfg, card, registry, load_weights=False)  # the checkpoint's weights replace them
    load_model_state(model, ckpt.get("model_ema") or ckpt["model"], source=checkpoint)
    model.to(device or torch.device("cpu")).eval()
    return model, ckpt
