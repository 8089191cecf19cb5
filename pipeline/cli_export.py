"""``densepipe export``: what the command does, apart from printing (``pipeline/cli.py`` wires it).

The model comes from a checkpoint (its own stored config and dataset card; default ``best.pt`` or
``last.pt`` of ``train.out_dir``) or an MLflow ``models:/`` URI, as for ``densepipe evaluate``.
The exported graph's contract is ``pipeline.export``'s module doc.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.errors import ExportError
from pipeline.export import DEFAULT_OPSET, ExportReport, check_dependencies, export_onnx
from pipeline.trained_model import load_model_to_evaluate

FORMATS = ("onnx",)


def parse_tasks(text: str | None) -> list[str] | None:
    """``"semantic, depth"`` -> ``["semantic", "depth"]``; ``None`` or blank: every task."""
    if text is None or not text.strip():
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_image_size(text: str | int | None, *, default: int) -> tuple[int, int]:
    """``"512"`` -> (512, 512), ``"384x640"`` (H x W) -> (384, 640); ``None`` -> ``default``."""
    if text is None:
        return (default, default)
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise ExportError(f"--image-size {text}: expected H or HxW in pixels, e.g. 512 or 384x640")
    return (values[0], values[-1])


def export_command(*, params: Path | None, set_: list[str] | None, checkpoint: Path | None,
                   model_uri: str | None, out: Path, format: str = "onnx", tasks: str | None = None,
                   opset: int = DEFAULT_OPSET, image_size: str | None = None) -> ExportReport:
    """Load the model (``pipeline.trained_model.load_model_to_evaluate``) and export it to ``out``
    (``.onnx``) plus the sidecar ``<name>.json``. ``tasks``: comma-separated (default: all of the
    model's; R-CNN tasks are refused with the ``--tasks`` that work); ``image_size``: H or HxW of
    the traced example (default ``data.image_size``). Every refusal is a one-line
    ``DensepipeError``; checked before the model is loaded where it can be."""
    if format not in FORMATS:
        raise ExportError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    check_dependencies()
    if Path(out).suffix != ".onnx":
        raise ExportError(f"--out {out}: expected a file name ending in .onnx")
    cfg = load_config(params, set_ or [])
    size = parse_image_size(image_size, default=cfg.data.image_size)
    model, _step, _run, source = load_model_to_evaluate(cfg, checkpoint=checkpoint, model_uri=model_uri,
                                                        device=torch.device("cpu"))
    with warnings.catch_warnings():  # the report's summary ends with the same note
        warnings.filterwarnings("ignore", message="H and W are fixed at", category=UserWarning)
        return export_onnx(model, out, tasks=parse_tasks(tasks), opset=opset, image_size=size, source=source)
