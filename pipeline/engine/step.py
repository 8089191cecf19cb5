"""One optimisation step: the loss terms of every task, combined, back-propagated and applied."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from pipeline.engine import distributed
from pipeline.engine.loss_weighting import LossWeighting
from pipeline.engine.precision import Precision
from pipeline.model import MultiTaskModel


class NonFiniteLoss(ArithmeticError):
    """A loss term is NaN or infinite (on any rank); the message names the terms and values."""


class TrainingModule(nn.Module):
    """``forward(batch) -> {"<task>/<term>": loss}``: what DDP wraps, so the loss tensors it
    returns are what DDP traces to find parameters a step did not use."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.losses(self.model(batch), batch)


def train_step(model: MultiTaskModel, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
               clip_grad_norm: float | None = None, forward: nn.Module | None = None,
               weighting: LossWeighting | None = None, precision: Precision | None = None,
               scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One optimisation step over the weighted task losses.

    ``forward`` is the module computing the loss terms (a DDP-wrapped ``TrainingModule`` under
    torchrun; default the model itself), ``weighting`` combines the per-task losses (default
    ``model.loss_weights``), ``precision`` sets autocast and ``scaler`` scales fp16 gradients;
    ``scheduler``, when given, steps after the optimizer (the training loop leaves that to its
    ``LRScheduler`` hook). Returns ``{"<task>/<term>": value, ..., "weight/<task>": weight in
    force, "loss": total}``; raises ``NonFiniteLoss`` before touching the weights when any term on
    any rank is not finite (all ranks raise together, so none waits for the others' gradients)."""
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        terms = forward(batch) if forward is not None else model.losses(model(batch), batch)
    terms = {k: v.float() for k, v in terms.items()}
    per_task = model.task_losses(terms) if weighting is not None else {}
    if weighting is None:
        loss = model.total_loss(terms)
        weights = {t: w for t, w in model.loss_weights.items() if t in model.heads}
    else:
        loss = weighting.combine(per_task,
                                 shared_parameters=model.last_shared_parameters()
                                 if weighting.needs_shared_parameters else ())
        weights = weighting.weights()
    if distributed.any_rank(not bool(torch.isfinite(loss))):
        bad = [f"{k} = {float(v.detach())}" for k, v in terms.items() if not torch.isfinite(v)]
        own = f"total = {float(loss.detach())}" if not torch.isfinite(loss) else "another process's loss"
        raise NonFiniteLoss(", ".join(bad) or own)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if weighting is not None:
        distributed.average_gradients(weighting.parameters())
    if clip_grad_norm:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    row = {k: float(v.detach()) for k, v in terms.items()}
    if weighting is not None:
        weighting.after_step({k: float(v.detach()) for k, v in per_task.items()})
    row.update({f"weight/{k}": float(v) for k, v in weights.items()})
    row["loss"] = float(loss.detach())
    return row
