"""The ``depth`` task's drawing: a depth map with its colour bar, from the core's primitives
(``pipeline.viz``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.viz import Colormap, _depth_range, _np, colorize_depth, depth_colorbar


def depth_with_colorbar(depth: Any, vmin: float | None = None, vmax: float | None = None, *,
                        cmap: Colormap = "viridis", gap: int = 4) -> np.ndarray:
    """``colorize_depth`` of ``depth`` with its ``depth_colorbar`` (same range and ``cmap``) to the
    right after ``gap`` white columns: ``HxW'x3 uint8`` with ``W' > W``. The range defaults to the
    known pixels' min/max."""
    d = _np(depth).astype(np.float32)
    lo, hi = _depth_range(d, vmin, vmax)
    col = colorize_depth(d, lo, hi, cmap=cmap)
    h = col.shape[0]
    bar = depth_colorbar(lo, hi, height=h, cmap=cmap)
    out = np.full((max(h, bar.shape[0]), col.shape[1] + gap + bar.shape[1], 3), 255, np.uint8)
    out[:h, : col.shape[1]] = col
    out[: bar.shape[0], col.shape[1] + gap:] = bar
    return out
