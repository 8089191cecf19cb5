"""Several datasets, one model (``data.sources``; UberNet, Kokkinos 2017).

Each source is read exactly as a single dataset would be: ``views(cfg)`` gives, per source, a
config whose ``data.source``, ``root``, ``options`` and splits are that source's, so the formats,
transforms and checks need no notion of sources. Metrics of several sources are told apart by a
suffix: ``semantic/mIoU@nyuv2`` (``with_source``, ``split_source``); a single dataset's metrics
keep their plain names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import METRIC_SOURCE_SEPARATOR, Config, split_source

__all__ = ["SourceView", "labelled_metrics", "split_source", "views", "with_source"]


@dataclass(frozen=True)
class SourceView:
    """One dataset of the run: ``name`` ("" for the single dataset of ``data.source``), ``cfg``
    (the run's config reading it), ``weight`` and ``tasks`` (None: every enabled task)."""

    name: str
    cfg: Config
    weight: float = 1.0
    tasks: tuple[str, ...] | None = None
    class_map: dict[str, str | None] | str | None = None
    """Its semantic classes onto the model's (``SourceConfig.class_map``)."""


def views(cfg: Config) -> list[SourceView]:
    """The run's datasets: one view per ``data.sources`` entry, in order, or the single dataset
    of ``data.source`` / ``root`` / ``options``."""
    if not cfg.data.sources:
        return [SourceView("", cfg)]
    out = []
    for src in cfg.data.sources:
        data = cfg.data.model_copy(update={
            "source": src.source, "root": src.root, "options": dict(src.options),
            "train_split": src.train_split or cfg.data.train_split,
            "val_split": src.val_split or cfg.data.val_split, "sources": []})
        out.append(SourceView(src.name, cfg.model_copy(update={"data": data}), src.weight,
                              None if src.tasks is None else tuple(src.tasks), src.class_map))
    return out


def with_source(metrics: dict[str, float], source: str) -> dict[str, float]:
    """``metrics`` with every key suffixed ``@source`` (unchanged for the single dataset, "")."""
    if not source:
        return dict(metrics)
    return {f"{k}{METRIC_SOURCE_SEPARATOR}{source}": v for k, v in metrics.items()}


def labelled_metrics(metrics: Mapping[str, float], tasks: Mapping[str, Any],
                     label_kinds: Iterable[str]) -> dict[str, float]:
    """``metrics`` without those of tasks (name -> ``Task``) whose required label kinds
    (``Task.requires``) the evaluated split lacks: a source without depth labels reports no depth
    metrics, rather than the scores of an empty evaluation."""
    have = set(label_kinds)
    missing = {name for name, task in tasks.items() if not set(task.requires) <= have}
    return {k: v for k, v in metrics.items() if k.partition("/")[0] not in missing}
