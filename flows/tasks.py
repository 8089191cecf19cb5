"""Prefect tasks over ``pipeline.stages``, with the retry and caching policy of each.

- Retries with a delay on the steps that read data or call the tracking server (``prepare``,
  ``evaluate``, ``register``), and only for errors a retry can fix (``retry_transient``): I/O and
  connection errors, timeouts, an unreachable tracking server. A bad config, a corrupt file, a
  missing checkpoint or model, or a bug fails at once.
- ``prepare`` is cached on its parameters (the ``data`` section, the absolute data root) and its
  code (``pipeline/data`` and the modules the stage runs), so an unchanged prepare is not redone.
  When the data folder no longer holds that dataset the cache is refreshed rather than trusted.
- ``train`` is not retried (a failed run resumes from ``last.pt`` on the next flow run). With
  ``nproc_per_node > 1`` it runs ``torchrun --standalone`` in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import State

from pipeline import stages
from pipeline.config import Config
from pipeline.errors import TrackingUnreachableError

RETRY_DELAY_S = 10
PACKAGE = Path(stages.__file__).parent
PREPARE_CODE = ("data", "stages.py", "config.py", "io.py", "errors.py")
"""What ``prepare`` runs, relative to ``pipeline/`` (dvc.yaml's prepare deps name the same)."""
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def retry_transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O and connection errors, timeouts and an
    unreachable tracking server; not a missing or unreadable path, a user error or a bug."""
    error = state.data if isinstance(state.data, BaseException) else None
    if isinstance(error, PERMANENT_OS_ERRORS):
        return False
    return isinstance(error, OSError | TimeoutError | TrackingUnreachableError)


def code_digest(root: Path = PACKAGE, parts: tuple[str, ...] = PREPARE_CODE) -> str:
    """SHA-256 over the ``.py`` files of ``parts`` (files or folders under ``root``), names and
    contents, sorted."""
    h = hashlib.sha256()
    files = sorted(p for part in parts
                   for p in ((root / part).rglob("*.py") if (root / part).is_dir() else [root / part]))
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def prepare_cache_key(context: TaskRunContext | None, parameters: dict[str, Any]) -> str:
    """The ``data`` section, the absolute data root and the data code, hashed."""
    cfg: Config = parameters["cfg"]
    payload = {"data": cfg.data.model_dump(mode="json"), "root": str(Path(cfg.data.root).resolve()),
               "code": code_digest()}
    return "densepipe-prepare-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@task(name="prepare", retries=2, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_transient,
      cache_key_fn=prepare_cache_key, persist_result=True)
def prepare_task(cfg: Config, parent_run_id: str | None = None) -> dict[str, Any]:
    return stages.prepare(cfg, parent_run_id=parent_run_id)


def run_prepare(cfg: Config, parent_run_id: str | None = None) -> dict[str, Any]:
    """``prepare_task``, refreshing its cache when the dataset is no longer on disk. The summary
    has ``cached: True`` when Prefect's cache answered (the stage did not run; its ``run_id`` is
    then the MLflow run of the prepare that did)."""
    state = prepare_task.with_options(refresh_cache=not stages.dataset_ready(cfg))(
        cfg, parent_run_id, return_state=True)
    summary = dict(state.result())
    summary["cached"] = state.name == "Cached"
    return summary


@task(name="train")
def train_task(cfg: Config, *, parent_run_id: str | None = None,
               nproc_per_node: int = 1) -> dict[str, Any]:
    """Train in this process, or under ``torchrun`` on ``nproc_per_node`` local processes (the
    summary then comes from ``<train.out_dir>/train_summary.json``, written by rank 0)."""
    if nproc_per_node <= 1:
        return stages.train(cfg, parent_run_id=parent_run_id)
    return train_with_torchrun(cfg, parent_run_id=parent_run_id, nproc_per_node=nproc_per_node)


def train_with_torchrun(cfg: Config, *, parent_run_id: str | None,
                        nproc_per_node: int) -> dict[str, Any]:
    """``torchrun --standalone --nproc_per_node=N -m pipeline.cli train`` with ``cfg`` itself: the
    resolved config is written to a temporary params file every process loads (no params path
    and override strings travel alongside the config)."""
    with tempfile.TemporaryDirectory(prefix="densepipe-torchrun-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc_per_node}", "-m", "pipeline.cli", "train", "--params",
               str(params)]
        if parent_run_id is not None:
            cmd += ["--parent-run-id", parent_run_id]
        logger = get_run_logger()
        logger.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        logger.error("torchrun output:\n%s", "\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"torchrun training exited with {proc.returncode}: {last}")
    return json.loads((Path(cfg.train.out_dir) / stages.TRAIN_SUMMARY).read_text())


@task(name="evaluate", retries=2, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_transient)
def evaluate_task(cfg: Config, *, model_uri: str | None = None,
                  parent_run_id: str | None = None) -> dict[str, float]:
    return stages.evaluate(cfg, model_uri=model_uri, parent_run_id=parent_run_id)


@task(name="register", retries=2, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retry_transient)
def register_task(cfg: Config, *, model_uri: str | None, metrics: dict[str, float],
                  parent_run_id: str | None = None) -> dict[str, str]:
    return stages.register(cfg, model_uri=model_uri, metrics=metrics, parent_run_id=parent_run_id)
