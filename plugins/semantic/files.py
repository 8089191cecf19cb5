"""Score a folder of predicted label PNGs against a folder of ground-truth label PNGs.

Backs ``densepipe semseg-eval``. Files are paired by stem (``a.png`` with ``a.png``); both must be
single-channel PNGs (8-bit grey or palette, or 16-bit) holding class indices, with
``ignore_index`` meaning "not labelled". Pairs are read one at a time, so folders of any size fit
in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from rich.table import Table

from pipeline.errors import DataError
from plugins.semantic.confusion import ConfusionMatrix

PREFIX = "semantic/"
OVERALL_KEYS = ("mIoU", "pixel_acc", "mean_acc", "fwIoU")
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def evaluate_label_folders(
    gt_dir: str | Path,
    pred_dir: str | Path,
    *,
    num_classes: int,
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Confusion-matrix scores of ``pred_dir``'s PNGs against ``gt_dir``'s, paired by stem.

    Returns :meth:`ConfusionMatrix.compute`'s dict with keys prefixed ``semantic/``
    (``semantic/mIoU``, ``semantic/pixel_acc``, ``semantic/mean_acc``, ``semantic/fwIoU``,
    ``semantic/IoU/<name>``). A predicted ``ignore_index`` on a labelled pixel counts as a miss.

    Raises:
        DataError: a folder is missing or has no PNG; a file has no partner (names the first and
            how many); a file is unreadable or not single-channel; a pair differs in size; a
            label is neither in ``[0, num_classes)`` nor ``ignore_index`` (names file and value).
    """
    gt_files = _png_files(gt_dir)
    pred_files = _png_files(pred_dir)
    if not gt_files:
        raise DataError(gt_dir, "no ground-truth PNG files (*.png) in this folder")
    for files, others, other_dir, role in (
        (gt_files, pred_files, pred_dir, "ground-truth"),
        (pred_files, gt_files, gt_dir, "prediction"),
    ):
        unpaired = [stem for stem in files if stem not in others]
        if unpaired:
            raise DataError(
                files[unpaired[0]],
                f"no file of the same name in {other_dir} "
                f"({len(unpaired)} {role} file(s) unpaired)",
            )

    matrix = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    for stem in sorted(gt_files):
        gt = _read_labels(gt_files[stem], num_classes=num_classes, ignore_index=ignore_index)
        pred = _read_labels(pred_files[stem], num_classes=num_classes, ignore_index=ignore_index)
        if gt.shape != pred.shape:
            raise DataError(
                pred_files[stem],
                f"prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but its ground truth "
                f"{gt_files[stem]} is {gt.shape[1]}x{gt.shape[0]}",
            )
        matrix.update(pred, gt)
    scores = matrix.compute(class_names=class_names)
    return {f"{PREFIX}{key}": value for key, value in scores.items()}


def _png_files(folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".png"}


def _read_labels(path: Path, *, num_classes: int, ignore_index: int) -> np.ndarray:
    """HxW integer labels of a single-channel PNG, checked against the allowed range."""
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise DataError(path, f"not a PNG file (found {img.format})")
            if img.mode not in _LABEL_MODES:
                raise DataError(path, f"expected a single-channel label PNG, got mode {img.mode!r}")
            labels = np.asarray(img)
    except DataError:
        raise
    except Exception as exc:  # any decoding failure is a data problem
        raise DataError(path, f"cannot read PNG: {exc}".splitlines()[0]) from exc
    bad = (labels >= num_classes) & (labels != ignore_index)
    if labels.dtype.kind == "i":
        bad |= (labels < 0) & (labels != ignore_index)
    if bad.any():
        value = int(labels[bad][0])
        raise DataError(
            path,
            f"label {value} outside the allowed range [0, {num_classes - 1}] "
            f"(ignore value {ignore_index})",
        )
    return labels


def format_semseg_table(metrics: Mapping[str, float], *, title: str | None = None) -> Table:
    """A rich table of semantic scores: the four overall scores, then per-class IoU.

    Accepts :func:`evaluate_label_folders`' dict (``semantic/`` keys) or a bare
    :meth:`ConfusionMatrix.compute` dict. Values are shown as percentages.
    """
    bare = {key.removeprefix(PREFIX): value for key, value in metrics.items()}
    table = Table(title=title or "semantic segmentation")
    table.add_column("metric")
    table.add_column("%", justify="right")
    for key in OVERALL_KEYS:
        if key in bare:
            table.add_row(key, _percent(bare[key]))
    per_class = [(k, v) for k, v in bare.items() if k.startswith("IoU/")]
    if per_class:
        table.add_section()
        for key, value in per_class:
            table.add_row(key, _percent(value))
    return table


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.2f}"


__all__ = ["evaluate_label_folders", "format_semseg_table"]
