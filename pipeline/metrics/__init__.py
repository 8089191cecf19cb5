"""Evaluation metrics: confusion-matrix segmentation scores, label-folder evaluation."""

from __future__ import annotations

from pipeline.metrics.confusion import ConfusionMatrix
from pipeline.metrics.semseg_files import evaluate_label_folders, format_semseg_table

__all__ = ["ConfusionMatrix", "evaluate_label_folders", "format_semseg_table"]
