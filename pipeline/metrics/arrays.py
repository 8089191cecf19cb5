"""Input handling shared by the dense metrics: numpy arrays or torch tensors in, float64 numpy out."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_float64(x: Any, name: str) -> np.ndarray:
    """A float64 numpy copy/view of a numpy array, torch tensor or nested sequence; ``ValueError``
    naming ``name`` for anything else."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric array or tensor, got {type(x).__name__}") from exc
