"""Confusion matrix and the FCN segmentation scores derived from it.

Scores follow the score code of Long, Shelhamer & Darrell's FCN (``score.py``) over the matrix
``hist`` (rows = ground truth, columns = prediction)::

    pixel_acc = diag.sum() / hist.sum()
    mean_acc  = nanmean(diag / hist.sum(1))                       # classes present in the GT
    IoU       = diag / (hist.sum(1) + hist.sum(0) - diag)          # per class
    mIoU      = nanmean(IoU)                                       # classes with a non-empty union
    fwIoU     = (freq[freq > 0] * IoU[freq > 0]).sum(),  freq = hist.sum(1) / hist.sum()

A class predicted but absent from the ground truth has IoU 0 and counts in mIoU; a class absent
from both is left out of mIoU and gets no per-class key.

Pixels whose target is ``ignore_index`` are skipped. A prediction equal to ``ignore_index`` where
the target is valid ("no prediction") is a miss: it counts in its ground-truth class's row totals
(lowering pixel_acc, that class's accuracy and IoU) but in no prediction column. Such pixels are
kept in an extra column, so :attr:`ConfusionMatrix.matrix` stays KxK; without them every score
equals FCN's exactly (this is how detectron2's and mmsegmentation's evaluators treat it too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


class ConfusionMatrix:
    """Accumulates a ``num_classes`` x ``num_classes`` pixel confusion matrix.

    Args:
        num_classes: K; valid labels are ``0..K-1``.
        ignore_index: label meaning "not labelled"; must lie outside ``[0, K)``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} must lie outside [0, {num_classes})")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        # rows: ground truth; columns 0..K-1: prediction; column K: prediction == ignore_index
        self._hist = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)

    def reset(self) -> None:
        """Forget every pixel counted so far."""
        self._hist.zero_()

    @property
    def matrix(self) -> Tensor:
        """A copy of the int64 KxK matrix (CPU): ``[gt, pred]`` = pixel count."""
        return self._hist[:, : self.num_classes].clone()

    @property
    def num_pixels(self) -> int:
        """Pixels counted (valid target), including those predicted as ``ignore_index``."""
        return int(self._hist.sum())

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Count one batch: ``pred`` and ``target`` are integer arrays (torch or numpy) of equal
        shape holding class indices (any shape, e.g. BxHxW).

        Raises ValueError for a float array, a shape mismatch, or a value outside ``[0, K)``
        that is not ``ignore_index`` (naming the value).
        """
        pred_t = _as_long(pred, "pred")
        target_t = _as_long(target, "target").to(pred_t.device)
        if pred_t.shape != target_t.shape:
            raise ValueError(
                f"pred shape {tuple(pred_t.shape)} != target shape {tuple(target_t.shape)}"
            )
        k, ignore = self.num_classes, self.ignore_index
        for name, x in (("target", target_t), ("pred", pred_t)):
            bad = ((x < 0) | (x >= k)) & (x != ignore)
            if bool(bad.any()):
                value = int(x[bad][0])
                raise ValueError(
                    f"{name} has value {value}; expected a class in [0, {k}) "
                    f"or the ignore value {ignore}"
                )
        valid = target_t != ignore
        target_v = target_t[valid]
        pred_v = pred_t[valid]
        pred_v = torch.where(pred_v == ignore, torch.full_like(pred_v, k), pred_v)
        counts = torch.bincount(target_v * (k + 1) + pred_v, minlength=k * (k + 1))
        self._hist += counts.reshape(k, k + 1).cpu()

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this matrix (e.g. from another process); returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a ConfusionMatrix(num_classes={other.num_classes}, "
                f"ignore_index={other.ignore_index}) into one with num_classes="
                f"{self.num_classes}, ignore_index={self.ignore_index}"
            )
        self._hist += other._hist
        return self

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """Scores as plain floats in [0, 1] (FCN's definitions, see the module docstring).

        Keys: ``pixel_acc``, ``mean_acc``, ``mIoU``, ``fwIoU``, then ``IoU/<name>`` (``<name>``
        from ``class_names``, else the class index) for every class with a non-empty union, in
        class order. With no pixel counted the four scores are ``nan``.
        """
        k = self.num_classes
        if class_names is not None and len(class_names) != k:
            raise ValueError(f"class_names has {len(class_names)} names for {k} classes")
        names = [str(n) for n in (class_names if class_names is not None else range(k))]

        hist = self._hist.to(torch.float64).numpy()
        tp = np.diag(hist[:, :k])
        gt = hist.sum(1)  # includes "no prediction" pixels
        predicted = hist[:, :k].sum(0)
        total = gt.sum()
        union = gt + predicted - tp
        present = gt > 0
        nonempty = union > 0

        iou = np.zeros(k)
        iou[nonempty] = tp[nonempty] / union[nonempty]
        nan = math.nan
        out: dict[str, float] = {
            "pixel_acc": float(tp.sum() / total) if total > 0 else nan,
            "mean_acc": float(np.mean(tp[present] / gt[present])) if present.any() else nan,
            "mIoU": float(np.mean(iou[nonempty])) if nonempty.any() else nan,
            "fwIoU": float(np.sum(gt[present] / total * iou[present])) if total > 0 else nan,
        }
        for c in np.flatnonzero(nonempty):
            out[f"IoU/{names[c]}"] = float(iou[c])
        return out

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"num_pixels={self.num_pixels})"
        )


def _as_long(x: ArrayLike, name: str) -> Tensor:
    """An int64 tensor view/copy of an integer (or bool) torch or numpy array."""
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
            raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x).astype(np.int64, copy=False))
    if isinstance(x, Tensor):
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
        return x.long()
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


__all__ = ["ConfusionMatrix"]
