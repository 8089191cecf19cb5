"""Convex upsampling (Teed and Deng, 2020, "RAFT"): a learned, edge-preserving x``factor`` upsampling
of a dense prediction.

Each output pixel is a convex combination of the 3x3 coarse pixels around the coarse pixel it lies
in, with weights (a softmax over the 9 neighbours) predicted per output pixel from the decoder's
features at the coarse resolution. Bilinear upsampling mixes the values on both sides of an edge
(a thin thing at 3 m in front of a wall at 10 m gets a band of in-between depths); convex
weights can instead take each output pixel from its own side.

The weight predictor starts out reproducing bilinear interpolation (``align_corners=False``,
borders clamped): its last layer starts at zero and its bias is the log of the bilinear weights
(zeros floored at ``BILINEAR_FLOOR``), so a head gains the option without starting anywhere
worse than bilinear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.nn.resize import crop_to, upsample_to

BILINEAR_FLOOR = 1e-4
"""Bilinear weights of zero start at this (before the softmax renormalises), so log is finite."""


def bilinear_neighbour_weights(factor: int) -> Tensor:
    """``9 x factor x factor`` float64: the weight bilinear x``factor`` upsampling
    (``align_corners=False``) gives neighbour ``k = 3 * (dy + 1) + (dx + 1)`` (dy, dx in -1..1) of
    the coarse pixel for output sub-pixel ``(a, b)``; each ``[:, a, b]`` sums to 1."""
    if factor < 1:
        raise ValueError(f"factor: expected >= 1, got {factor}")
    one_d = torch.zeros(3, factor, dtype=torch.float64)
    for u in range(factor):
        t = (u + 0.5) / factor - 0.5  # offset of the sample from the coarse pixel centre, (-0.5, 0.5)
        if t < 0:
            one_d[0, u], one_d[1, u] = -t, 1 + t
        else:
            one_d[1, u], one_d[2, u] = 1 - t, t
    return torch.einsum("ia,jb->ijab", one_d, one_d).reshape(9, factor, factor)


def convex_combine(values: Tensor, weight_logits: Tensor, factor: int) -> Tensor:
    """Upsample ``values`` (B x C x h x w) by ``factor`` with per-pixel convex weights.

    ``weight_logits``: B x (9 * factor**2) x h x w, laid out as ``(neighbour k, row a, column b)``
    (see ``bilinear_neighbour_weights``); the softmax over k gives the weights. Borders replicate
    the edge pixels (as bilinear interpolation's clamping does). Returns B x C x (h * factor) x
    (w * factor), each value within the range of its 3x3 coarse neighbourhood."""
    B, C, h, w = values.shape
    f = int(factor)
    if weight_logits.shape != (B, 9 * f * f, h, w):
        raise ValueError(f"weight_logits: expected shape {(B, 9 * f * f, h, w)}, "
                         f"got {tuple(weight_logits.shape)}")
    weights = torch.softmax(weight_logits.view(B, 1, 9, f, f, h, w).float(), dim=2)
    neighbours = F.unfold(F.pad(values.float(), (1, 1, 1, 1), mode="replicate"), kernel_size=3)
    neighbours = neighbours.view(B, C, 9, 1, 1, h, w)
    out = (weights * neighbours).sum(dim=2)  # B, C, a, b, h, w
    return out.permute(0, 1, 4, 2, 5, 3).reshape(B, C, h * f, w * f).to(values.dtype)


class ConvexUpsample(nn.Module):
    """Predicts the convex weights from ``in_channels`` features at the coarse resolution
    (3x3 conv to ``hidden`` channels, ReLU, 1x1 conv to ``9 * factor**2``) and upsamples a
    prediction with them (``convex_combine``). Starts as bilinear upsampling (module docstring)."""

    def __init__(self, in_channels: int, *, factor: int, hidden: int | None = None) -> None:
        super().__init__()
        if factor < 2:
            raise ValueError(f"factor: expected >= 2, got {factor}")
        hidden = int(hidden or in_channels)
        self.factor = int(factor)
        self.hidden = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.weights = nn.Conv2d(hidden, 9 * self.factor**2, 1)
        nn.init.kaiming_normal_(self.hidden[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.hidden[0].bias)
        nn.init.zeros_(self.weights.weight)
        start = bilinear_neighbour_weights(self.factor).clamp_min(BILINEAR_FLOOR).log()
        with torch.no_grad():
            self.weights.bias.copy_(start.reshape(-1).float())

    def forward(self, values: Tensor, features: Tensor) -> Tensor:
        """``values`` B x C x h x w, ``features`` B x in_channels x h x w -> B x C x fh x fw."""
        return convex_combine(values, self.weights(self.hidden(features)), self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def fit_to(x: Tensor, size: tuple[int, int], factor: int) -> Tensor:
    """Crop an upsampled map of ``factor * ceil(size / factor)`` to ``size`` (the extra rows and
    columns are the ceil's padding, at the bottom and right); any other size is resized bilinearly."""
    H, W = int(size[0]), int(size[1])
    h, w = x.shape[-2:]
    if h >= H > h - factor and w >= W > w - factor:
        return crop_to(x, (H, W))
    return upsample_to(x, (H, W))


__all__ = ["BILINEAR_FLOOR", "ConvexUpsample", "bilinear_neighbour_weights", "convex_combine", "fit_to"]
