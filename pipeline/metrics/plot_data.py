"""Plot data for DVC (``dvc plots show``) and MLflow: rows of JSON records, one file per plot.

Every plot file is a JSON list of flat records (``[{"field": value, ...}, ...]``), the layout DVC's
vega templates read (``x``/``y`` name record fields):

- ``per_class_iou.json``: ``{"class": str, "IoU": float}`` per class, from the metrics keys
  ``<task>/IoU/<class>`` (the semantic evaluator reports every class with a non-empty union). With
  more than one task reporting per-class IoU, ``class`` is ``<task>/<class>``. IoU in [0, 1].
- ``pr_<task>_<type>.json`` (``pr_<task>.json`` when the type is the task's name, e.g. keypoints):
  COCO precision-recall curve, ``{"recall": float, "precision": float}`` at pycocotools' 101 recall
  thresholds, IoU (or OKS) threshold 0.5, area range ``all``, the largest ``maxDets``, precision
  averaged over the categories that have ground truth. The mean of ``precision`` over the rows is
  that type's ``AP50`` as pycocotools reports it. Recall levels the detector never reaches have
  precision 0.

The row builders are pure; :func:`write_plot_files` writes a folder of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import atomic_write_json

PER_CLASS_IOU_FILE = "per_class_iou.json"
DIGITS = 6  # rounding of the values written: byte-stable files, far below any metric's noise


def per_class_iou_rows(metrics: Mapping[str, float]) -> list[dict[str, Any]]:
    """``[{"class": name, "IoU": value}]`` from the ``<task>/IoU/<class>`` keys of ``metrics``.

    Rows keep the order of ``metrics``; ``class`` is ``<task>/<class>`` when several tasks report
    per-class IoU. Non-finite values are left out (no JSON for NaN)."""
    found: list[tuple[str, str, float]] = []
    for key, value in metrics.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[1] == "IoU" and np.isfinite(value):
            found.append((parts[0], parts[2], float(value)))
    several = len({task for task, _, _ in found}) > 1
    return [{"class": f"{task}/{name}" if several else name, "IoU": round(value, DIGITS)}
            for task, name, value in found]


def pr_curve_rows(
    precision: np.ndarray, recall_thresholds: np.ndarray, iou_thresholds: np.ndarray, *,
    iou: float = 0.5, area_index: int = 0, max_dets_index: int = -1,
) -> list[dict[str, float]]:
    """``[{"recall": r, "precision": p}]``, one row per recall threshold, from pycocotools.

    ``precision``: ``COCOeval.eval["precision"]``, shape T x R x K x A x M (IoU thresholds, recall
    thresholds, categories, area ranges, maxDets), -1 where a category has no ground truth.
    ``recall_thresholds`` (R) and ``iou_thresholds`` (T) are ``COCOeval.params.recThrs`` / ``iouThrs``.
    The curve is at IoU ``iou``, area range ``area_index`` (0 = all), maxDets ``max_dets_index``
    (-1 = the largest); precision is the mean over categories with ground truth. No such category:
    ``[]``. Raises ``ValueError`` for mismatched shapes or an IoU threshold not in the table."""
    precision = np.asarray(precision, dtype=np.float64)
    recall_thresholds = np.asarray(recall_thresholds, dtype=np.float64).reshape(-1)
    iou_thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if precision.ndim != 5 or precision.shape[:2] != (iou_thresholds.size, recall_thresholds.size):
        raise ValueError(f"precision has shape {precision.shape}; expected T x R x K x A x M with "
                         f"T={iou_thresholds.size} IoU and R={recall_thresholds.size} recall thresholds")
    match = np.flatnonzero(np.isclose(iou_thresholds, iou))
    if match.size == 0:
        raise ValueError(f"IoU threshold {iou} is not among {iou_thresholds.round(2).tolist()}")
    table = precision[match[0], :, :, area_index, max_dets_index]  # R x K
    defined = (table > -1).all(axis=0)
    if not defined.any():
        return []
    curve = table[:, defined].mean(axis=1)
    return [{"recall": round(float(r), DIGITS), "precision": round(float(p), DIGITS)}
            for r, p in zip(recall_thresholds, curve, strict=True)]


def pr_file_name(task: str, iou_type: str) -> str:
    """``pr_<task>_<type>.json``, or ``pr_<task>.json`` when the type is the task's own name."""
    return f"pr_{task}.json" if iou_type == task else f"pr_{task}_{iou_type}.json"


def write_plot_files(folder: str | Path, *, metrics: Mapping[str, float],
                     pr_curves: Mapping[str, list[dict[str, float]]]) -> list[Path]:
    """Write ``per_class_iou.json`` (when ``metrics`` has per-class IoU) and every non-empty curve
    of ``pr_curves`` (``{file name: rows}``) into ``folder``; returns the paths written."""
    folder = Path(folder)
    written: list[Path] = []
    plots: dict[str, list[dict[str, Any]]] = {PER_CLASS_IOU_FILE: per_class_iou_rows(metrics),
                                              **pr_curves}
    for name, rows in plots.items():
        if rows:
            written.append(atomic_write_json(folder / name, rows, indent=None))
    return written
