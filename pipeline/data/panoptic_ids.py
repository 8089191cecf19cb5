"""COCO panoptic id encoding: segment id = R + 256 G + 256^2 B of the PNG pixel, 0 = VOID.

The one implementation the reader, the synthetic writer and the panoptic metrics share."""

from __future__ import annotations

from typing import Any

import numpy as np

ID_LIMIT = 1 << 24  # ids are 24-bit


def ids_to_rgb(ids: Any) -> np.ndarray:
    """``HxW`` segment ids (0 .. 2^24 - 1; numpy or torch) -> ``HxWx3 uint8``."""
    a = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
    if a.size and (int(a.min()) < 0 or int(a.max()) >= ID_LIMIT):
        raise ValueError(f"panoptic ids must lie in 0..{ID_LIMIT - 1}, got {int(a.min())}..{int(a.max())}")
    a = a.astype(np.uint32)
    return np.stack([a & 255, (a >> 8) & 255, (a >> 16) & 255], axis=-1).astype(np.uint8)


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """``HxWx3 uint8`` -> ``HxW uint32`` ids."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected HxWx3, got {rgb.shape}")
    a = rgb.astype(np.uint32)
    return a[..., 0] | (a[..., 1] << 8) | (a[..., 2] << 16)
