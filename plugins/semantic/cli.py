"""``densepipe semseg-eval``: registered through the ``densepipe.commands`` entry points. Light:
the evaluation is imported when the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipeline.io import atomic_write_json

# Imports inside functions: `densepipe` imports this command module on every call; torch loads
# when the command runs.


def semseg_eval(
    gt_dir: Annotated[Path, typer.Option(help="Ground-truth label PNGs.")],
    pred_dir: Annotated[Path, typer.Option(help="Predicted label PNGs (same file names).")],
    num_classes: Annotated[int, typer.Option(help="Number of classes.")],
    ignore: Annotated[int, typer.Option(help="Ignore label in the ground truth.")] = 255,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics here.")] = None,
) -> None:
    """Semantic segmentation metrics over two folders of label PNGs."""
    from plugins.semantic.files import evaluate_label_folders, format_semseg_table

    metrics = evaluate_label_folders(gt_dir, pred_dir, num_classes=num_classes, ignore_index=ignore)
    # markup off, as the core's consoles: the text is printed literally
    Console(markup=False).print(format_semseg_table(metrics))
    if json_out is not None:
        atomic_write_json(json_out, metrics)
