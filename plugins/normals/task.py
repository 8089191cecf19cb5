"""Built-in task ``normals``: camera-frame surface normals with a decoder chosen by name.

Head: the decoder ``decoder`` of ``pipeline.nn.decoders`` (as for ``semantic``; default
``panoptic_fpn``) with three outputs, normalised to unit length (``unit_channels``) in the loss and
in postprocessing, so only the direction is learnt.

Targets: pixels whose label is finite and non-zero, in samples that have normals. Labels should be
unit vectors; those whose length is off 1 by more than ``unit_tolerance`` (a dataset written with
another convention, or resampled labels) are renormalised (``bad_labels: renormalize``) or left out
of loss and metrics (``ignore``); the first batch with such labels raises one warning per task
object giving their share. Checking costs one device-to-host read per training step until then.

Loss (``pipeline.nn.regression_losses``): ``cosine`` (default: 1 - cos, smooth everywhere),
``angular`` (the angle in radians, the metric itself) or ``l2`` (squared distance of unit
vectors, 2 - 2 cos). Metrics (``plugins.normals.metrics``): ``mean_angle``, ``median_angle``,
``rmse_angle`` (degrees) and ``within_11.25``, ``within_22.5``, ``within_30``.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from pipeline.data.card import DatasetCard
from pipeline.hookspecs import hookimpl
from pipeline.io import atomic_write_png
from pipeline.metrics.merge import check_mergeable
from pipeline.nn.dense_head import DecoderOptions, build_dense_head
from pipeline.nn.inference_size import paste_maps
from pipeline.nn.regression_losses import build_regression_loss, channel_norm, unit_channels
from pipeline.task import Batch, DenseTask, ExportOutput, FeatureSpec, Task
from pipeline.viz import normals_to_rgb
from plugins.normals.metrics import NormalsMetricAccumulator

# Imports inside functions: the synthetic world's normals encoding, when a prediction is saved:
# the train and evaluate stages do not depend on the renderer (dvc.yaml).


class NormalsOptions(DecoderOptions):
    """The decoder options (``DecoderOptions``) plus the loss and the handling of non-unit labels."""

    loss: Literal["cosine", "angular", "l2"] = "cosine"
    """``cosine`` (1 - cos), ``angular`` (radians) or ``l2`` (squared distance of unit vectors)."""
    bad_labels: Literal["renormalize", "ignore"] = "renormalize"
    """What to do with labels whose length is off 1 by more than ``unit_tolerance``."""
    unit_tolerance: float = Field(0.01, gt=0)


def normals_target(batch: Batch, device: torch.device, *, bad_labels: str, unit_tolerance: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(unit Bx3xHxW, valid, labelled, off_unit)`` of the batch's normals (masks ``BxHxW`` bool),
    or None when it has none. ``labelled``: finite, non-zero, in a sample whose ``has["normals"]``
    is true (when the batch says); ``off_unit``: labelled with ``| |n| - 1 | > unit_tolerance``;
    ``valid``: labelled, minus ``off_unit`` when ``bad_labels`` is ``ignore``. ``unit`` is the
    label divided by its length at labelled pixels, 0 elsewhere."""
    target = batch.get("normals")
    if target is None:
        return None
    target = target.to(device).float()
    finite = torch.isfinite(target).all(1)
    t = torch.where(finite[:, None], target, torch.zeros((), device=device))
    norm = channel_norm(t)
    labelled = finite & (norm > 0)
    has = batch.get("has", {}).get("normals")
    if has is not None:
        labelled &= has.to(device).bool()[:, None, None]
    off_unit = labelled & ((norm - 1.0).abs() > unit_tolerance)
    valid = labelled & ~off_unit if bad_labels == "ignore" else labelled
    unit = torch.where(labelled[:, None], t / torch.where(labelled, norm, 1.0)[:, None],
                       torch.zeros((), device=device))
    return unit, valid, labelled, off_unit


class NormalsEvaluator:
    """``NormalsMetricAccumulator`` over the valid target pixels (as the loss sees them; the metrics
    normalise the labels themselves, in float64);
    ``compute()`` without ``num_pixels``; ``{}`` when no sample had normals."""

    def __init__(self, options: NormalsOptions) -> None:
        self.options = options
        self.accumulator = NormalsMetricAccumulator()

    def reset(self) -> None:
        self.accumulator.reset()

    def process(self, batch: Batch, predictions: list[torch.Tensor]) -> None:
        found = normals_target(batch, torch.device("cpu"), bad_labels=self.options.bad_labels,
                               unit_tolerance=self.options.unit_tolerance)
        if found is None:
            return
        valid = found[1]
        target = torch.where(valid[:, None], batch["normals"].float().cpu(), torch.zeros(()))
        for i, pred in enumerate(predictions):
            if bool(valid[i].any()):
                self.accumulator.update(pred.cpu(), target[i])

    def merge(self, other: NormalsEvaluator) -> None:
        """Add ``other``'s angle histogram, counts and sums (another shard, same thresholds): the
        median and the ``within_*`` shares exact, mean and RMSE up to float summation order."""
        check_mergeable(self, other)
        self.accumulator.merge(other.accumulator)

    def compute(self) -> dict[str, float]:
        metrics = self.accumulator.compute()
        metrics.pop("num_pixels", None)
        return metrics


class NormalsTask(DenseTask[NormalsOptions]):
    name = "normals"
    requires = ("normals",)
    input_view = "rgb"
    Options = NormalsOptions
    main_metric = "mean_angle"
    metrics = ("mean_angle", "median_angle", "rmse_angle", "within_*")  # within_<degrees>
    lower_is_better = frozenset({"mean_angle", "median_angle", "rmse_angle"})

    def __init__(self) -> None:
        self._warned_off_unit = False

    def build_head(self, *, feature_spec: FeatureSpec, card: DatasetCard,
                   options: NormalsOptions) -> nn.Module:
        return build_dense_head("normals", options, feature_spec=feature_spec, num_outputs=3)

    def _warn_off_unit(self, labelled: torch.Tensor, off_unit: torch.Tensor, options: NormalsOptions) -> None:
        """Once per task object: warn with the share of labelled pixels that are not unit length."""
        if self._warned_off_unit:
            return
        num_off, num_labelled = torch.stack([off_unit.sum(), labelled.sum()]).tolist()
        if num_off == 0:
            return
        self._warned_off_unit = True
        done = "renormalised" if options.bad_labels == "renormalize" else "ignored"
        warnings.warn(f"normals: {100.0 * num_off / num_labelled:.1f}% of labelled pixels in this batch are "
                      f"not unit length (|n| off by > {options.unit_tolerance:g}); {done} "
                      f"(model.heads.normals.bad_labels)", stacklevel=3)

    def losses(self, output: torch.Tensor, batch: Batch, *,
               options: NormalsOptions) -> dict[str, torch.Tensor]:
        """``{<loss name>: scalar}`` over the valid pixels; exact zero (graph connected) without any."""
        found = normals_target(batch, output.device, bad_labels=options.bad_labels,
                               unit_tolerance=options.unit_tolerance)
        if found is None:
            return {options.loss: output.sum() * 0.0}
        unit, valid, labelled, off_unit = found
        self._warn_off_unit(labelled, off_unit, options)
        pred = unit_channels(output.float())
        return {options.loss: build_regression_loss(options.loss)(pred, unit, valid)}

    def aligned(self, output: torch.Tensor, *, batch: Batch, options: NormalsOptions) -> torch.Tensor:
        """``N x 3 x H x W`` float32 vectors (camera frame, not yet unit length: views average
        them, each weighted by its length) at the original image size (interpolated)."""
        return paste_maps(output.detach().float(), batch)

    def unflip(self, aligned: torch.Tensor, *, options: NormalsOptions) -> torch.Tensor:
        """Mirrored back, the x component negated (x points right: a flip reverses it)."""
        out = aligned.flip(-1)
        out[:, 0] = -out[:, 0]
        return out

    def decide(self, aligned: torch.Tensor, *, batch: Batch, predictions: dict[str, list[Any]],
               options: NormalsOptions) -> list[torch.Tensor]:
        """Per image: ``3xHxW`` float32 unit vectors (``aligned`` renormalised), on the CPU."""
        return list(unit_channels(aligned).cpu())

    export_outputs = (ExportOutput("normals", "unit vectors", "N x 3 x H x W surface normals in the "
                                   "camera frame (OpenCV: x right, y down, z forward)"),)

    def export_forward(self, head: nn.Module, features: dict[str, torch.Tensor], *,
                       image: torch.Tensor, options: NormalsOptions) -> dict[str, torch.Tensor]:
        return {"normals": unit_channels(head(features, image_size=image.shape[-2:]).float())}

    def evaluator(self, *, card: DatasetCard,
                  options: NormalsOptions) -> NormalsEvaluator:
        return NormalsEvaluator(options)

    def visualize(self, image: np.ndarray, prediction: torch.Tensor, *, card: DatasetCard,
                  options: NormalsOptions) -> np.ndarray:
        """The predicted normals as RGB = (n + 1) / 2: ``HxWx3 uint8``."""
        return normals_to_rgb(prediction)

    def save_prediction(self, prediction: torch.Tensor, path_stem: str, *, card: DatasetCard,
                        options: NormalsOptions) -> list[str]:
        """``<stem>_normals.png``: uint8 RGB encoding (n + 1) / 2, the dataset's format."""
        from pipeline.data.synthetic.writer import encode_normals

        enc = encode_normals(np.asarray(prediction, dtype=np.float32).transpose(1, 2, 0))
        return [str(atomic_write_png(f"{path_stem}_normals.png", enc))]


@hookimpl
def densepipe_register_tasks() -> list[Task]:
    return [NormalsTask()]
