"""Numeric settings of a run: autocast dtype, gradient scaler, TF32, determinism."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """``dtype`` of autocast (``None`` = fp32, no autocast) on ``device_type``."""

    name: str
    dtype: torch.dtype | None
    device_type: str

    @property
    def needs_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled only for fp16 (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``train.precision``: ``auto`` is bf16 on CUDA and fp32 on CPU (CPU autocast is slower
    than fp32 on most CPUs); ``bf16`` on a GPU without it is an error naming the GPU."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name == "fp32":
        return Precision("fp32", None, device.type)
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; "
                          "use fp16 (with its gradient scaler) or fp32")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision=fp16 needs a CUDA device; on CPU use bf16 or fp32")
    return Precision(name, torch.bfloat16 if name == "bf16" else torch.float16, device.type)


def configure_backends(*, device: torch.device, tf32: bool, deterministic: bool) -> None:
    """TF32 where the GPU has it; deterministic algorithms and no cuDNN autotuning on request."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism
        torch.use_deterministic_algorithms(True)
