"""``densepipe coco-eval``: the standalone COCO evaluator of the R-CNN tasks, added to the CLI
through the ``densepipe.commands`` entry point ``coco-eval = "plugins.rcnn.cli:coco_eval"``.

Imported by every ``densepipe`` call, so it stays light: pycocotools and the rest are imported
inside the command. Errors a user can fix are raised as ``DensepipeError`` (the CLI prints one
``error: ...`` line, exit code 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import ConfigError
from pipeline.io import atomic_write_json

# Imports inside functions: `densepipe` imports this command module on every call; torch and
# pycocotools load when the command runs.


def coco_eval(
    gt: Annotated[Path, typer.Option("--gt", help="COCO ground-truth JSON.")],
    pred: Annotated[Path, typer.Option("--pred", help="COCO results JSON (a list of detections).")],
    iou_type: Annotated[str, typer.Option("--type", help="bbox, segm or keypoints.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write {name: value} stats here.")] = None,
    sigmas: Annotated[str | None, typer.Option(help="Keypoint OKS sigmas, comma-separated.")] = None,
    keep_boxes: Annotated[bool, typer.Option(
        "--keep-boxes/--drop-boxes",
        help="segm/keypoints: keep each result's bbox, so a detection's area (APs/APm/APl) is its "
             "box's, as pycocotools does on the raw file; default drops it (detectron2: mask "
             "area or keypoint extent).")] = False,
) -> None:
    """COCO AP/AR of a results file against a ground truth (pycocotools)."""
    from plugins.rcnn.coco import evaluate_coco, format_coco_table

    kpt_sigmas = None
    if sigmas is not None:
        try:
            kpt_sigmas = [float(s) for s in sigmas.split(",")]
        except ValueError:
            raise ConfigError(f"--sigmas {sigmas!r}: expected comma-separated numbers, "
                              f"e.g. 0.026,0.025,0.025") from None
    result = evaluate_coco(gt, pred, iou_type, kpt_oks_sigmas=kpt_sigmas,  # type: ignore[arg-type]
                           keep_boxes=keep_boxes)
    sys.stdout.write(format_coco_table(result))
    if json_out is not None:
        atomic_write_json(json_out, result.named())
