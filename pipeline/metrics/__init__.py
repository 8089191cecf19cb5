"""Evaluation metrics the core shares: merging shards (``merge``), array helpers (``arrays``), the
multi-task selection metric (``multitask``), the plot files (``plot_data``) and the headline
filter below. Each task's own metrics live in its plugin (``plugins.<task>``)."""

from __future__ import annotations


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The ``task/metric`` entries of a flat metrics dict: per-class and per-group values
    (``task/IoU/<class>``) left out; the tables the CLI, the registry and reports print."""
    return {k: v for k, v in metrics.items() if k.count("/") == 1}

