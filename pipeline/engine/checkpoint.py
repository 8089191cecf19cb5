"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint is a dict: ``format``, ``step``, ``epoch``, ``samples_seen`` (the sampler position),
``world_size``, ``model`` (state dict), ``optimizer``, ``scheduler``, ``scaler`` (fp16 gradient
scaler), ``loss_weighting`` (its state dict), ``rng`` (torch CPU/CUDA, Python and NumPy states),
``config`` (the full config as plain data), ``card`` (dataset card JSON), ``metrics`` (last
evaluation), ``best_value``, ``early_stopping``, ``skipped_nonfinite``, ``mlflow_run_id``,
``hooks`` (per-hook plain data) and, with ``train.ema``, ``model_ema`` (the averaged weights).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.io import atomic_path

FORMAT = "densepipe-checkpoint/1"


def rng_state() -> dict[str, Any]:
    """Torch CPU (+ every CUDA device), Python and NumPy generator states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus ``format``) to ``path`` through a temporary file and rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle errors, unsafe globals
        detail = " ".join(str(e).split())[:160]
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {type(e).__name__}: {detail}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a densepipe checkpoint (expected format {FORMAT})")
    return ckpt


def _head_of(key: str) -> str:
    parts = key.split(".")
    return parts[1] if parts[0] == "heads" and len(parts) > 1 else parts[0]


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """Load ``state`` strictly; a mismatch names the heads (or backbone) that differ."""
    own = model.state_dict()
    missing = sorted({_head_of(k) for k in own if k not in state})
    unexpected = sorted({_head_of(k) for k in state if k not in own})
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing in checkpoint: {', '.join(missing)}")
        if unexpected:
            problems.append(f"not in this model: {', '.join(unexpected)}")
        if shapes:
            problems.append(f"shape mismatch (checkpoint vs model): {shapes[0]}"
                            + (f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""))
        raise CheckpointError(
            f"{source}: checkpoint does not match the model config ({'; '.join(problems)})"
        )
    model.load_state_dict(state, strict=True)
