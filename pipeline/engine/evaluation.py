"""Evaluation loop: every task's evaluator over one pass of a loader, plus sample drawings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.engine import distributed as dist
from pipeline.io import atomic_dir
from pipeline.model import MultiTaskModel
from pipeline.nn.tta import TestViews

# Imports inside functions: the plot files' writer, when evaluate writes them: the train stage
# does not list it as a dep (dvc.yaml).


@torch.no_grad()
def evaluate_model(
    model: MultiTaskModel, loader: Any, *, device: torch.device, num_visualizations: int = 0,
    artifacts_dir: str | Path | None = None, saved: list[Path] | None = None,
    distributed: bool = False, test_views: TestViews | None = None,
) -> tuple[dict[str, float], list[tuple[str, np.ndarray]]]:
    """Run all evaluators; returns ``({"<task>/<metric>": float}, drawings)``.

    ``drawings`` holds up to ``num_visualizations`` (title, HxWx3 uint8) panels: each image and
    every task's visualisation of its prediction. With ``artifacts_dir``, evaluators that have an
    ``export_to(out_dir, name)`` method are told before the first batch (the panoptic one writes
    its PNGs as it goes), and those with a ``save(out_dir, name)`` method (COCO ground truth and
    results JSON, COCO panoptic JSON + PNG folder) write their files there after the pass; the
    paths (files or folders) are appended to ``saved``. Also with ``artifacts_dir``, the plot data
    of ``pipeline.metrics.plot_data`` is written to ``<artifacts_dir>/plots/`` (replaced as a whole;
    DVC's ``plots`` read it): per-class IoU from the metrics, and a precision-recall curve per type
    of every evaluator with a ``precision_recall()`` method (the COCO ones); the folder is appended
    to ``saved``.

    ``distributed``: each rank ran its shard of the data; the evaluators are merged on rank 0
    (``Evaluator.merge``), which computes the metrics and sends them to every rank.

    Predictions come from ``model.predict``, so the model's test-size rule and its test views
    (``evaluate.scales`` x ``evaluate.flip``, set by ``build_model``; ``pipeline.nn.tta``) apply;
    ``test_views`` replaces the latter for this pass (None: the model's)."""
    saved_views = model.test_views
    if test_views is not None:
        model.test_views = test_views
    try:
        metrics, drawings = _evaluate(model, loader, num_visualizations=num_visualizations,
                                      artifacts_dir=artifacts_dir, saved=saved, distributed=distributed)
    finally:
        model.test_views = saved_views
    return (dist.broadcast_object(metrics) if distributed else metrics), drawings


def _evaluate(model: MultiTaskModel, loader: Any, *, num_visualizations: int,
              artifacts_dir: str | Path | None, saved: list[Path] | None, distributed: bool
              ) -> tuple[dict[str, float], list[tuple[str, np.ndarray]]]:
    """``evaluate_model``'s pass (same arguments), without the final broadcast."""
    was_training = model.training
    model.eval()
    evaluators = {name: task.evaluator(card=model.card, options=model.options[name])
                  for name, task in model.tasks.items()}
    for name, ev in evaluators.items():
        ev.reset()
        if artifacts_dir is not None and hasattr(ev, "export_to"):
            ev.export_to(artifacts_dir, name)
    drawings: list[tuple[str, np.ndarray]] = []
    for batch in loader:
        predictions = model.predict(batch)
        for name, ev in evaluators.items():
            ev.process(batch, predictions[name])
        for i in range(batch["image"].shape[0]):
            if len(drawings) >= num_visualizations * (1 + len(model.tasks)):
                break
            image = batch["image"][i].permute(1, 2, 0).cpu().numpy()
            drawings.append((f"image {batch['image_ids'][i]}", image))
            for name, task in model.tasks.items():
                drawings.append((name, task.visualize(image, predictions[name][i], card=model.card,
                                                      options=model.options[name])))
    if distributed:
        evaluators = dist.merge_evaluators(evaluators)
    metrics: dict[str, float] = {}
    if not distributed or dist.current().is_main:  # merged evaluators live on rank 0
        for name, ev in evaluators.items():
            for key, value in ev.compute().items():
                metrics[f"{name}/{key}"] = float(value)
            if artifacts_dir is not None and hasattr(ev, "save"):
                paths = ev.save(artifacts_dir, name)
                if saved is not None:
                    saved.extend(paths)
        if artifacts_dir is not None:
            folder = write_plots(Path(artifacts_dir) / "plots", metrics=metrics, evaluators=evaluators)
            if saved is not None:
                saved.append(folder)
    model.train(was_training)
    return metrics, drawings


def write_plots(folder: Path, *, metrics: dict[str, float], evaluators: dict[str, Any]) -> Path:
    """Replace ``folder`` with the plot files of ``pipeline.metrics.plot_data`` (see its formats):
    ``per_class_iou.json`` and ``pr_<task>[_<type>].json``; returns ``folder``."""
    from pipeline.metrics.plot_data import pr_curve_rows, pr_file_name, write_plot_files

    curves: dict[str, list[dict[str, float]]] = {}
    for name, ev in evaluators.items():
        if hasattr(ev, "precision_recall"):
            for iou_type, table in ev.precision_recall().items():
                curves[pr_file_name(name, iou_type)] = pr_curve_rows(**table)
    with atomic_dir(folder) as tmp:
        write_plot_files(tmp, metrics=metrics, pr_curves=curves)
    return folder
