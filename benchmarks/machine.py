"""Shared by the benchmark scripts: what machine a figure was measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_description() -> str:
    """``cpu (MODEL, N cores, ISA)``: the model, the usable cores and the widest vector
    instructions torch uses here (``AVX2``, ``AVX512``, ...), which alone can change a CPU
    training step's time by a factor of two or more between machines of the same kind."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = torch.backends.cpu.get_cpu_capability()
    return f"cpu ({cpu_model() or platform.machine()}, {cores} cores, {isa})"
