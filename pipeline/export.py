"""ONNX export of a trained model's dense tasks: one graph, an image batch in, named tensors out.

The exported graph (``export_onnx``):

- input ``image``: float32 ``N x 3 x H x W``, RGB, sRGB levels in 0..255 (a uint8 image cast to
  float), **not normalised**: like ``MultiTaskModel.forward`` the graph subtracts the ImageNet mean
  and divides by the std on the 0..255 scale (``pipeline.model.PIXEL_MEAN`` / ``PIXEL_STD``) and
  builds the gray view (BT.601 luma) that colorization sees. H and W must be multiples of the
  backbone stride (``stride_of``: 32 for an undilated backbone); ``export_onnx`` refuses others.
- outputs, in the model's task order, as each task declares them (``Task.export_outputs``, computed
  by ``Task.export_forward``; the built-ins: ``semantic_logits`` N x C x H x W (argmax over
  axis 1 = index into the card's classes), ``depth`` N x 1 x H x W metres (> 0), ``normals``
  N x 3 x H x W unit vectors (camera frame, OpenCV axes), ``colorization_lab`` N x 3 x H x W CIE
  L*a*b* (L from the input, a*b* predicted); with ``features``, backbone levels
  ``feature_<level>`` N x C x H/s x W/s. The values are those of ``densepipe predict`` (before its
  argmax for semantic).
- dynamic axes: ``N`` always; H and W as ``<stride>*h`` / ``<stride>*w`` unless the model's code
  turns the image size into constants while tracing (``torch.export`` reports it): then they are
  fixed at ``image_size`` and ``ExportReport.fixed_size_reason`` says so.

Exporter: ``torch.export`` (non-strict) checked for specialised sizes, then ``torch.onnx.export``
of the ``ExportedProgram`` (the onnxscript-based translator). The legacy TorchScript exporter
(``dynamo=False``) turns every ``int(size)`` of the heads into a constant with only a
``TracerWarning``, so a graph it writes can fail at any other size; ``torch.onnx.export(...,
dynamo=True)`` on the module relaxes the same specialisation silently. Calling ``torch.export``
first makes a fixed size an explicit, reported outcome.

Next to ``<name>.onnx`` a sidecar ``<name>.json`` (``SIDECAR_SCHEMA``) holds what a deployer needs:
input and output names, shapes (dynamic axes by name), dtypes, units, class names, mean/std, stride,
opset, densepipe and torch versions, the source model and its SHA-256.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from pipeline.engine.checkpoint import sha256_file
from pipeline.errors import ExportError
from pipeline.io import atomic_path, atomic_write_json
from pipeline.model import GRAY_WEIGHTS, PIXEL_MEAN, PIXEL_STD, MultiTaskModel, image_views

# Imports inside functions: onnx is the `onnx` extra's; torch._dynamo costs seconds to import and
# only an export needs it.

DEFAULT_OPSET = 18
MIN_OPSET = 18
"""The torch.export-based translator writes opset 18 or later (lower needs a version conversion)."""
SIDECAR_SCHEMA = 1
REQUIRED_MODULES = ("onnx", "onnxscript")
INSTALL_HINT = "pip install 'densepipe[export]'"
@dataclass
class ExportReport:
    """What ``export_onnx`` wrote: the files, the tasks, the graph's inputs and outputs (as in the
    sidecar) and, when H and W could not stay dynamic, why (``fixed_size_reason``)."""

    path: Path
    sidecar: Path
    tasks: tuple[str, ...]
    opset: int
    stride: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    fixed_size_reason: str | None = None
    exporter: str = "torch.export + torch.onnx (onnxscript)"

    def summary(self) -> list[str]:
        """Lines for the command line: the files and each input/output with its shape."""
        lines = [f"wrote {self.path} and {self.sidecar.name} "
                 f"(opset {self.opset}, tasks {', '.join(self.tasks)})"]
        for kind, items in (("input", self.inputs), ("output", self.outputs)):
            lines += [f"  {kind} {i['name']}: {i['dtype']} [{', '.join(map(str, i['shape']))}] "
                      f"{i['units']}" for i in items]
        if self.fixed_size_reason:
            lines.append(f"note: {self.fixed_size_reason}")
        return lines


def stride_of(model: MultiTaskModel) -> int:
    """Input sizes must be multiples of this: the stride of the backbone's deepest level (32, or
    16 / 8 for a dilated backbone), so that every FPN level is exactly H/s x W/s."""
    return int(model.backbone.output_stride)


def check_image_size(size: tuple[int, int], stride: int) -> None:
    """Refuse an ``(H, W)`` that is not a positive multiple of ``stride`` (one-line ``ExportError``)."""
    h, w = size
    if h < stride or w < stride or h % stride or w % stride:
        up = (-(-max(h, 1) // stride) * stride, -(-max(w, 1) // stride) * stride)
        raise ExportError(f"image size {h}x{w}: height and width must be multiples of the backbone "
                          f"stride {stride} (e.g. {up[0]}x{up[1]}); pad or resize the images")


def check_dependencies() -> None:
    """One-line ``ExportError`` naming the missing modules and the install command."""
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")


def _exportable(model: MultiTaskModel, name: str) -> bool:
    return bool(model.tasks[name].export_outputs) and name in model.heads


def check_tasks(model: MultiTaskModel, tasks: Sequence[str] | None) -> tuple[str, ...]:
    """The tasks to export (default: all of the model's), in the model's order; one-line
    ``ExportError`` naming unknown tasks, or the ones that cannot be exported, why, and the
    ``--tasks`` that would work."""
    wanted = list(model.tasks) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [t for t in wanted if t not in model.tasks]
    if unknown:
        raise ExportError(f"tasks: {', '.join(unknown)} not in this model (it has {', '.join(model.tasks)})")
    if not wanted:
        raise ExportError(f"tasks: none given (this model has {', '.join(model.tasks)})")
    bad = [t for t in wanted if not _exportable(model, t)]
    if bad:
        ok = [t for t in model.tasks if _exportable(model, t)]
        hint = (f"export the others with --tasks {','.join(ok)}" if ok
                else "no task of this model can be exported")
        by_reason: dict[str, list[str]] = {}
        for t in bad:
            by_reason.setdefault(model.tasks[t].export_refusal, []).append(t)
        reasons = "; ".join(f"{', '.join(ts)}: {r}" for r, ts in by_reason.items())
        raise ExportError(f"cannot export {', '.join(bad)} to ONNX ({reasons}); {hint}")
    return tuple(t for t in model.tasks if t in wanted)


class DenseExportModule(nn.Module):
    """``forward(image)``: float32 ``N x 3 x H x W`` RGB in 0..255 (not normalised) -> the tuple of
    ``output_names`` tensors (see the module doc), one backbone pass per view."""

    def __init__(self, model: MultiTaskModel, *, tasks: Sequence[str], features: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.tasks = tuple(tasks)
        self.features = tuple(features)
        views = {model.tasks[t].input_view for t in self.tasks}
        self.views = sorted(views | {"rgb"} if features else views)
        self.output_names = [o.name for t in self.tasks for o in model.tasks[t].export_outputs]
        self.output_names += [f"feature_{k}" for k in features]

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        views = image_views(image, set(self.views), m.pixel_mean, m.pixel_std)
        per_view = m._backbone_per_view(views)
        outputs: dict[str, Tensor] = {}
        for name in self.tasks:
            view = m.tasks[name].input_view
            outputs.update(m.tasks[name].export_forward(m.heads[name], per_view[view], image=image,
                                                        options=m.options[name]))
        outputs.update({f"feature_{k}": per_view["rgb"][k] for k in self.features})
        return tuple(outputs[n] for n in self.output_names)


def _trace(module: DenseExportModule, example: Tensor, *, stride: int, dynamic: bool
           ) -> tuple[torch.export.ExportedProgram, str | None]:
    """``torch.export`` with a dynamic batch and, if ``dynamic``, H/W as multiples of ``stride``;
    when the model's code fixes H/W, again with them fixed, and the reason."""
    from torch._dynamo.exc import UserError

    batch = {0: Dim("N", min=1)}
    if not dynamic:
        return torch.export.export(module, (example,), dynamic_shapes={"image": batch}, strict=False), None
    size = {2: stride * Dim("h", min=1), 3: stride * Dim("w", min=1)}
    try:
        return torch.export.export(module, (example,), dynamic_shapes={"image": {**batch, **size}},
                                   strict=False), None
    except UserError as e:
        fixed = re.findall(r"You marked (\S+) as dynamic but your code specialized it", str(e))
        if not fixed or "N" in fixed:
            raise
    h, w = example.shape[-2:]
    reason = (f"H and W are fixed at {h}x{w}: the model's code turns the image size into constants "
              "while tracing (torch.export: 'specialized it to be a constant'); the batch stays "
              "dynamic; export another size with --image-size")
    ep = torch.export.export(module, (example,), dynamic_shapes={"image": batch}, strict=False)
    return ep, reason


def _name_dims(proto: Any) -> Any:
    """Rename the exporter's shape symbols (``s40``, ``32*s39``) after the input's axes: ``N``
    (batch), ``h`` and ``w`` (so H is ``32*h``), in every shape the graph declares."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names: dict[str, str] = {}
    for axis, name in ((0, "N"), (2, "h"), (3, "w")):
        symbols = re.findall(r"[A-Za-z_]\w*", dims[axis].dim_param)
        if len(symbols) == 1:
            names[symbols[0]] = name
    if not names:
        return proto
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for info in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in info.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: names[m.group(1)], d.dim_param)
    return proto


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _version() -> str:
    try:
        return version("densepipe")
    except PackageNotFoundError:
        return "unknown"


def export_onnx(
    model: MultiTaskModel,
    out_path: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    image_size: int | tuple[int, int] = 256,
    batch_size: int = 2,
    dynamic: bool = True,
    features: Sequence[str] = (),
    source: str | None = None,
) -> ExportReport:
    """Write ``model``'s dense ``tasks`` (default: all; any other task is a one-line
    ``ExportError`` naming it and the ``--tasks`` that work) as an ONNX graph to ``out_path``
    (``.onnx``) and its sidecar ``<name>.json``; see the module doc for the graph's contract.

    ``image_size``: ``(H, W)`` (or one int for both) of the example the graph is traced with, a
    multiple of ``stride_of(model)``; it is the graph's fixed size only when H and W cannot stay
    dynamic (or ``dynamic=False``). ``batch_size``: the example's batch (2: a batch of 1 would let
    torch.export fix N). ``features``: backbone levels (``p2``..``p6``, ``c1``..``c5``) to output
    too, as ``feature_<name>``. ``source``: the model's checkpoint path or MLflow URI, recorded
    with the file's SHA-256 when it is a file. Puts ``model`` in eval mode."""
    check_dependencies()
    out = Path(out_path)
    if out.suffix != ".onnx":
        raise ExportError(f"{out}: expected an output file name ending in .onnx")
    if batch_size < 2:
        raise ExportError(f"batch_size {batch_size}: expected >= 2 (an example batch of 1 fixes N at 1)")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset}: the torch.export-based exporter writes opset {MIN_OPSET} or later")
    chosen = check_tasks(model, tasks)
    unknown_levels = [k for k in features if k not in model.backbone.feature_spec]
    if unknown_levels:
        raise ExportError(f"features: {', '.join(unknown_levels)} not among the backbone's levels "
                          f"({', '.join(model.backbone.feature_spec)})")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    stride = stride_of(model)
    check_image_size(size, stride)  # type: ignore[arg-type]

    model.eval()
    module = DenseExportModule(model, tasks=chosen, features=features).eval()
    example = torch.rand(batch_size, 3, *size, generator=torch.Generator().manual_seed(0)) * 255.0
    with torch.no_grad():
        ep, fixed_reason = _trace(module, example, stride=stride, dynamic=dynamic)
        program = torch.onnx.export(ep, dynamo=True, opset_version=opset, input_names=["image"],
                                    output_names=module.output_names, verbose=False)
    if fixed_reason:
        warnings.warn(fixed_reason, stacklevel=2)

    import onnx

    proto = _name_dims(program.model_proto)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    report = _describe(model, proto, out=out, tasks=chosen, opset=opset, stride=stride)
    report.fixed_size_reason = fixed_reason
    atomic_write_json(report.sidecar, sidecar(model, report, example_size=size, source=source))
    return report


def _describe(model: MultiTaskModel, proto: Any, *, out: Path, tasks: tuple[str, ...], opset: int,
              stride: int) -> ExportReport:
    """The report of the written graph: shapes and dtypes read from the ONNX file itself."""
    import onnx

    specs = {o.name: o for t in tasks for o in model.tasks[t].export_outputs}
    owner = {o.name: t for t in tasks for o in model.tasks[t].export_outputs}
    image = proto.graph.input[0]
    inputs = [{"name": image.name, "shape": _dims(image), "dtype": "float32",
               "units": "sRGB levels 0..255, RGB, not normalised (the graph normalises)",
               "layout": "NCHW"}]
    outputs = []
    for o in proto.graph.output:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).name
        spec = specs.get(o.name)
        entry = {"name": o.name, "shape": _dims(o), "dtype": dtype,
                 "task": owner.get(o.name), "units": spec.units if spec else "backbone features",
                 "meaning": spec.meaning if spec else "backbone feature map (before any head)"}
        if spec is not None and spec.per_class:
            entry["classes"] = model.card.class_names
        outputs.append(entry)
    return ExportReport(path=out, sidecar=out.with_suffix(".json"), tasks=tasks, opset=opset,
                        stride=stride, inputs=inputs, outputs=outputs)


def sidecar(model: MultiTaskModel, report: ExportReport, *, example_size: tuple[int, int],
            source: str | None) -> dict[str, Any]:
    """The sidecar's content (``SIDECAR_SCHEMA``): everything a deployer needs beside the graph."""
    dims = {"N": "batch size, >= 1"}
    shape = report.inputs[0]["shape"]
    for axis, what, symbol in ((2, "height", "h"), (3, "width", "w")):
        if isinstance(shape[axis], str):
            dims[shape[axis]] = f"image {what}: {report.stride} x {symbol}, {symbol} >= 1"
    src_path = Path(source) if source else None
    return {
        "schema": SIDECAR_SCHEMA,
        "format": "onnx",
        "file": report.path.name,
        "opset": report.opset,
        "exporter": report.exporter,
        "densepipe_version": _version(),
        "torch_version": torch.__version__,
        "source": {"model": source,
                   "sha256": sha256_file(src_path) if src_path is not None and src_path.is_file() else None},
        "tasks": list(report.tasks),
        "inputs": report.inputs,
        "outputs": report.outputs,
        "dynamic_axes": dims,
        "fixed_size_reason": report.fixed_size_reason,
        "traced_image_size": list(example_size),
        "stride": report.stride,
        "normalisation": {"inside_graph": True, "mean": list(PIXEL_MEAN), "std": list(PIXEL_STD),
                          "scale": "0..255", "gray_view_weights": list(GRAY_WEIGHTS)},
        "dataset": {"name": model.card.name, "classes": model.card.class_names,
                    "ignore_index": model.card.ignore_index},
    }


__all__ = ["DEFAULT_OPSET", "DenseExportModule", "ExportReport", "check_dependencies",
           "check_image_size", "check_tasks", "export_onnx", "stride_of"]
