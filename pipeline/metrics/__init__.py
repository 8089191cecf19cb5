"""Evaluation metrics: confusion-matrix segmentation scores, label-folder evaluation, COCO AP.

The public names below are re-exported lazily, so ``import pipeline.metrics.coco`` stays light (no
torch import: ``densepipe coco-eval`` starts fast) while ``from pipeline.metrics import
ConfusionMatrix`` works.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.metrics.coco import CocoEvalResult, evaluate_coco, format_coco_table, load_coco_gt
    from pipeline.metrics.coco_results import detections_to_results, masks_to_rle, rle_to_masks
    from pipeline.metrics.confusion import ConfusionMatrix
    from pipeline.metrics.semseg_files import evaluate_label_folders, format_semseg_table

_EXPORTS = {
    "pipeline.metrics.coco": ("CocoEvalResult", "evaluate_coco", "format_coco_table", "load_coco_gt"),
    "pipeline.metrics.coco_results": ("detections_to_results", "masks_to_rle", "rle_to_masks"),
    "pipeline.metrics.confusion": ("ConfusionMatrix",),
    "pipeline.metrics.semseg_files": ("evaluate_label_folders", "format_semseg_table"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = [
    "CocoEvalResult", "ConfusionMatrix", "detections_to_results", "evaluate_coco", "evaluate_label_folders",
    "format_coco_table", "format_semseg_table", "load_coco_gt", "masks_to_rle", "rle_to_masks",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'pipeline.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The ``task/metric`` entries of a flat metrics dict: per-class and per-group values
    (``task/IoU/<class>``) left out; the tables the CLI, the registry and reports print."""
    return {k: v for k, v in metrics.items() if k.count("/") == 1}

