"""Distributed data parallel under torchrun: process group, rank roles, reductions.

``torchrun --nproc_per_node=N -m pipeline.cli train`` (or ``densepipe train`` under torchrun) sets
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`init_distributed` joins the process group
(NCCL on CUDA, gloo on CPU) and every other function here is a no-op in a single process. Rank 0
is the only one that writes checkpoints, logs and MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """This process's place: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """The ranks torchrun put in the environment (a single process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistEnv(rank=int(os.environ.get("RANK", "0")), world_size=world,
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device, *, timeout_s: float = 600.0) -> DistEnv:
    """Join (once) the process group torchrun describes; NCCL for CUDA devices, else gloo.

    On CUDA the process uses ``cuda:<LOCAL_RANK>``. Returns the single-process ``DistEnv`` when
    ``WORLD_SIZE`` is 1 or unset."""
    env = env_from_torchrun()
    if not env.enabled:
        return env
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return env


def current() -> DistEnv:
    """The process group this process is in (single process when none)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return DistEnv()


def local_device(device: torch.device, env: DistEnv) -> torch.device:
    """``cuda:<local_rank>`` for a CUDA run under torchrun, ``device`` otherwise."""
    if device.type == "cuda" and env.enabled:
        return torch.device("cuda", env.local_rank)
    return device


def per_rank_batch(global_batch: int, env: DistEnv) -> int:
    """``train.batch_size`` is the global batch; each process takes an equal share."""
    if global_batch % env.world_size:
        raise ConfigError(f"train.batch_size={global_batch} must be divisible by the "
                          f"{env.world_size} processes torchrun started (each takes an equal share)")
    return global_batch // env.world_size


def all_reduce_(tensor: torch.Tensor, *, op: str = "mean") -> torch.Tensor:
    """In-place sum / mean / max over ranks (a no-op in one process). A tensor on a device the
    backend cannot reduce (a CPU tensor under NCCL) goes through one that it can."""
    env = current()
    if not env.enabled:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    device = _collective_device()
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(work, op=reduce_op)
    if op == "mean":
        work /= env.world_size
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (keeps ranks in lockstep on skips/stops)."""
    if not current().enabled:
        return flag
    return bool(all_reduce_(torch.tensor([1.0 if flag else 0.0]), op="max").item() > 0)


def _collective_device() -> torch.device:
    """Where a tensor for a collective must live: the GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_gradients(parameters: Any) -> None:
    """Mean of ``.grad`` over ranks for parameters that DDP does not manage."""
    if not current().enabled:
        return
    for p in parameters:
        if p.grad is not None:
            all_reduce_(p.grad, op="mean")


def broadcast_object(obj: Any, *, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def merge_evaluators(evaluators: dict[str, Any]) -> dict[str, Any]:
    """Every rank's evaluators merged on rank 0 (``Evaluator.merge``); other ranks get theirs
    back unchanged. Confusion matrices are summed, COCO and panoptic results concatenated."""
    env = current()
    if not env.enabled:
        return evaluators
    missing = [name for name, ev in evaluators.items() if not hasattr(ev, "merge")]
    if missing:
        raise ConfigError(f"evaluation under DDP: the evaluators of {', '.join(missing)} have no "
                          "merge(other) method, so their shards cannot be combined")
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, evaluators)
    if not env.is_main:
        return evaluators
    for other in gathered[1:]:
        for name, ev in evaluators.items():
            ev.merge(other[name])
    return evaluators


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
