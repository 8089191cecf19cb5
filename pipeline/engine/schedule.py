"""Learning-rate schedules: linear warm-up, then cosine, poly or constant."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_factor(*, kind: str, total_steps: int, warmup_steps: int, power: float = 0.9,
              min_factor: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a 0-based step (for ``LambdaLR``).

    Warm-up rises linearly from 1/(warmup+1) to 1; then ``cosine`` decays to ``min_factor`` at
    ``total_steps``, ``poly`` as (1 - t)^power, ``constant`` stays at 1."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(total_steps - warmup_steps, 1)
        t = min(max(step - warmup_steps, 0) / span, 1.0)
        if kind == "cosine":
            return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "poly":
            return min_factor + (1 - min_factor) * (1 - t) ** power
        return 1.0

    return factor
