"""Monocular depth metrics (Eigen et al., 2014 protocol) and a streaming accumulator.

Contract:

- ``pred`` and ``target`` are depth maps of the same shape (any shape: ``HxW``, ``1xHxW``, ``NxHxW``,
  ``Nx1xHxW``), numpy arrays or torch tensors, in the same unit (e.g. metres). Everything is computed
  in float64 and returned as python floats.
- Valid pixels: ``target`` finite and ``> 0``; with ``min_depth`` / ``max_depth`` also
  ``min_depth < target < max_depth`` (strict, as in the monodepth2 evaluation). Invalid pixels are
  ignored whatever ``pred`` holds there.
- Predictions ``<= 0`` at valid pixels are clamped to ``EPS`` (1e-6, in depth units) so that ratios and
  logs stay finite; a non-finite prediction at a valid pixel raises ``ValueError``.
- Median scaling (``median_scaling=True``): ``pred *= median(target) / median(pred)`` over the valid
  pixels (after the ``EPS`` clamp), for scale-ambiguous (e.g. self-supervised) models.
- With ``min_depth`` / ``max_depth``, predictions are then clipped to ``[min_depth, max_depth]``
  (monodepth2 does the same).
- Metrics (means over valid pixels, ``d`` = prediction, ``d*`` = target): ``abs_rel`` = mean
  ``|d - d*| / d*``; ``sq_rel`` = mean ``(d - d*)^2 / d*``; ``rmse`` = sqrt(mean ``(d - d*)^2``);
  ``rmse_log`` = sqrt(mean ``(ln d - ln d*)^2``); ``delta1..3`` = share of pixels with
  ``max(d / d*, d* / d) < 1.25 ** k`` (strict), in [0, 1]. Also ``median_scale`` (the factor applied,
  1.0 when off) and ``num_pixels`` (as a float).
- No valid pixel: ``depth_metrics`` returns ``{}`` (nothing to average; callers skip the sample).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.metrics.arrays import as_float64
from pipeline.metrics.merge import add_sums, check_mergeable, check_same_options

EPS = 1e-6
"""Predictions ``<= 0`` are clamped to this value (depth units) before ratios and logs."""

DELTA_BASE = 1.25

_SUM_KEYS = ("abs_rel", "sq_rel", "sq_err", "sq_log_err", "delta1", "delta2", "delta3")


def _check_range(min_depth: float | None, max_depth: float | None) -> None:
    if min_depth is not None and min_depth < 0:
        raise ValueError(f"min_depth: expected >= 0 or None, got {min_depth}")
    if max_depth is not None and max_depth <= 0:
        raise ValueError(f"max_depth: expected > 0 or None, got {max_depth}")
    if min_depth is not None and max_depth is not None and min_depth >= max_depth:
        raise ValueError(f"min_depth: expected less than max_depth {max_depth}, got {min_depth}")


def _valid_pairs(
    pred: np.ndarray,
    target: np.ndarray,
    *,
    median_scaling: bool,
    min_depth: float | None,
    max_depth: float | None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Flat ``(d, d*, scale)`` over the valid pixels after clamping, scaling and clipping."""
    if pred.shape != target.shape:
        raise ValueError(f"pred: expected the shape of target {tuple(target.shape)}, got {tuple(pred.shape)}")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(target) & (target > 0)
        if min_depth is not None:
            valid &= target > min_depth
        if max_depth is not None:
            valid &= target < max_depth
    gt = target[valid]
    d = pred[valid]
    if d.size and not np.isfinite(d).all():
        raise ValueError("pred: expected finite values at valid target pixels, got NaN or inf")
    d = np.maximum(d, EPS)
    scale = 1.0
    if median_scaling and d.size:
        scale = float(np.median(gt) / np.median(d))
        d = d * scale
    if min_depth is not None or max_depth is not None:
        d = np.clip(d, min_depth, max_depth)
    return d, gt, scale


def _sums(d: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Per-pixel sums whose ratios to the pixel count give the metrics."""
    diff = d - gt
    ratio = np.maximum(d / gt, gt / d)
    log_diff = np.log(d) - np.log(gt)
    return {
        "abs_rel": float(np.sum(np.abs(diff) / gt)),
        "sq_rel": float(np.sum(diff**2 / gt)),
        "sq_err": float(np.sum(diff**2)),
        "sq_log_err": float(np.sum(log_diff**2)),
        "delta1": float(np.count_nonzero(ratio < DELTA_BASE)),
        "delta2": float(np.count_nonzero(ratio < DELTA_BASE**2)),
        "delta3": float(np.count_nonzero(ratio < DELTA_BASE**3)),
    }


def _finalize(sums: dict[str, float], n: int, scale: float) -> dict[str, float]:
    if n == 0:
        return {}
    return {
        "abs_rel": sums["abs_rel"] / n,
        "sq_rel": sums["sq_rel"] / n,
        "rmse": float(np.sqrt(sums["sq_err"] / n)),
        "rmse_log": float(np.sqrt(sums["sq_log_err"] / n)),
        "delta1": sums["delta1"] / n,
        "delta2": sums["delta2"] / n,
        "delta3": sums["delta3"] / n,
        "median_scale": float(scale),
        "num_pixels": float(n),
    }


def depth_metrics(
    pred: Any,
    target: Any,
    *,
    median_scaling: bool = False,
    min_depth: float | None = None,
    max_depth: float | None = None,
) -> dict[str, float]:
    """Eigen et al. depth metrics of ``pred`` against ``target`` over all valid pixels (see module doc).

    Median scaling here uses one factor for the whole input, whatever its shape; use
    ``DepthMetricAccumulator`` for a per-image factor. Returns ``{}`` when no pixel is valid.
    """
    _check_range(min_depth, max_depth)
    p = as_float64(pred, "pred")
    t = as_float64(target, "target")
    d, gt, scale = _valid_pairs(p, t, median_scaling=median_scaling, min_depth=min_depth, max_depth=max_depth)
    return _finalize(_sums(d, gt), d.size, scale)


class DepthMetricAccumulator:
    """Streaming ``depth_metrics``: ``update`` per image or batch, ``compute`` at the end.

    Without median scaling, ``compute()`` equals one ``depth_metrics`` call over all valid pixels
    concatenated (pixel-weighted means; ``rmse`` is sqrt of the pooled mean squared error), up to float
    summation order (~1e-15 relative).

    With ``median_scaling=True`` the factor is computed per image, as in the monodepth evaluation:
    ``update`` takes one image (``HxW``) or a batch whose first axis indexes images (``NxHxW`` or
    ``Nx1xHxW``), and each image is scaled by its own ``median(target) / median(pred)``. The pooled
    metrics then differ from a single call with one global factor. ``median_scale`` in ``compute()`` is
    the mean of the per-image factors over images with at least one valid pixel (1.0 when off).

    ``compute()`` returns ``{}`` while no valid pixel has been seen.
    """

    def __init__(
        self,
        *,
        median_scaling: bool = False,
        min_depth: float | None = None,
        max_depth: float | None = None,
    ) -> None:
        _check_range(min_depth, max_depth)
        self.median_scaling = median_scaling
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._sums = dict.fromkeys(_SUM_KEYS, 0.0)
        self._num_pixels = 0
        self._scale_sum = 0.0
        self._num_scaled = 0

    def _add(self, p: np.ndarray, t: np.ndarray) -> None:
        d, gt, scale = _valid_pairs(
            p, t, median_scaling=self.median_scaling, min_depth=self.min_depth, max_depth=self.max_depth
        )
        if d.size == 0:
            return
        for key, value in _sums(d, gt).items():
            self._sums[key] += value
        self._num_pixels += d.size
        self._scale_sum += scale
        self._num_scaled += 1

    def update(self, pred: Any, target: Any) -> None:
        """Add one image (``HxW``) or a batch (``NxHxW`` / ``Nx1xHxW``) of predictions and targets."""
        p = as_float64(pred, "pred")
        t = as_float64(target, "target")
        if p.shape != t.shape:
            raise ValueError(f"pred: expected the shape of target {tuple(t.shape)}, got {tuple(p.shape)}")
        if t.ndim not in (2, 3, 4):
            raise ValueError(f"target: expected HxW, NxHxW or Nx1xHxW, got shape {tuple(t.shape)}")
        if not self.median_scaling or t.ndim == 2:
            self._add(p, t)
            return
        for p_img, t_img in zip(p, t, strict=True):
            self._add(p_img, t_img)

    def merge(self, other: DepthMetricAccumulator) -> None:
        """Add ``other``'s running sums (another shard, same options): the pixel count exact, the
        error sums and the per-image scale sum up to float summation order."""
        check_mergeable(self, other)
        check_same_options(self, other, ("median_scaling", "min_depth", "max_depth"))
        add_sums(self, other, ("_sums", "_num_pixels", "_scale_sum", "_num_scaled"))

    def compute(self) -> dict[str, float]:
        """The metrics over everything seen (see class doc); ``{}`` if no valid pixel."""
        scale = self._scale_sum / self._num_scaled if self._num_scaled else 1.0
        return _finalize(self._sums, self._num_pixels, scale)
