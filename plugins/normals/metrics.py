"""Surface-normal metrics (angular error in degrees) and a streaming accumulator.

Contract:

- ``pred`` and ``target`` have the same shape ``3xHxW`` or ``Nx3xHxW`` (xyz on axis -3), numpy arrays
  or torch tensors; computed in float64, returned as python floats.
- Valid pixels: every ``target`` component finite and ``||target|| > 0`` (the zero vector means
  "unknown", the padding value of the data transforms). Both vectors are normalised to unit length,
  so neither needs to be unit length on input.
- A zero ``pred`` vector at a valid pixel has no direction: it counts as 90 degrees (orthogonal to
  everything, i.e. no better than chance, never a hit). A non-finite ``pred`` at a valid pixel raises
  ``ValueError``.
- Angle: ``degrees(arccos(clip(dot(p, t), -1, 1)))`` in [0, 180].
- Keys: ``mean_angle``, ``median_angle``, ``rmse_angle`` (degrees), ``within_11.25``, ``within_22.5``,
  ``within_30`` (share of valid pixels with angle ``< threshold``, strict, in [0, 1]; the key is
  ``f"within_{t:g}"`` for each ``t`` in ``thresholds``) and ``num_pixels`` (as a float).
- No valid pixel: ``{}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.metrics.arrays import as_float64
from pipeline.metrics.merge import add_sums, check_mergeable, check_same_options

DEFAULT_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)
HIST_BIN_DEG = 0.01
"""Histogram bin width of ``NormalsMetricAccumulator`` (degrees): the median is exact to half of it."""


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(t) for t in thresholds)
    if any(not 0 < t <= 180 for t in out):
        raise ValueError(f"thresholds: expected degrees in (0, 180], got {out}")
    return out


def angular_errors(pred: Any, target: Any) -> np.ndarray:
    """Flat float64 array of per-pixel angles (degrees) at the valid pixels (see module doc)."""
    p = as_float64(pred, "pred")
    t = as_float64(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred: expected the shape of target {tuple(t.shape)}, got {tuple(p.shape)}")
    if t.ndim not in (3, 4) or t.shape[-3] != 3:
        raise ValueError(f"target: expected 3xHxW or Nx3xHxW, got shape {tuple(t.shape)}")
    # Pixels first, xyz last: (num_pixels, 3).
    p = np.moveaxis(p, -3, -1).reshape(-1, 3)
    t = np.moveaxis(t, -3, -1).reshape(-1, 3)
    t_norm = np.linalg.norm(t, axis=1)
    valid = np.isfinite(t).all(axis=1) & (t_norm > 0)
    p, t, t_norm = p[valid], t[valid], t_norm[valid]
    if not np.isfinite(p).all():
        raise ValueError("pred: expected finite vectors at valid target pixels, got NaN or inf")
    p_norm = np.linalg.norm(p, axis=1)
    cos = np.einsum("ij,ij->i", p, t) / (t_norm * np.where(p_norm > 0, p_norm, 1.0))
    angles = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    angles[p_norm == 0] = 90.0
    return angles


def _finalize(
    n: int, angle_sum: float, sq_sum: float, median: float, hits: Sequence[int], thresholds: Sequence[float]
) -> dict[str, float]:
    if n == 0:
        return {}
    out = {
        "mean_angle": angle_sum / n,
        "median_angle": float(median),
        "rmse_angle": float(np.sqrt(sq_sum / n)),
    }
    for t, h in zip(thresholds, hits, strict=True):
        out[f"within_{t:g}"] = h / n
    out["num_pixels"] = float(n)
    return out


def normals_metrics(
    pred: Any, target: Any, *, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[str, float]:
    """Angular-error metrics over all valid pixels of ``pred`` vs ``target`` (see module doc)."""
    ths = _check_thresholds(thresholds)
    a = angular_errors(pred, target)
    if a.size == 0:
        return {}
    hits = [int(np.count_nonzero(a < t)) for t in ths]
    return _finalize(a.size, float(np.sum(a)), float(np.sum(a**2)), float(np.median(a)), hits, ths)


class NormalsMetricAccumulator:
    """Streaming ``normals_metrics``: ``update`` per image or batch, ``compute`` at the end.

    Mean, RMSE, the ``within_*`` shares and ``num_pixels`` are exact (pooled over all valid pixels, equal
    to one ``normals_metrics`` call on everything up to float summation order). The median comes from a
    histogram of the angles over [0, 180] with ``HIST_BIN_DEG`` (0.01 degree) bins, so memory stays
    bounded: each order statistic is replaced by its bin centre, hence the median is within
    ``HIST_BIN_DEG / 2`` (0.005 degree) of the exact one. ``compute()`` returns ``{}`` while no valid
    pixel has been seen.
    """

    def __init__(self, *, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> None:
        self.thresholds = _check_thresholds(thresholds)
        self._num_bins = int(round(180.0 / HIST_BIN_DEG))
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._hist = np.zeros(self._num_bins, dtype=np.int64)
        self._n = 0
        self._sum = 0.0
        self._sq_sum = 0.0
        self._hits = [0] * len(self.thresholds)

    def update(self, pred: Any, target: Any) -> None:
        """Add a ``3xHxW`` or ``Nx3xHxW`` prediction and target."""
        a = angular_errors(pred, target)
        if a.size == 0:
            return
        idx = np.minimum((a / HIST_BIN_DEG).astype(np.int64), self._num_bins - 1)  # 180 -> last bin
        self._hist += np.bincount(idx, minlength=self._num_bins)
        self._n += a.size
        self._sum += float(np.sum(a))
        self._sq_sum += float(np.sum(a**2))
        for i, t in enumerate(self.thresholds):
            self._hits[i] += int(np.count_nonzero(a < t))

    def _order_statistic(self, cum: np.ndarray, k: int) -> float:
        """Bin centre of the ``k``-th smallest angle (0-based)."""
        b = int(np.searchsorted(cum, k + 1))
        return (b + 0.5) * HIST_BIN_DEG

    def merge(self, other: NormalsMetricAccumulator) -> None:
        """Add ``other``'s angle histogram, counts and sums (another shard, same thresholds): the
        median and the ``within_*`` shares exact, mean and RMSE up to float summation order."""
        check_mergeable(self, other)
        check_same_options(self, other, ("thresholds", "_num_bins"))
        add_sums(self, other, ("_hist", "_n", "_sum", "_sq_sum", "_hits"))

    def compute(self) -> dict[str, float]:
        """The metrics over everything seen (see class doc); ``{}`` if no valid pixel."""
        if self._n == 0:
            return {}
        cum = np.cumsum(self._hist)
        lo, hi = (self._n - 1) // 2, self._n // 2
        median = 0.5 * (self._order_statistic(cum, lo) + self._order_statistic(cum, hi))
        return _finalize(self._n, self._sum, self._sq_sum, median, self._hits, self.thresholds)
