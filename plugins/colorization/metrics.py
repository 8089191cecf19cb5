"""Colorization metrics: PSNR on RGB, AUC and accuracy of the per-pixel ab error in CIE Lab.

Contract:

- Inputs are numpy arrays or torch tensors, computed in float64, returned as python floats.
- ``psnr``: RGB images of any layout, same shape; ``ndim <= 3`` is one image, ``ndim == 4`` a batch
  whose first axis indexes images (``Nx3xHxW`` or ``NxHxWx3``). PSNR is computed per image over all its
  elements and the batch result is the mean of the per-image values (the usual convention in
  colorization papers), not the PSNR of the pooled MSE. An exact match gives ``inf``.
- ab metrics: the a*, b* channels of CIE Lab (``plugins.colorization.color.rgb_to_lab``), channels last
  (``...x2``) by default or on axis -3 with ``channels_first=True`` (``2xHxW`` / ``Nx2xHxW``). The
  per-pixel error is the Euclidean distance ``||ab - ab*||``; both metrics pool all pixels (of all
  images in a batch).
- ``ab_error_auc``: area under the curve ``t -> share of pixels with error <= t`` for ``t`` in
  ``[0, max_error]``, divided by ``max_error`` (so in [0, 1]). Computed exactly as
  ``mean(max(0, 1 - e / max_error))``: each pixel contributes ``(max_error - e) / max_error``.
- ``ab_accuracy``: share of pixels with error ``<= threshold`` (inclusive, matching the AUC curve).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.metrics.arrays import as_float64


def _pair(pred: Any, target: Any, pred_name: str, target_name: str) -> tuple[np.ndarray, np.ndarray]:
    p = as_float64(pred, pred_name)
    t = as_float64(target, target_name)
    if p.shape != t.shape:
        expected = f"the shape of {target_name} {tuple(t.shape)}"
        raise ValueError(f"{pred_name}: expected {expected}, got {tuple(p.shape)}")
    if t.size == 0:
        raise ValueError(f"{target_name}: expected a non-empty array, got shape {tuple(t.shape)}")
    return p, t


def psnr(pred_rgb: Any, target_rgb: Any, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``; batch: mean over images."""
    if not data_range > 0:
        raise ValueError(f"data_range: expected > 0, got {data_range}")
    p, t = _pair(pred_rgb, target_rgb, "pred_rgb", "target_rgb")
    if t.ndim > 4:
        raise ValueError(f"target_rgb: expected ndim <= 3 (one image) or 4 (a batch), got {tuple(t.shape)}")
    batch = t.ndim == 4
    sq = (p - t) ** 2
    mse = sq.reshape(sq.shape[0], -1).mean(axis=1) if batch else np.array([sq.mean()])
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(data_range**2 / mse)
    return float(np.mean(values))


def ab_errors(pred_ab: Any, target_ab: Any, *, channels_first: bool = False) -> np.ndarray:
    """Flat float64 array of per-pixel Euclidean ab errors (see module doc for the layout)."""
    p, t = _pair(pred_ab, target_ab, "pred_ab", "target_ab")
    axis = -3 if channels_first else -1
    if t.ndim < (3 if channels_first else 1) or t.shape[axis] != 2:
        layout = "2xHxW or Nx2xHxW (channels_first=True)" if channels_first else "...x2 (channels last)"
        raise ValueError(f"target_ab: expected {layout}, got shape {tuple(t.shape)}")
    return np.linalg.norm(p - t, axis=axis).reshape(-1)


def ab_error_auc(
    pred_ab: Any, target_ab: Any, max_error: float = 150.0, *, channels_first: bool = False
) -> float:
    """Normalised AUC in [0, 1] of the cumulative ab-error curve on ``[0, max_error]`` (exact formula)."""
    if not max_error > 0:
        raise ValueError(f"max_error: expected > 0, got {max_error}")
    e = ab_errors(pred_ab, target_ab, channels_first=channels_first)
    return float(np.mean(np.maximum(0.0, 1.0 - e / max_error)))


def ab_accuracy(
    pred_ab: Any, target_ab: Any, threshold: float = 10.0, *, channels_first: bool = False
) -> float:
    """Share in [0, 1] of pixels whose ab error is ``<= threshold`` (inclusive)."""
    if not threshold >= 0:
        raise ValueError(f"threshold: expected >= 0, got {threshold}")
    e = ab_errors(pred_ab, target_ab, channels_first=channels_first)
    return float(np.count_nonzero(e <= threshold) / e.size)
