"""``densepipe panoptic-eval``: registered through the ``densepipe.commands`` entry points. Light:
the evaluation is imported when the command runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.io import atomic_write_json
from plugins.panoptic.files import evaluate_panoptic_files


def panoptic_eval(
    gt_json: Annotated[Path, typer.Option("--gt-json", help="Ground-truth COCO panoptic JSON.")],
    gt_dir: Annotated[Path, typer.Option("--gt-dir", help="Folder of the ground-truth PNGs.")],
    pred_json: Annotated[Path, typer.Option("--pred-json", help="Predicted COCO panoptic JSON.")],
    pred_dir: Annotated[Path, typer.Option("--pred-dir", help="Folder of the predicted PNGs.")],
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write the groups, per-class scores and metric names (ratios) here.")] = None,
    workers: Annotated[int, typer.Option(help="Processes sharing the images.")] = 1,
) -> None:
    """PQ, SQ and RQ (percent) of COCO panoptic predictions, as panopticapi computes them."""
    result = evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir, workers=workers)
    sys.stdout.write(result.table())
    if json_out is not None:
        atomic_write_json(json_out, result.to_json())
