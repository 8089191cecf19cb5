"""Built-in task ``depth``: monocular metric depth with a decoder chosen by name.

Head: the decoder ``decoder`` of ``pipeline.nn.decoders`` (as for ``semantic``; default
``panoptic_fpn``) with one output channel: log-depth (``output: log``, depth = exp) or a softplus
pre-activation (``output: softplus``), so the prediction is positive by construction. The head adds
a constant ``log(init_depth)`` (or softplus^-1(init_depth)) to the decoder's output: every decoder's
last layer starts near zero, so the first prediction is ``init_depth`` metres everywhere. (Adding the
constant is the same as initialising the final bias to it, for any decoder, without reaching into
its layers; the decoder's own bias still learns.) ``decoder_options: {upsample: convex}`` ends the
``panoptic_fpn`` decoder with RAFT's learned convex upsampling instead of bilinear
(``pipeline.nn.convex_upsample``): bilinear upsampling of a stride-4 prediction mixes the depths
on both sides of every edge (a perfect stride-4 log-depth scores delta1 0.954 on the synthetic val
split, ``benchmarks/upsampling_ceiling.py``).

Loss (``pipeline.nn.regression_losses``), over pixels whose target is finite and > 0 in samples
that have depth: ``silog`` (default; Eigen et al. 2014 scale-invariant log error, ``lam`` 0.5: half
the log MSE plus half its scale-invariant part, so errors count relatively, as the metrics do, and
the absolute scale is still learnt), ``berhu`` (Laina et al. 2016, in metres) or ``l1`` (metres);
plus, with ``gradient_weight`` > 0, MegaDepth's multi-scale log-gradient matching term
(``log_gradient``), which penalises blurred or misplaced depth edges.

Metrics: Eigen et al.'s ``abs_rel``, ``sq_rel``, ``rmse`` (m), ``rmse_log``, ``delta1..3``
(``plugins.depth.metrics``), over samples with depth; with ``median_scaling`` every image is scaled
by median(target) / median(pred) first and the output says so with ``median_scale`` (the mean
factor); ``min_depth`` / ``max_depth`` cap the evaluated range (monodepth2's protocol).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError
from pipeline.hookspecs import hookimpl
from pipeline.io import atomic_write_png
from pipeline.metrics.merge import check_mergeable
from pipeline.nn.dense_head import DecoderOptions, DenseHead, build_task_decoder_from_options
from pipeline.nn.inference_size import paste_maps
from pipeline.nn.regression_losses import build_regression_loss, log_gradient_matching
from pipeline.task import Batch, DenseTask, ExportOutput, FeatureSpec, Task
from plugins.depth.draw import depth_with_colorbar
from plugins.depth.metrics import DepthMetricAccumulator

# Imports inside functions: the synthetic world's depth encoding, when a prediction is saved: the
# train and evaluate stages do not depend on the renderer (dvc.yaml).

LOG_DEPTH_MAX = math.log(1e4)
"""Log-depth outputs are clamped to this (10 km) before exp, so a diverging head stays finite."""
MIN_DEPTH = 1e-6
"""Softplus outputs are clamped to at least this many metres."""


class DepthOptions(DecoderOptions):
    """The decoder options (``DecoderOptions``) plus the loss, output and evaluation settings."""

    loss: Literal["silog", "berhu", "l1"] = "silog"
    """``silog`` (scale-invariant log, Eigen et al. 2014), ``berhu`` (reverse Huber, metres) or
    ``l1`` (metres)."""
    loss_options: dict[str, Any] = Field(default_factory=dict)
    """The loss's options: ``lam`` in [0, 1] for silog (default 0.5), ``threshold`` in (0, 1] for
    berhu (default 0.2: c = threshold * max |residual| of the batch)."""
    gradient_weight: float = Field(0.0, ge=0)
    """Weight of MegaDepth's multi-scale log-gradient matching term (``log_gradient``, 4 scales),
    added to the loss for sharper depth edges; 0 = off (Li and Snavely use 0.5)."""
    output: Literal["log", "softplus"] = "log"
    """What the head predicts: log-depth (depth = exp) or a softplus pre-activation."""
    init_depth: float = Field(3.0, gt=0)
    """Metres predicted everywhere at initialisation."""
    median_scaling: bool = False
    """Evaluation: scale each prediction by median(target) / median(pred) (scale-ambiguous models);
    the metrics then include ``median_scale``."""
    min_depth: float | None = None
    """Evaluation: count only targets above this (metres) and clip predictions to it."""
    max_depth: float | None = None
    """Evaluation: count only targets below this (metres) and clip predictions to it."""


def depth_offset(output: str, init_depth: float) -> float:
    """The constant the head adds so that ``to_depth`` of a zero output is ``init_depth``."""
    if output == "log":
        return math.log(init_depth)
    return init_depth + math.log(-math.expm1(-init_depth))  # softplus^-1, stable for any size


def to_depth(output: torch.Tensor, kind: str) -> torch.Tensor:
    """Head output (any shape, log-depth or softplus pre-activation) -> depth in metres (float32, > 0
    except where exp underflows)."""
    z = output.float()
    if kind == "log":
        return torch.exp(z.clamp(max=LOG_DEPTH_MAX))
    return F.softplus(z).clamp_min(MIN_DEPTH)


def depth_target(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(target Bx1xHxW metres, valid BxHxW)`` of the batch, or None when it has no depth map.
    Valid: finite, > 0, in a sample whose ``has["depth"]`` is true (when the batch says)."""
    target = batch.get("depth")
    if target is None:
        return None
    target = target.to(device).float()
    valid = torch.isfinite(target) & (target > 0)
    has = batch.get("has", {}).get("depth")
    if has is not None:
        valid &= has.to(device).bool()[:, None, None]
    return target[:, None], valid


class DepthHead(DenseHead):
    """``DenseHead`` (one output) whose output is shifted by the constant ``offset``."""

    def __init__(self, decoder: nn.Module, *, offset: float) -> None:
        super().__init__(decoder)
        self.offset = float(offset)

    def forward(self, features: dict[str, torch.Tensor], *, image_size: tuple[int, int],
                batch: Any = None) -> torch.Tensor:
        return super().forward(features, image_size=image_size, batch=batch) + self.offset

    def extra_repr(self) -> str:
        return f"offset={self.offset:.4f}"


class DepthEvaluator:
    """``DepthMetricAccumulator`` over the samples that have depth, one image at a time (so median
    scaling is per image). ``compute()``: the Eigen keys (+ ``median_scale`` with median scaling);
    ``{}`` when no sample had depth."""

    def __init__(self, options: DepthOptions) -> None:
        self.median_scaling = options.median_scaling
        self.accumulator = DepthMetricAccumulator(median_scaling=options.median_scaling,
                                                  min_depth=options.min_depth, max_depth=options.max_depth)

    def reset(self) -> None:
        self.accumulator.reset()

    def process(self, batch: Batch, predictions: list[torch.Tensor]) -> None:
        if "depth" not in batch:
            return
        has = batch.get("has", {}).get("depth")
        for i, pred in enumerate(predictions):
            if has is None or bool(has[i]):
                self.accumulator.update(pred.cpu(), batch["depth"][i].cpu())

    def merge(self, other: DepthEvaluator) -> None:
        """Add ``other``'s running sums (another shard, same options): the pixel count exact, the
        error sums and the per-image scale sum up to float summation order."""
        check_mergeable(self, other)
        self.accumulator.merge(other.accumulator)

    def compute(self) -> dict[str, float]:
        metrics = self.accumulator.compute()
        metrics.pop("num_pixels", None)
        if not self.median_scaling:
            metrics.pop("median_scale", None)
        return metrics


class DepthTask(DenseTask[DepthOptions]):
    name = "depth"
    requires = ("depth",)
    input_view = "rgb"
    Options = DepthOptions
    main_metric = "rmse"  # Vandenhende et al.'s Delta_m uses depth RMSE
    metrics = ("abs_rel", "sq_rel", "rmse", "rmse_log", "delta1", "delta2", "delta3",
               "median_scale")  # median_scale: with median scaling only
    lower_is_better = frozenset({"abs_rel", "sq_rel", "rmse", "rmse_log"})

    def resolve_options(self, options: DepthOptions, *,
                        card: DatasetCard) -> DepthOptions:
        try:
            build_regression_loss(options.loss, **options.loss_options)
        except ConfigError as e:
            raise ConfigError(f"model.heads.depth.loss_options: {e}") from None
        try:
            DepthMetricAccumulator(min_depth=options.min_depth, max_depth=options.max_depth)
        except ValueError as e:
            raise ConfigError(f"model.heads.depth.{e}") from None
        return options

    def build_head(self, *, feature_spec: FeatureSpec, card: DatasetCard,
                   options: DepthOptions) -> nn.Module:
        decoder = build_task_decoder_from_options("depth", options, feature_spec=feature_spec, num_outputs=1)
        return DepthHead(decoder, offset=depth_offset(options.output, options.init_depth))

    def losses(self, output: torch.Tensor, batch: Batch, *,
               options: DepthOptions) -> dict[str, torch.Tensor]:
        """``{<loss name>: scalar}`` over the valid pixels; exact zero (graph connected) without any."""
        found = depth_target(batch, output.device)
        if found is None:
            return {options.loss: output.sum() * 0.0}
        target, valid = found
        loss = build_regression_loss(options.loss, **options.loss_options)
        depth = to_depth(output, options.output)
        terms = {options.loss: loss(depth, target, valid)}
        if options.gradient_weight > 0:
            terms["log_gradient"] = options.gradient_weight * log_gradient_matching(depth, target, valid)
        return terms

    def aligned(self, output: torch.Tensor, *, batch: Batch, options: DepthOptions) -> torch.Tensor:
        """``N x 1 x H x W`` depth in metres (> 0) at the original image size (bilinear in
        metres); views average metres."""
        return paste_maps(to_depth(output.detach(), options.output), batch)

    def decide(self, aligned: torch.Tensor, *, batch: Batch, predictions: dict[str, list[Any]],
               options: DepthOptions) -> list[torch.Tensor]:
        """Per image: ``HxW`` float32 depth in metres (> 0) at the original image size, on the CPU."""
        return list(aligned[:, 0].cpu())

    export_outputs = (ExportOutput("depth", "metres", "N x 1 x H x W depth along the optical axis, > 0"),)

    def export_forward(self, head: nn.Module, features: dict[str, torch.Tensor], *,
                       image: torch.Tensor, options: DepthOptions) -> dict[str, torch.Tensor]:
        return {"depth": to_depth(head(features, image_size=image.shape[-2:]), options.output)}

    def evaluator(self, *, card: DatasetCard, options: DepthOptions) -> DepthEvaluator:
        return DepthEvaluator(options)

    def visualize(self, image: np.ndarray, prediction: torch.Tensor, *, card: DatasetCard,
                  options: DepthOptions) -> np.ndarray:
        """The predicted depth in viridis (near dark, far yellow) with a colour bar in metres to the
        right, over the prediction's own range: ``H x (W + bar) x 3 uint8``."""
        return depth_with_colorbar(prediction, cmap="viridis")

    def save_prediction(self, prediction: torch.Tensor, path_stem: str, *, card: DatasetCard,
                        options: DepthOptions) -> list[str]:
        """``<stem>_depth.png``: uint16 millimetres, the dataset's format (at least 1 mm, since 0
        means unknown; at most 65.535 m)."""
        from pipeline.data.synthetic.writer import encode_depth

        mm = np.maximum(encode_depth(np.asarray(prediction, dtype=np.float32)), 1)
        return [str(atomic_write_png(f"{path_stem}_depth.png", mm))]


@hookimpl
def densepipe_register_tasks() -> list[Task]:
    return [DepthTask()]
