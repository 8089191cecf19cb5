"""Parameter sweeps as a Prefect flow: one train + evaluate trial per point of a grid, run on a
Prefect task runner, so the same flow fans out over threads here or a Dask / Ray cluster.

    from flows.sweep import sweep_flow, task_runner
    sweep_flow.with_options(task_runner=task_runner("dask", workers=4))(
        grid={"train.lr": [0.001, 0.004], "train.loss_weighting.method": ["fixed", "dwa"]})

``task_runner("dask")`` starts a local Dask cluster of processes; for an existing cluster pass
``prefect_dask.DaskTaskRunner(address="tcp://scheduler:8786")``, and for Ray
``prefect_ray.RayTaskRunner(address=...)`` (``pip install prefect-ray``). Each trial trains into
``<out_dir>/trial-NNN`` and is an MLflow training run nested under one ``sweep`` parent run.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.report import metrics_markdown, publish_report
from pipeline import stages
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.io import atomic_write_json
from pipeline.tracking import parent_run

# Imports inside functions: prefect_dask is an extra's (the Dask task runner).

RUNNERS = ("thread", "dask")


def task_runner(name: str, *, workers: int = 2) -> Any:
    """A Prefect task runner by name: ``thread`` (this process) or ``dask`` (a local cluster of
    ``workers`` single-threaded processes; needs ``prefect-dask``)."""
    if name == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if name == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError("runner 'dask' needs prefect-dask: pip install 'densepipe[dask]'") from None
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    raise ConfigError(f"runner {name!r}: expected one of {', '.join(RUNNERS)}")


def grid_points(grid: dict[str, list[Any]]) -> list[list[str]]:
    """Every combination of ``grid`` (key -> values) as ``--set`` override lists, in key order."""
    for key, values in grid.items():
        if not isinstance(values, list | tuple) or not values:
            raise ConfigError(f"grid {key}: expected a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
            for combo in itertools.product(*(grid[k] for k in keys))]


@task(name="trial")
def trial_task(params: str, overrides: list[str], trial_dir: str,
               parent_run_id: str | None = None) -> dict[str, Any]:
    """Train and evaluate one grid point into ``trial_dir``; returns its overrides and metrics."""
    out = Path(trial_dir)
    cfg = load_config(params, [*overrides, f"train.out_dir={out / 'train'}",
                               f"evaluate.out_dir={out / 'eval'}",
                               f"evaluate.metrics_file={out / 'metrics.json'}"])
    trained = stages.train(cfg, parent_run_id=parent_run_id)
    metrics = stages.evaluate(cfg)  # nests under the trial's training run
    return {"trial": out.name, "overrides": overrides, "run_id": trained["run_id"], "metrics": metrics}


@flow(name="densepipe-sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def sweep_flow(grid: dict[str, list[Any]], params: str = "params.yaml",
               overrides: list[str] | None = None, out_dir: str = "runs/sweep",
               metric: str = "semantic/mIoU") -> list[dict[str, Any]]:
    """One trial per point of ``grid`` on the flow's task runner, after one shared ``prepare``.

    Returns the trials sorted best first by ``metric`` (higher is better); writes them to
    ``<out_dir>/sweep.json`` and a ``densepipe-sweep`` markdown artifact."""
    base = list(overrides or [])
    points = grid_points(grid)
    cfg = load_config(params, base)
    stages.prepare(cfg)
    with parent_run(cfg.tracking, run_name="sweep", params={"sweep.grid": grid, **cfg.flat()}) as tracker:
        parent_id = tracker.run_id if tracker is not None else None
        futures = [trial_task.submit(params, [*base, *point], str(Path(out_dir) / f"trial-{i:03d}"),
                                     parent_id) for i, point in enumerate(points)]
        trials = [f.result() for f in futures]
    if not any(metric in t["metrics"] for t in trials):
        raise ConfigError(f"sweep metric {metric!r}: no trial reports it; "
                          f"reported: {', '.join(sorted(trials[0]['metrics'])[:8])}")
    trials.sort(key=lambda t: t["metrics"].get(metric, float("-inf")), reverse=True)
    atomic_write_json(Path(out_dir) / "sweep.json", trials)
    best = trials[0]
    publish_report(metrics_markdown(best["metrics"], title=f"densepipe sweep: best {metric}",
                                    notes=[f"{t['trial']} {' '.join(t['overrides'][len(base):])}: "
                                           f"{metric} = {t['metrics'].get(metric, float('nan')):.4f}"
                                           for t in trials]),
                   key="densepipe-sweep", description=f"{len(trials)} trials ranked by {metric}")
    return trials
