"""Prefect flows over ``pipeline.stages``: prepare -> train -> evaluate.

Flow parameters are the config file and ``--set``-style overrides, so a deployment or a schedule
runs exactly what ``densepipe`` would. Deeper orchestration (schedules, caching, artifacts) builds
on these.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402

from pipeline import stages  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402


def _cfg(params: str, overrides: list[str]) -> Config:
    return load_config(params, overrides)


@task(name="prepare", retries=2, retry_delay_seconds=5)
def prepare_task(cfg: Config) -> dict[str, Any]:
    return stages.prepare(cfg)


@task(name="train")
def train_task(cfg: Config) -> dict[str, Any]:
    return stages.train(cfg)


@task(name="evaluate", retries=1, retry_delay_seconds=5)
def evaluate_task(cfg: Config) -> dict[str, float]:
    return stages.evaluate(cfg)


@flow(name="densepipe-pipeline", log_prints=True)
def pipeline_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, float]:
    """prepare, train, evaluate in order; returns the metrics dict."""
    cfg = _cfg(params, list(overrides or []))
    prepare_task(cfg)
    train_task(cfg)
    return evaluate_task(cfg)
