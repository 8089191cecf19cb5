"""Resizing helpers shared by the dense decoders: bilinear resize to a size, top-left crop."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def upsample_to(x: Tensor, size: Sequence[int], *, mode: str = "bilinear") -> Tensor:
    """Resize Bx C x h x w ``x`` to ``size`` = (H, W) (``align_corners=False``); no-op if equal."""
    size = (size[0], size[1])  # no int(): export keeps sizes symbolic
    if tuple(x.shape[-2:]) == size:
        return x
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    return F.interpolate(x, size=size, mode=mode)


def crop_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Top-left crop of ``x`` to ``size`` = (h, w) (FCN's crop layer); ``x`` must be at least as
    large: an upsampling by f of a map of size ``ceil(n / f)`` is ``>= n``."""
    h, w = int(size[-2]), int(size[-1])
    if x.shape[-2] < h or x.shape[-1] < w:
        raise RuntimeError(f"cannot crop {tuple(x.shape[-2:])} to {(h, w)}")
    return x[..., :h, :w]


__all__ = ["crop_to", "upsample_to"]
