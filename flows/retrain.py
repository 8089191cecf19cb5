"""The ``densepipe-retrain`` flow: scheduled retraining that decides something.

    data -> check -> train -> compare -> promote -> serve

1. **check**: prepare (cached), then fingerprint the inputs (``pipeline.fingerprint``: the data
   under ``data.root``, the params that change training, the code). When the champion
   (``models:/<registered_model>@<promote.alias>``) was trained from the same inputs, the run ends
   Completed in seconds with one line saying so; the MLflow parent run records the skip
   (``densepipe.retrain.outcome: skipped``). ``force`` trains anyway.
2. **train**: a challenger into ``<train.out_dir>/challenger-<inputs digest>`` (a failed run
   resumes it on the next one), evaluated on the validation split and registered as a new
   version tagged with its inputs.
3. **compare**: the champion is re-evaluated on the same split when its metrics were measured on
   other data; the promotion rule (``pipeline.champion.compare``, the ``promote`` section) decides.
4. **promote**: the alias moves to the challenger (an MLflow ``promote`` run), or the champion
   stays and the challenger keeps its comparison as tags. The comparison is a Prefect markdown
   artifact (``densepipe-retrain``) and MLflow artifacts of the parent run (``comparison/``: the
   table, a bar chart and the JSON).
5. **serve**: whatever reads ``models:/<name>@<alias>`` now gets the new champion.

The outcome (``promoted``, ``kept``, ``skipped``, ``failed``) is POSTed to ``promote.notify_url``
by the flow's completion and failure hooks (``flows.notify``).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.notify import notify_outcome
from flows.report import publish_report
from flows.tasks import evaluate_task, register_task, run_prepare, train_task
from pipeline import champion as ch
from pipeline.config import (
    Config,
    check_registry_tracking,
    load_config,
    resolve_best_metric,
    split_source,
)
from pipeline.errors import ConfigError
from pipeline.fingerprint import changed, inputs_fingerprint
from pipeline.metrics import headline_metrics
from pipeline.metrics.multitask import metric_goal
from pipeline.registry import default_registry
from pipeline.tracking import parent_run

REPORT_KEY = "densepipe-retrain"
OUTCOME_TAG = "densepipe.retrain.outcome"
REASON_TAG = "densepipe.retrain.reason"


def _cfg(params: str, overrides: list[str]) -> Config:
    cfg = load_config(params, overrides)
    check_registry_tracking(cfg, "retrain")
    return cfg


@flow(name="densepipe-retrain", log_prints=True, on_completion=[notify_outcome],
      on_failure=[notify_outcome], on_crashed=[notify_outcome])
def retrain_flow(params: str = "params.yaml", overrides: list[str] | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Check, train a challenger, compare, promote (module doc). Returns ``{"outcome", "reason",
    "changed", "champion", "challenger", "comparison", "metrics"}``: ``outcome`` is ``promoted``,
    ``kept`` or ``skipped``; ``changed`` the input parts that differ from the champion's (data,
    params, code; all three without a champion)."""
    overrides = list(overrides or [])
    cfg = _cfg(params, overrides)
    name, alias = cfg.tracking.registered_model, cfg.promote.alias
    run_name = f"retrain-{flow_run.get_name() or 'local'}"
    with parent_run(cfg.tracking, run_name=run_name, params=cfg.flat(),
                    tags={"prefect.flow_run_id": str(flow_run.get_id() or ""),
                          "densepipe.stage": "retrain"}) as tracker:
        assert tracker is not None  # tracking is on (_cfg)
        parent_id = tracker.run_id
        run_prepare(cfg, parent_id)
        inputs = inputs_fingerprint(cfg)
        tracker.set_tags({ch.INPUTS_TAG.format(part=k): v for k, v in inputs.items()})
        champ = ch.champion_of(tracker, name, alias)
        parts = changed(champ.inputs if champ else None, inputs)
        if champ is not None and not parts and not force:
            line = (f"skipped: nothing changed since {name}@{alias} (version {champ.version}) was "
                    f"trained (same data, params and code); no training")
            print(line)
            tracker.set_tags({OUTCOME_TAG: "skipped", REASON_TAG: line})
            publish_report(f"# densepipe {run_name}\n\n{line}\n", key=REPORT_KEY,
                           description="densepipe retraining outcome")
            return {"outcome": "skipped", "reason": line, "changed": [], "champion": champ.version,
                    "challenger": None, "comparison": None, "metrics": champ.metrics}
        why = ("no champion yet" if champ is None else
               "forced" if not parts else f"changed since version {champ.version}: {', '.join(parts)}")
        print(f"training a challenger ({why})")

        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
        folder = Path(cfg.train.out_dir) / f"challenger-{digest}"
        ccfg = load_config(params, [*overrides, f"train.out_dir={folder}",
                                    f"evaluate.out_dir={folder / 'eval'}",
                                    f"evaluate.metrics_file={folder / 'metrics.json'}"])
        trained = train_task(ccfg, parent_run_id=parent_id)
        metrics = evaluate_task(ccfg, parent_run_id=parent_id)
        version = register_task(ccfg, model_uri=trained.get("model_uri"), metrics=metrics,
                                parent_run_id=parent_id)["version"]
        ch.tag_version(tracker, name, version, {
            **{ch.INPUTS_TAG.format(part=k): v for k, v in inputs.items()},
            ch.EVAL_DATA_TAG: inputs["data"]})

        if champ is not None and champ.eval_data != inputs["data"]:
            print(f"re-evaluating the champion (version {champ.version}) on the current data: its "
                  f"metrics were measured on other data")
            ecfg = load_config(params, [*overrides, f"evaluate.out_dir={folder / 'champion-eval'}",
                                        f"evaluate.metrics_file={folder / 'champion-metrics.json'}"])
            champ_metrics = evaluate_task(ecfg, model_uri=f"models:/{name}/{champ.version}",
                                          parent_run_id=parent_id)
            ch.tag_version(tracker, name, champ.version,
                           {**ch.metric_tags(champ_metrics), ch.EVAL_DATA_TAG: inputs["data"]})
            champ = ch.Champion(champ.version, headline_metrics(champ_metrics), champ.inputs,
                                inputs["data"])

        comparison = _compare(cfg, metrics, champ, version)
        outcome = "promoted" if comparison.promote else "kept"
        print(comparison.reason)
        ch.tag_version(tracker, name, version, {
            ch.DECISION_TAG: outcome, ch.COMPARED_TAG: champ.version if champ else "none",
            **{f"densepipe.compare.{r.metric}": _row_tag(r) for r in comparison.rows}})
        if comparison.promote:
            ch.move_alias(tracker, name, alias, version, reason=comparison.reason,
                          parent_run_id=parent_id)
        tracker.set_tags({OUTCOME_TAG: outcome, REASON_TAG: comparison.reason[:5000]})
        markdown = ch.comparison_markdown(comparison, name=name, alias=alias)
        _log_comparison(tracker, comparison, markdown)
        publish_report(f"# densepipe {run_name}\n\n{markdown}", key=REPORT_KEY,
                       description="densepipe retraining: champion vs challenger")
    return {"outcome": outcome, "reason": comparison.reason, "changed": parts,
            "champion": champ.version if champ else None, "challenger": version,
            "comparison": comparison.to_json(), "metrics": headline_metrics(metrics)}


def _compare(cfg: Config, metrics: dict[str, float], champ: ch.Champion | None,
             version: str) -> ch.Comparison:
    """The promotion rule with the enabled tasks' main metrics and directions."""
    tasks = default_registry().resolve(cfg.model.tasks)
    primary = cfg.promote.primary_metric
    if primary == "auto":
        primary = resolve_best_metric(cfg.train.best_metric, cfg.model.tasks, tasks,
                                      cfg.data.sources) or ""
    if not primary:
        raise ConfigError("promote.primary_metric auto: no enabled task has a main metric; name one "
                          "(<task>/<metric>)")
    guards = [f"{t.name}/{t.main_metric}" for t in tasks if t.main_metric]
    if cfg.data.sources:  # each source's main metrics that the challenger reports
        guards = [k for k in headline_metrics(metrics) if split_source(k)[0] in guards]
    goals = {m: metric_goal(m, tasks) for m in [primary, *guards]}
    return ch.compare(headline_metrics(metrics), champ, challenger_version=version, primary=primary,
                      guards=guards, goals=goals, min_gain=cfg.promote.min_gain,
                      tolerance=cfg.promote.tolerance)


def _row_tag(row: ch.MetricRow) -> str:
    change = "" if row.change is None else f" change={row.change:+.4f}"
    return (f"champion={'-' if row.champion is None else f'{row.champion:.6g}'} "
            f"challenger={'-' if row.challenger is None else f'{row.challenger:.6g}'}{change} "
            f"ok={'yes' if row.ok else 'no'}")


def _log_comparison(tracker: Any, comparison: ch.Comparison, markdown: str) -> None:
    """comparison.md, comparison.png and comparison.json under ``comparison/`` of the run."""
    with tempfile.TemporaryDirectory(prefix="densepipe-compare-") as tmp:
        folder = Path(tmp)
        (folder / "comparison.md").write_text(markdown)
        (folder / "comparison.json").write_text(json.dumps(comparison.to_json(), indent=2))
        ch.comparison_chart(comparison, folder / "comparison.png")
        for path in sorted(folder.iterdir()):
            tracker.log_artifact(path, "comparison")
