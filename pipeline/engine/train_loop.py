"""The training loop and its hooks (the shape of detectron2's ``TrainerBase`` + ``HookBase``).

``Trainer.train`` runs steps and calls its hooks around them; every other concern (learning-rate
schedule, plugin lifecycle hooks, progress bar, MLflow, periodic evaluation, checkpoints and the
best model, early stopping: ``pipeline.engine.train_hooks``) is a ``HookBase`` with its own state
in ``last.pt``. Hooks are called in list order for every event; ``trainer.py`` builds the list.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.engine import distributed
from pipeline.engine.checkpoint import RunRecord, load_model_state, rng_state, set_rng_state
from pipeline.engine.distributed import DistEnv
from pipeline.engine.hooks import TrainState
from pipeline.engine.loss_weighting import LossWeighting
from pipeline.engine.precision import Precision
from pipeline.engine.step import NonFiniteLoss, train_step
from pipeline.errors import DensepipeError
from pipeline.model import MultiTaskModel

log = logging.getLogger("pipeline.engine.trainer")  # the loop's and its hooks' log lines

PAYLOAD_ORDER = ("step", "epoch", "samples_seen", "world_size", "model", "optimizer", "scheduler",
                 "scaler", "loss_weighting", "rng", "config", "card", "best_value", "metrics",
                 "skipped_nonfinite", "early_stopping", "hooks")
"""The order of a checkpoint's entries, whichever hook gives them (the bytes depend on it); entries
of other hooks follow, in hook order."""


class HookBase:
    """A concern of the training loop. Every method is a no-op here; ``self.trainer`` is the
    ``Trainer`` that calls it (``trainer.state`` is what the plugin lifecycle hooks see).

    Order of calls: ``before_train`` (hooks in reverse list order); per step
    ``before_step(batch)``, the step, ``after_step`` (``trainer.row`` holds its losses) with, when
    an evaluation runs in it, ``before_evaluation`` / ``after_evaluation(metrics)``;
    ``after_train`` after the last step (not when a step raised); ``close`` always, last (after
    the ranks meet at the end).
    ``on_checkpoint(payload, path)`` comes before a checkpoint is written (rank 0).
    ``state_dict`` gives entries of ``last.pt`` (top-level keys, unique across hooks);
    ``load_state_dict`` gets the resumed checkpoint, before ``before_train``. Unless ``in_best``
    is true, a hook's entries stay out of ``best.pt``."""

    trainer: Trainer
    in_best = False

    def before_train(self) -> None: ...

    def before_step(self, batch: dict[str, Any]) -> None: ...

    def after_step(self) -> None: ...

    def before_evaluation(self) -> None: ...

    def after_evaluation(self, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, payload: dict[str, Any], path: Path) -> None: ...

    def after_train(self) -> None: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None: ...


class Trainer:
    """The model, optimizer and step loop of one training; ``hooks`` do everything else.

    Its own checkpoint entries: step, sample position, weights, optimizer, gradient scaler,
    loss-weighting state, RNG states, config, card, the last metrics and the skipped-step count."""

    def __init__(self, cfg: Config, *, model: MultiTaskModel, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, precision: Precision,
                 weighting: LossWeighting, env: DistEnv, device: torch.device, train_ds: Any,
                 out_dir: Path, best_metric: str | None, hooks: Iterable[HookBase]) -> None:
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.precision, self.scaler = precision, precision.scaler()
        self.weighting, self.env, self.device, self.train_ds = weighting, env, device, train_ds
        self.forward: nn.Module = model
        self.max_steps, self.best_metric = cfg.train.steps, best_metric
        self.last_path, self.best_path = out_dir / "last.pt", out_dir / "best.pt"
        self.state = TrainState(cfg=cfg, model=model, optimizer=optimizer, out_dir=out_dir,
                                rank=env.rank, world_size=env.world_size)
        self.run_id: str | None = None
        self.record = RunRecord(out_dir)  # the run's checkpoints: none yet
        self.skipped, self.stopped_early, self.images_per_s = 0, False, 0.0
        self.row: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.resume_only: set[str] = set()
        self.checkpointer: Any = None
        """The ``Checkpointer`` hook where this rank writes checkpoints (rank 0), else None."""
        self.hooks = list(hooks)
        for h in self.hooks:
            h.trainer = self

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def will_train(self) -> bool:
        """Whether steps are left (else nothing trains: the checkpoint is complete or stopped)."""
        return self.step < self.max_steps and not self.stopped_early

    def call(self, event: str, *args: Any) -> None:
        """``event`` on every hook in list order; ``before_train`` in reverse (set-up of the later
        hooks first: the MLflow run is started before the plugins' ``densepipe_train_start``)."""
        for h in reversed(self.hooks) if event == "before_train" else self.hooks:
            getattr(h, event)(*args)

    def train(self, make_loader: Callable[[int], Iterable[dict[str, Any]]]) -> None:
        """Steps from ``self.step`` to ``max_steps`` (or until a hook sets ``state.should_stop``)
        on the batches of ``make_loader(start_step)``, called only when steps are left."""
        self.call("before_train")
        try:
            if self.will_train:
                batches: Iterator[dict[str, Any]] = iter(make_loader(self.step))
                self.model.train()
                t0, seen = time.perf_counter(), 0
                while self.step < self.max_steps:
                    batch = next(batches)
                    self.call("before_step", batch)
                    self.row = self.run_step(batch)
                    self.step += 1
                    seen += batch["image"].shape[0] * self.env.world_size
                    self.images_per_s = seen / max(time.perf_counter() - t0, 1e-9)
                    self.history.append(self.row)
                    self.call("after_step")
                    if self.state.should_stop:
                        break
            self.call("after_train")
            distributed.barrier()
        finally:
            self.call("close")

    def run_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step; a non-finite loss raises, or with ``train.skip_nonfinite`` skips
        the batch (counted)."""
        try:
            return train_step(self.model, batch, self.optimizer, clip_grad_norm=self.cfg.train.clip_grad_norm,
                              forward=self.forward, weighting=self.weighting, precision=self.precision,
                              scaler=self.scaler if self.precision.needs_scaler else None)
        except NonFiniteLoss as e:
            if not self.cfg.train.skip_nonfinite:
                kept = f"last good checkpoint: {self.last_path}" if self.last_path.exists() \
                    else "no checkpoint written yet"
                raise DensepipeError(f"non-finite loss at step {self.step + 1}: {e}; {kept}") from None
            self.skipped += 1
            log.warning("step %d: skipped a batch with a non-finite loss (%s); %d so far",
                        self.step + 1, e, self.skipped)
            return {"skipped_nonfinite": float(self.skipped)}

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``last.pt``'s payload: the trainer's entries and every hook's, in ``PAYLOAD_ORDER``."""
        step, batch_size = self.step, self.cfg.train.batch_size
        payload = {"step": step, "epoch": step * batch_size // len(self.train_ds),
                   "samples_seen": step * batch_size, "world_size": self.env.world_size,
                   "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scaler": self.scaler.state_dict(), "loss_weighting": self.weighting.state_dict(),
                   "rng": rng_state(), "config": self.cfg.model_dump(mode="json"),
                   "card": self.train_ds.card.to_json(), "metrics": self.state.metrics,
                   "skipped_nonfinite": self.skipped, "hooks": {}}
        self.resume_only = set()  # hooks' entries that best.pt leaves out
        for h in self.hooks:
            entries = h.state_dict()
            payload.update(entries)
            self.resume_only |= set() if h.in_best else set(entries)
        return {**{k: payload[k] for k in PAYLOAD_ORDER if k in payload}, **payload}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue from ``ckpt`` (a ``last.pt``): weights, optimizer, RNG, step, then the hooks."""
        load_model_state(self.model, ckpt["model"], source=self.last_path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("loss_weighting"):
            self.weighting.load_state_dict(ckpt["loss_weighting"])
        set_rng_state(ckpt["rng"])
        self.step, self.state.resumed_from = int(ckpt["step"]), ckpt
        self.run_id, self.state.metrics = ckpt.get("mlflow_run_id"), dict(ckpt.get("metrics") or {})
        if self.run_id is not None:  # the record names this last.pt: its checkpoints are this run's
            self.record = RunRecord.read(self.state.out_dir) or self.record
        self.skipped = int(ckpt.get("skipped_nonfinite", 0))
        for h in self.hooks:
            h.load_state_dict(ckpt)
