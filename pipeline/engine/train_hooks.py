"""The training loop's built-in hooks (``train_loop.HookBase``), in the order ``trainer.py`` runs
them: ``LRScheduler``, ``PluginHooks``, ``ProgressLogger``, [``MLflowTracking`` and other extra
hooks], ``PeriodicEvaluation``, ``Checkpointer`` (rank 0), ``EarlyStopping``."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console  # at import, not in training: rich.style draws from Python's RNG
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from pipeline.data.sources import labelled_metrics, with_source
from pipeline.engine.checkpoint import save_checkpoint, weights_payload
from pipeline.engine.evaluation import evaluate_model
from pipeline.engine.hooks import HookRunner, build_hooks
from pipeline.engine.loaders import eval_datasets, eval_loader, loaded_kinds
from pipeline.engine.train_loop import HookBase, log
from pipeline.io import atomic_write_text

if TYPE_CHECKING:
    from pipeline.tracking import Tracker

TRAIN_LOG = "train_log.csv"


def _log_due(step: int, cfg: Any) -> bool:
    return step % cfg.train.log_every == 0 or step == cfg.train.steps


class LRScheduler(HookBase):
    """Steps the learning-rate schedule after every step, skipped ones too (it follows the step
    count). Entry ``scheduler``."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler

    def after_step(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(checkpoint["scheduler"])


class PluginHooks(HookBase):
    """The plugin lifecycle hooks (``pipeline.hookspecs``): built-ins enabled by config, the
    ``densepipe.hooks`` entry points and ``extra`` (loaded at ``before_train``), called with
    ``trainer.state``. Plugins keep their own state in ``payload["hooks"]``."""

    def __init__(self, extra: Any = ()) -> None:
        self.extra = extra
        self.runner: HookRunner | None = None

    def _call(self, hook: str, **kwargs: Any) -> None:
        assert self.runner is not None
        self.runner.call(f"densepipe_{hook}", state=self.trainer.state, **kwargs)

    def before_train(self) -> None:
        self.runner = build_hooks(self.trainer.cfg, self.extra)
        self._call("train_start")

    def before_step(self, batch: dict[str, Any]) -> None:
        self._call("before_step", batch=batch)

    def after_step(self) -> None:
        self._call("after_step", losses=self.trainer.row)

    def before_evaluation(self) -> None:
        self._call("before_evaluation")

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        self._call("after_evaluation", metrics=metrics)

    def on_checkpoint(self, payload: dict[str, Any], path: Path) -> None:
        self._call("on_checkpoint", payload=payload, path=path)

    def after_train(self) -> None:
        self._call("train_end")


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


class ProgressLogger(HookBase):
    """Each step's losses and images/s: a progress bar (``train.progress``, on a terminal) or a
    line every ``train.log_every`` steps; silent on ranks other than 0."""

    progress: _Progress | None = None

    def before_train(self) -> None:
        t = self.trainer
        if t.will_train:
            self.progress = _Progress(total=t.max_steps, start=t.step, enabled=t.cfg.train.progress,
                                      silent=not t.env.is_main)

    def after_step(self) -> None:
        t = self.trainer
        info = " ".join(f"{k}={v:.3f}" for k, v in t.row.items()
                        if not k.startswith("weight/")) + f" {t.images_per_s:.1f} img/s"
        assert self.progress is not None
        self.progress.update(t.step, info, log_line=_log_due(t.step, t.cfg))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


class MLflowTracking(HookBase):
    """The training's MLflow run (rank 0): started, or continued from the checkpoint's run, when
    steps are left (else the run that trained the checkpoint is left as it is); params; ``train/``
    metrics every ``train.log_every`` steps (loss weights every step when they adapt); ``val/``
    metrics after each evaluation; summary tags at the end."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.ended = False

    def before_train(self) -> None:
        t = self.trainer
        if t.will_train:
            t.run_id = self.tracker.start(run_id=t.run_id,
                                          run_name=f"train-{'-'.join(t.cfg.model.tasks)}",
                                          tags={"densepipe.stage": "train"})
            self.tracker.log_params(t.cfg.flat())

    def after_step(self) -> None:
        t = self.trainer
        log_now = _log_due(t.step, t.cfg)
        if log_now or t.cfg.train.loss_weighting.method != "fixed":
            logged = {f"train/{k}": v for k, v in t.row.items() if log_now or k.startswith("weight/")}
            if log_now:
                logged.update({"train/lr": t.scheduler.get_last_lr()[0],
                               "train/images_per_s": t.images_per_s,
                               "train/skipped_nonfinite": t.skipped})
            self.tracker.log_metrics(logged, t.step)

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, self.trainer.step)

    def after_train(self) -> None:
        self.ended = True  # the tags come in close: after the final best.pt and the ranks' meeting

    def close(self) -> None:
        t = self.trainer
        if self.ended and self.tracker.run_id is not None:
            best = t.checkpointer.best_value if t.checkpointer is not None else None
            self.tracker.set_tags({"densepipe.best_metric": t.best_metric or "none (last)",
                                   "densepipe.best_value": str(best),
                                   "densepipe.skipped_nonfinite": str(t.skipped),
                                   "densepipe.stopped_early": str(t.stopped_early)})


class PeriodicEvaluation(HookBase):
    """Evaluates on the val split every ``train.eval_every`` steps and after the last one (every
    rank its shard), between the ``before_evaluation`` / ``after_evaluation(metrics)`` events;
    the metrics become ``trainer.state.metrics``."""

    def __init__(self) -> None:
        self.loaders: dict[str, Any] | None = None
        self.kinds: dict[str, tuple[str, ...]] = {}

    def after_step(self) -> None:
        t, every = self.trainer, self.trainer.cfg.train.eval_every
        if not ((every and t.step % every == 0) or t.step == t.max_steps):
            return
        if self.loaders is None:  # one per source (data.sources), or the one dataset ("")
            datasets = eval_datasets(t.cfg, tasks=list(t.model.tasks))
            self.kinds = {name: loaded_kinds(ds) for name, ds in datasets.items()}
            self.loaders = {name: eval_loader(t.cfg, ds, batch_size=t.cfg.evaluate.batch_size,
                                              rank=t.env.rank, world_size=t.env.world_size)
                            for name, ds in datasets.items()}
        t.call("before_evaluation")
        metrics: dict[str, float] = {}
        for name, loader in self.loaders.items():
            found, _ = evaluate_model(t.model, loader, device=t.device, distributed=t.env.enabled)
            if name:  # one of data.sources: only the tasks it has labels for
                found = labelled_metrics(found, t.model.tasks, self.kinds[name])
            metrics.update(with_source(found, name))
        t.state.metrics = metrics
        t.call("after_evaluation", metrics)


class Checkpointer(HookBase):
    """Rank 0's files: ``last.pt`` every ``train.checkpoint_every`` steps, after each evaluation,
    at the last step and when stopping (``train_log.csv`` rewritten first); ``best.pt`` (weights
    only) at each evaluation that improves ``trainer.best_metric`` (``goal``: max or min), and at
    the end when there is none yet. Entry ``best_value`` (also in ``best.pt``)."""

    in_best = True

    def __init__(self, *, goal: str) -> None:
        self.goal = goal
        self.best_value: float | None = None
        self.evaluated = False
        self.train_log: TrainLog | None = None

    def before_train(self) -> None:
        t = self.trainer
        self.train_log = TrainLog(t.state.out_dir / TRAIN_LOG, resume_step=t.step)

    def after_step(self) -> None:
        t = self.trainer
        assert self.train_log is not None
        self.train_log.add(t.step, t.row)
        if self.evaluated or t.step % t.cfg.train.checkpoint_every == 0 or t.step == t.max_steps \
                or t.state.should_stop:
            self.save(t.last_path)
        self.evaluated = False

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        best_metric = self.trainer.best_metric
        value = metrics.get(best_metric) if best_metric else None
        if value is not None and math.isfinite(value) and (
                self.best_value is None
                or (value > self.best_value if self.goal == "max" else value < self.best_value)):
            self.best_value = value
            self.save(self.trainer.best_path)
        self.evaluated = True

    def after_train(self) -> None:
        if not self.trainer.best_path.exists():
            self.save(self.trainer.best_path)

    def save(self, path: Path) -> None:
        t = self.trainer
        payload = t.state_dict()
        t.call("on_checkpoint", payload, path)
        if path == t.last_path and self.train_log is not None:
            self.train_log.write()  # first: the log covers at least the checkpoint's steps
        t.record.start(t.run_id)  # the MLflow run id stays out of the checkpoint's bytes
        if path != t.last_path:
            payload = {k: v for k, v in weights_payload(payload).items() if k not in t.resume_only}
        save_checkpoint(path, payload, record=t.record)

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.best_value = checkpoint.get("best_value")


class EarlyStopping(HookBase):
    """``train.early_stopping``: counts evaluations without an improvement of ``min_delta`` in
    ``metric`` (``goal``: max or min) and stops training after ``patience`` of them (never when
    ``patience`` is 0). Entry ``early_stopping``; a resumed stopped run trains no more."""

    def __init__(self, *, metric: str, patience: int, min_delta: float, goal: str) -> None:
        self.metric, self.patience, self.min_delta, self.goal = metric, patience, min_delta, goal
        self.best: float | None = None
        self.bad_evals = 0
        self.stopped = False

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

    def after_evaluation(self, metrics: dict[str, float]) -> None:
        if self.update(metrics.get(self.metric)):
            self.trainer.stopped_early = self.trainer.state.should_stop = True
            log.warning("early stopping at step %d: %s did not improve by more than %g in %d "
                        "evaluations", self.trainer.step, self.metric, self.min_delta, self.patience)

    def state_dict(self) -> dict[str, Any]:
        return {"early_stopping": {"best": self.best, "bad_evals": self.bad_evals,
                                   "stopped": self.stopped}}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("early_stopping")
        if state:
            self.best, self.bad_evals = state["best"], int(state["bad_evals"])
            self.stopped = bool(state["stopped"])
            self.trainer.stopped_early = self.stopped


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
