"""Prefect flows over ``pipeline.stages``: ``prepare``, ``train``, ``evaluate`` and ``pipeline``.

Flow parameters are the config file and ``--set``-style overrides (``["train.lr=0.01"]``), so a
deployment or a schedule runs exactly what ``densepipe`` would. The ``pipeline`` flow is one MLflow
parent run with a nested run per stage, registers the model and leaves a markdown artifact
(``densepipe-metrics``) with the metrics and the MLflow links. Retry and cache policies: ``flows.tasks``.
"""

from __future__ import annotations

if __name__ == "pipeline":  # run from its file path (Prefect's `flows/pipeline.py:pipeline_flow`)
    raise ImportError("flows/pipeline.py was loaded from its file path as a module named 'pipeline', which "
                      "shadows densepipe's pipeline package; use the module entrypoint "
                      "flows.pipeline.pipeline_flow (as prefect.yaml does)")

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.report import metrics_markdown, publish_report
from flows.tasks import evaluate_task, register_task, run_prepare, train_task
from pipeline.config import Config, load_config
from pipeline.tracking import SKIPPED_TAG, parent_run

REPORT_KEY = "densepipe-metrics"


def _cfg(params: str, overrides: list[str] | None) -> Config:
    return load_config(params, list(overrides or []))


@flow(name="densepipe-prepare", log_prints=True)
def prepare_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Render (or check) the dataset; cached on its parameters and code."""
    return run_prepare(_cfg(params, overrides))


@flow(name="densepipe-train", log_prints=True)
def train_flow(params: str = "params.yaml", overrides: list[str] | None = None,
               nproc_per_node: int = 1) -> dict[str, Any]:
    """Train (resuming from ``last.pt``); ``nproc_per_node > 1`` runs torchrun on this machine."""
    return train_task(_cfg(params, overrides), nproc_per_node=nproc_per_node)


@flow(name="densepipe-evaluate", log_prints=True)
def evaluate_flow(params: str = "params.yaml", overrides: list[str] | None = None,
                  model: str | None = None) -> dict[str, float]:
    """Evaluate the best checkpoint, or the MLflow model ``model`` (``models:/densepipe/latest``)."""
    return evaluate_task(_cfg(params, overrides), model_uri=model)


@flow(name="densepipe-pipeline", log_prints=True)
def pipeline_flow(params: str = "params.yaml", overrides: list[str] | None = None,
                  register_model: bool = True, nproc_per_node: int = 1) -> dict[str, float]:
    """prepare, train, evaluate and (with tracking on and ``register_model``) register, in order;
    returns the metrics dict. A run whose checkpoint is already trained to ``train.steps`` trains
    nothing, re-evaluates, and registers no duplicate version."""
    overrides = list(overrides or [])
    cfg = _cfg(params, overrides)
    run_name = f"pipeline-{flow_run.get_name() or 'local'}"
    with parent_run(cfg.tracking, run_name=run_name, params=cfg.flat(),
                    tags={"prefect.flow_run_id": str(flow_run.get_id() or "")}) as tracker:
        parent_id = tracker.run_id if tracker is not None else None
        prepared = run_prepare(cfg, parent_id)
        if prepared["cached"]:
            source = prepared.get("run_id")
            note = (f"cached: Prefect's prepare cache answered (same data.* params, data code and "
                    f"{cfg.data.root} still holds the dataset)"
                    + (f"; prepared in MLflow run {source}" if source else ""))
            print(f"prepare {note}")
            if tracker is not None:
                tracker.set_tags({SKIPPED_TAG.format(stage="prepare"): note})
        trained = train_task(cfg, parent_run_id=parent_id, nproc_per_node=nproc_per_node)
        metrics = evaluate_task(cfg, parent_run_id=parent_id)
        links: dict[str, str] = {}
        notes = [f"checkpoint `{trained['best']}` at step {trained['step']}"]
        if tracker is not None:
            links[f"MLflow pipeline run {parent_id}"] = tracker.run_link()
            if register_model and trained.get("steps_run", 1) == 0:
                notes.append("the checkpoint was already trained to train.steps: registry unchanged")
            elif register_model:
                version = register_task(cfg, model_uri=trained.get("model_uri"), metrics=metrics,
                                        parent_run_id=parent_id)
                notes.append(f"registered `{version['model_uri']}`: "
                             f"`densepipe evaluate --model models:/{version['name']}/latest`")
        publish_report(metrics_markdown(metrics, title=f"densepipe {run_name}", links=links, notes=notes),
                       key=REPORT_KEY, description="densepipe pipeline metrics")
    return metrics
