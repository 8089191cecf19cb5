"""Which way each metric is better, and the multi-task performance delta of Vandenhende et al.

``metric_goal`` reads the direction from the task that produced a metric (``Task.lower_is_better``).
``multitask_delta`` is Delta_m of "Multi-Task Learning for Dense Prediction Tasks: A Survey"
(Vandenhende et al., TPAMI 2021)::

    Delta_m = 1/T * sum_i (-1)^{l_i} (M_m,i - M_b,i) / M_b,i

over the tasks' main metrics, ``M_m`` the multi-task model's, ``M_b`` the single-task baseline's,
``l_i = 1`` where lower is better. Positive is better than the baselines; reported in percent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from pipeline.config import split_source
from pipeline.task import Task

Goal = Literal["max", "min"]


def metric_goal(metric: str, tasks: Iterable[Task]) -> Goal:
    """``"min"`` for a ``"<task>/<name>"`` metric (or ``<task>/<name>@<source>``) its task lists
    in ``lower_is_better``, else ``"max"`` (also for metrics of tasks not in ``tasks``)."""
    task_name, _, name = split_source(metric)[0].partition("/")
    for task in tasks:
        if task.name == task_name:
            return "min" if name in task.lower_is_better else "max"
    return "max"


@dataclass(frozen=True)
class TaskDelta:
    task: str
    metric: str
    goal: Goal
    single: float
    multi: float

    @property
    def relative(self) -> float:
        """Sign-corrected relative change (a ratio; 0.05 = 5 % better than the baseline)."""
        sign = -1.0 if self.goal == "min" else 1.0
        return sign * (self.multi - self.single) / self.single


def multitask_delta(multi: Mapping[str, float], singles: Mapping[str, Mapping[str, float]],
                    tasks: Iterable[Task]) -> tuple[float, list[TaskDelta]]:
    """Delta_m in percent over the tasks in ``singles`` (task name -> that single-task model's
    metrics), using each task's ``main_metric`` from ``multi`` and from its baseline.

    Raises ``ValueError`` naming the task when a task has no main metric, a metric is missing
    or not finite, or a baseline is 0 (the relative change is undefined)."""
    by_name = {t.name: t for t in tasks}
    rows: list[TaskDelta] = []
    for name, baseline in singles.items():
        task = by_name.get(name)
        if task is None or task.main_metric is None:
            raise ValueError(f"task {name!r}: expected a registered task with a main_metric")
        key = f"{name}/{task.main_metric}"
        for label, values in (("multi-task", multi), ("single-task", baseline)):
            value = values.get(key)
            if value is None or not math.isfinite(value):
                raise ValueError(f"{key}: expected a finite value in the {label} metrics, got {value}")
        if baseline[key] == 0:
            raise ValueError(f"{key}: the single-task baseline is 0; the relative change is undefined")
        goal: Goal = "min" if task.main_metric in task.lower_is_better else "max"
        rows.append(TaskDelta(name, key, goal, float(baseline[key]), float(multi[key])))
    if not rows:
        raise ValueError("singles: expected at least one single-task baseline")
    return 100.0 * sum(r.relative for r in rows) / len(rows), rows
