"""Multi-task loss weighting: turns the per-task scalar losses into the total that is backpropagated.

Contract (the trainer calls exactly this, once per step)::

    weighting = build_loss_weighting(method, tasks=..., base_weights=model.loss_weights, **options)
    optimizer.zero_grad()
    total = weighting.combine({task: loss}, shared_parameters=model.last_shared_parameters())
    total.backward(); optimizer.step()
    weighting.after_step({task: float(loss)})
    weighting.weights()  # {task: effective weight}, logged as train/weight/<task>

- ``task_losses`` maps a task name to its scalar loss (the sum of its unweighted terms). A task absent
  from the dict (no labels this batch) contributes nothing, its statistics are not updated and its
  weight does not change this step (DWA: see below). A non-finite loss stays in ``total`` (so the
  trainer's non-finite guard sees it) but is kept out of every statistic, like an absent task.
- ``base_weights`` (``model.loss_weights``, 1.0 where missing; entries for tasks not trained here are
  ignored) multiply every method's weight, so relative base weights keep their meaning; ``fixed`` is
  just them. ``weights()[t]`` is the full factor in front of ``L_t`` in ``total`` (for ``uncertainty``
  ``total`` also holds the ``+ s_t`` regulariser).
- Learnable weights (``uncertainty``, ``gradnorm``) are ``weighting.parameters()``, stepped by the
  trainer's optimizer (without weight decay). Parameters of absent tasks get ``.grad = None`` in
  ``combine`` so no optimizer (momentum, Adam moments) moves them.
- Under ``torch.distributed`` the statistics that decide the weights (DWA's loss values, GradNorm's
  gradient norms and losses) are averaged over the ranks where each task is present, so every rank
  computes identical weights; ``combine``/``after_step`` are then collectives that every rank calls.

Methods (``build_loss_weighting(method, ...)``): ``fixed``, ``uncertainty`` (Kendall et al., 2018),
``dwa`` (Liu et al., 2019), ``gradnorm`` (Chen et al., 2018); see each class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.engine import distributed
from pipeline.errors import ConfigError
from pipeline.named_registry import NamedRegistry

GRADNORM_MIN_WEIGHT = 1e-4
"""GradNorm weights are floored here before renormalising (not in the paper: a large step must not
make a weight zero or negative, which would stop or invert that task's training)."""


def _mean_over_ranks(values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task mean of ``values`` (``M x K``, one column per task) over the ranks where the task is
    ``present`` (bool ``K``), and whether it is present on any rank. Absent columns read 0.

    Without an initialised process group this is the identity (absent columns zeroed). Under
    ``torch.distributed`` it is one ``all_reduce``: every rank must call it at the same point."""
    values = torch.where(present, values, torch.zeros_like(values))
    if not distributed.current().enabled:
        return values, present
    packed = distributed.all_reduce_(torch.cat([values, present.to(values.dtype)[None]]), op="sum")
    count = packed[-1]
    return packed[:-1] / count.clamp_min(1), count > 0


def _option(name: str, value: Any, ok: Callable[[float], bool], expected: str, *,
            integer: bool = False) -> float:
    """``value`` as a number after checking it; one-line ``ConfigError`` naming the option otherwise."""
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(float(value)):
        raise ConfigError(f"train.loss_weighting.options.{name}: expected {expected}, got {value!r}")
    return value


class LossWeighting(nn.Module):
    """Turns per-task scalar losses into the total that is backpropagated (see the module doc)."""

    method = ""
    needs_shared_parameters = False
    """True where ``combine`` needs ``shared_parameters`` (GradNorm); the others ignore them."""

    def __init__(self, tasks: Sequence[str], base_weights: Mapping[str, float]) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = tuple(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: expected distinct task names, got {list(tasks)}")
        self.base: dict[str, float] = {}
        for t in self.tasks:
            b = base_weights.get(t, 1.0)
            if isinstance(b, bool) or not isinstance(b, int | float) or not (math.isfinite(b) and b >= 0):
                raise ConfigError(f"model.loss_weights.{t}: expected a finite number >= 0, got {b!r}")
            self.base[t] = float(b)

    def combine(self, task_losses: Mapping[str, Tensor], *,
                shared_parameters: Sequence[nn.Parameter] = ()) -> Tensor:
        """Differentiable total from ``{task: scalar loss}``; called once per step after
        ``optimizer.zero_grad()`` and before ``total.backward()``. May set ``.grad`` on its own
        parameters."""
        raise NotImplementedError

    def after_step(self, task_losses: Mapping[str, float]) -> None:
        """Called once per step after ``optimizer.step()`` with the detached per-task loss values."""
        self._index(task_losses)

    def weights(self) -> dict[str, float]:
        """The effective weight multiplying each task's loss this step."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"method={self.method!r}, tasks={list(self.tasks)}, base={self.base}"

    def _index(self, task_losses: Mapping[str, Any]) -> list[int]:
        """Indices (into ``tasks``, ascending) of the tasks in ``task_losses``; ``ValueError`` for an
        unknown task."""
        unknown = sorted(set(task_losses) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_losses: unknown tasks {unknown}; expected some of {list(self.tasks)}")
        return [i for i, t in enumerate(self.tasks) if t in task_losses]

    def _present(self, task_losses: Mapping[str, Tensor]) -> list[str]:
        """The tasks of ``task_losses`` in ``tasks`` order, after checking each loss is a scalar."""
        present = [self.tasks[i] for i in self._index(task_losses)]
        if not present:
            raise ValueError(f"task_losses is empty; expected a loss for some of {list(self.tasks)}")
        for t in present:
            if not isinstance(task_losses[t], Tensor) or task_losses[t].dim() != 0:
                raise ValueError(f"task_losses[{t!r}]: expected a scalar tensor, got {task_losses[t]!r}")
        return present

    def _clear_absent_grads(self, params: nn.ParameterDict, present: Sequence[str]) -> None:
        for t in self.tasks:
            if t not in present:
                params[t].grad = None


def _total(terms: list[Tensor]) -> Tensor:
    """Left-to-right sum (the same rounding as writing ``a + b + c``)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


class FixedWeighting(LossWeighting):
    """``total = sum_t b_t L_t`` with the user's base weights ``b_t``; ``weights()`` is ``b``."""

    method = "fixed"

    def combine(self, task_losses: Mapping[str, Tensor], *,
                shared_parameters: Sequence[nn.Parameter] = ()) -> Tensor:
        return _total([self.base[t] * task_losses[t] for t in self._present(task_losses)])

    def weights(self) -> dict[str, float]:
        return dict(self.base)


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal, Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

    One learnable ``s_t = log sigma_t^2`` per task (``log_variance[t]``, a 0-d parameter, init
    ``init``)::

        total = sum_t ( exp(-s_t) b_t L_t + s_t )

    the form commonly used for every task type (the paper's regression term
    ``L / (2 sigma^2) + log sigma`` is half of it; its classification term drops the 1/2 on the
    loss). For a fixed ``L_t`` the optimum over ``s_t`` is ``exp(-s_t) = 1 / (b_t L_t)``: each task
    is scaled towards a unit contribution, so a noisier task (larger irreducible loss) gets a smaller
    weight. ``weights()[t] = b_t exp(-s_t)``. Under ``torch.distributed`` a task present on any rank
    counts as present on all (a zero gradient where it is absent), so the parameters with a
    gradient are the same on every rank. ``total`` can be negative, and a task whose loss goes
    to 0 gets an unbounded weight. Needs ``b_t > 0`` (with ``b_t = 0`` the optimum is
    ``s_t = -inf``)."""

    method = "uncertainty"

    def __init__(self, tasks: Sequence[str], base_weights: Mapping[str, float], *,
                 init: float = 0.0) -> None:
        super().__init__(tasks, base_weights)
        init = _option("init", init, math.isfinite, "a finite number (initial log variance)")
        for t, b in self.base.items():
            if b <= 0:
                raise ConfigError(f"model.loss_weights.{t}: uncertainty weighting needs a weight > 0, "
                                  f"got {b}")
        self.log_variance = nn.ParameterDict(
            {t: nn.Parameter(torch.tensor(float(init))) for t in self.tasks})

    def combine(self, task_losses: Mapping[str, Tensor], *,
                shared_parameters: Sequence[nn.Parameter] = ()) -> Tensor:
        present = self._present(task_losses)
        local = torch.tensor([t in present for t in self.tasks])
        _, anywhere = _mean_over_ranks(torch.zeros(1, len(self.tasks)), local)
        anywhere_tasks = [t for t, on in zip(self.tasks, anywhere.tolist(), strict=True) if on]
        self._clear_absent_grads(self.log_variance, anywhere_tasks)
        terms = []
        for t in anywhere_tasks:
            s = self.log_variance[t]
            # a task present only on other ranks gets a zero gradient here (not None), so every rank
            # holds a gradient for the same parameters when the trainer averages them
            terms.append(torch.exp(-s) * self.base[t] * task_losses[t] + s if t in present else 0.0 * s)
        return _total(terms)

    def weights(self) -> dict[str, float]:
        return {t: self.base[t] * math.exp(-float(self.log_variance[t].detach())) for t in self.tasks}


class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, eq. 7)::

        w_t(k) = K exp(r_t(k-1) / T) / sum_i exp(r_i(k-1) / T),  r_t(k-1) = Lbar_t(k-1) / Lbar_t(k-2)

    ``Lbar_t(k)`` is task ``t``'s mean loss over "epoch" ``k``, here a window of ``window``
    consecutive steps (counting only the steps where the task was present); ``T = temperature``;
    ``K`` = number of tasks, so the weights sum to ``K``. A task whose loss falls more slowly gets
    the larger weight. ``w = 1`` during the first two windows; the weights are recomputed when a
    window closes (in ``after_step``) and stay constant within a window, so an absent task's
    weight changes only at a window boundary, like everyone's. ``r_t = 1`` when ``Lbar_t`` is
    undefined in either window (task never present) or ``Lbar_t(k-2) <= 0``.
    ``weights()[t] = b_t w_t``. All state is in float64 buffers, so ``state_dict()`` resumes
    bit-exactly, mid-window included."""

    method = "dwa"

    def __init__(self, tasks: Sequence[str], base_weights: Mapping[str, float], *,
                 window: int = 50, temperature: float = 2.0) -> None:
        super().__init__(tasks, base_weights)
        self.window = int(_option("window", window, lambda v: v >= 1, "an integer >= 1 (steps)",
                                  integer=True))
        self.temperature = float(_option("temperature", temperature, lambda v: math.isfinite(v) and v > 0,
                                         "a finite number > 0"))
        k = len(self.tasks)
        f64 = torch.float64
        self.register_buffer("task_weight", torch.ones(k, dtype=f64))
        self.register_buffer("window_sum", torch.zeros(k, dtype=f64))
        self.register_buffer("window_count", torch.zeros(k, dtype=f64))
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("windows_done", torch.zeros((), dtype=torch.long))
        # row 0: Lbar(k-2), row 1: Lbar(k-1); NaN where the task was not present in that window
        self.register_buffer("history", torch.full((2, k), math.nan, dtype=f64))

    def combine(self, task_losses: Mapping[str, Tensor], *,
                shared_parameters: Sequence[nn.Parameter] = ()) -> Tensor:
        terms = []
        for t in self._present(task_losses):
            loss = task_losses[t]
            w = self.task_weight[self.tasks.index(t)].to(loss.dtype)
            terms.append(self.base[t] * w * loss)
        return _total(terms)

    def after_step(self, task_losses: Mapping[str, float]) -> None:
        index = self._index(task_losses)
        values = torch.zeros(1, len(self.tasks), dtype=torch.float64, device=self.window_sum.device)
        present = torch.zeros(len(self.tasks), dtype=torch.bool, device=self.window_sum.device)
        for i in index:
            v = float(task_losses[self.tasks[i]])
            if math.isfinite(v):
                values[0, i], present[i] = v, True
        mean, present = _mean_over_ranks(values, present)
        self.window_sum += mean[0]
        self.window_count += present.to(torch.float64)
        self.window_steps += 1
        if int(self.window_steps) >= self.window:
            self._close_window()

    def _close_window(self) -> None:
        seen = self.window_count > 0
        mean = torch.where(seen, self.window_sum / self.window_count.clamp_min(1), math.nan)
        self.history[0].copy_(self.history[1])
        self.history[1].copy_(mean)
        self.window_sum.zero_()
        self.window_count.zero_()
        self.window_steps.zero_()
        self.windows_done += 1
        if int(self.windows_done) >= 2:
            before, last = self.history[0], self.history[1]
            ratio = last / before
            ratio = torch.where(torch.isfinite(ratio) & (before > 0), ratio, 1.0)
            self.task_weight.copy_(len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0))

    def weights(self) -> dict[str, float]:
        return {t: self.base[t] * w for t, w in zip(self.tasks, self.task_weight.tolist(), strict=True)}


class GradNorm(LossWeighting):
    """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

    Learnable ``w_t`` (``task_weight[t]``, init 1). With ``W`` the last shared layer
    (``shared_parameters``)::

        g_t = ||grad_W L_t||,  G_t = ||grad_W (w_t L_t)|| = w_t g_t
        Ltilde_t = L_t / L_t(0),  r_t = Ltilde_t / mean_i Ltilde_i
        L_grad = sum_t | G_t - mean_i(G_i) r_t^alpha |    (the target is a constant)

    ``L_t(0)`` is the first loss seen for the task (buffer ``initial_loss``). ``g_t`` comes from
    ``torch.autograd.grad(L_t, W, retain_graph=True)``, one pass through the heads down to ``W``
    per task; ``combine`` sets ``w_t.grad = dL_grad / dw_t`` (overwriting it) for the main
    optimizer and returns ``total = sum_t b_t w_t.detach() L_t``, so the weights get no gradient
    from ``total``. ``after_step`` renormalises the weights so that ``sum_t w_t = K`` (number of
    tasks), as in the paper; only the tasks updated this step are rescaled (absent ones keep their
    weight), and each is first floored at ``GRADNORM_MIN_WEIGHT``. A task whose loss has fallen
    less (larger ``Ltilde``) gets a larger gradient-norm target, hence a larger weight; ``alpha``
    sets the strength of that pull (0: equal gradient norms). ``weights()[t] = b_t w_t``."""

    method = "gradnorm"
    needs_shared_parameters = True

    def __init__(self, tasks: Sequence[str], base_weights: Mapping[str, float], *,
                 alpha: float = 1.5) -> None:
        super().__init__(tasks, base_weights)
        self.alpha = float(_option("alpha", alpha, lambda v: math.isfinite(v) and v >= 0,
                                   "a finite number >= 0"))
        self.task_weight = nn.ParameterDict({t: nn.Parameter(torch.tensor(1.0)) for t in self.tasks})
        self.register_buffer("initial_loss", torch.full((len(self.tasks),), math.nan, dtype=torch.float64))
        self._updated: list[str] = []

    def combine(self, task_losses: Mapping[str, Tensor], *,
                shared_parameters: Sequence[nn.Parameter] = ()) -> Tensor:
        present = self._present(task_losses)
        shared = [p for p in shared_parameters if p.requires_grad]
        if not shared:
            raise ConfigError("train.loss_weighting.method gradnorm needs the last shared layer: pass "
                              "shared_parameters (parameters that require grad) to combine()")
        device = task_losses[present[0]].device
        stats = torch.zeros(2, len(self.tasks), dtype=torch.float64, device=device)
        local = torch.zeros(len(self.tasks), dtype=torch.bool, device=device)
        for t in present:
            i = self.tasks.index(t)
            loss = task_losses[t]
            stats[0, i] = _grad_norm(loss, shared)
            stats[1, i] = loss.detach()
            local[i] = torch.isfinite(stats[:, i]).all()
        (g, losses), on = _mean_over_ranks(stats, local)
        self._updated = [t for t, o in zip(self.tasks, on.tolist(), strict=True) if o]
        self._clear_absent_grads(self.task_weight, self._updated)
        if self._updated:
            self._set_weight_grads(g, losses, on)
        return _total([self.base[t] * self.task_weight[t].detach().to(task_losses[t].dtype) * task_losses[t]
                       for t in present])

    def _set_weight_grads(self, g: Tensor, losses: Tensor, on: Tensor) -> None:
        """``w_t.grad = dL_grad/dw_t`` for the updated tasks, from the (rank-averaged) ``g`` and
        ``losses`` (``K``) and the mask ``on`` of tasks with statistics this step."""
        initial = self.initial_loss.to(losses.device)
        initial = torch.where(on & torch.isnan(initial), losses, initial)
        self.initial_loss.copy_(initial)
        sel = on.nonzero().flatten()
        tilde = losses[sel] / initial[sel]
        ratio = tilde / tilde.mean()
        target_scale = ratio.pow(self.alpha)
        target_scale = torch.where(torch.isfinite(target_scale), target_scale, 1.0)
        params = [self.task_weight[t] for t in self._updated]
        with torch.enable_grad():
            w = torch.stack(params)
            big_g = w * g[sel].to(w)
            target = big_g.detach().mean() * target_scale.to(w)
            grad_loss = (big_g - target).abs().sum()
            grads = torch.autograd.grad(grad_loss, params)
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad

    def after_step(self, task_losses: Mapping[str, float]) -> None:
        self._index(task_losses)
        if not self._updated:
            return
        with torch.no_grad():
            on = [self.task_weight[t] for t in self._updated]
            off = [self.task_weight[t] for t in self.tasks if t not in self._updated]
            budget = len(self.tasks) - sum(float(p) for p in off)
            floored = torch.stack(on).clamp_min(GRADNORM_MIN_WEIGHT)
            scaled = floored * (budget / floored.sum())
            for p, value in zip(on, scaled, strict=True):
                p.copy_(value)
        self._updated = []

    def weights(self) -> dict[str, float]:
        return {t: self.base[t] * float(self.task_weight[t].detach()) for t in self.tasks}


def _grad_norm(loss: Tensor, shared: list[nn.Parameter]) -> Tensor:
    """``||d loss / d shared||`` over all of ``shared`` (0 where the loss does not reach them); the
    graph is kept for the backward of the total."""
    if not loss.requires_grad:
        return torch.zeros((), dtype=torch.float64, device=loss.device)
    grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
    norms = [torch.linalg.vector_norm(g.detach(), dtype=torch.float64) for g in grads if g is not None]
    if not norms:
        return torch.zeros((), dtype=torch.float64, device=loss.device)
    return torch.linalg.vector_norm(torch.stack(norms).to(loss.device))


LOSS_WEIGHTINGS: NamedRegistry[type[LossWeighting]] = NamedRegistry(
    "method", what="train.loss_weighting.method", sort=False, keyword_only=True, entries={
        "fixed": FixedWeighting,
        "uncertainty": UncertaintyWeighting,
        "dwa": DynamicWeightAverage,
        "gradnorm": GradNorm,
    })


def build_loss_weighting(method: str, *, tasks: Sequence[str], base_weights: Mapping[str, float],
                         **options: Any) -> LossWeighting:
    """The weighting ``method`` (fixed | uncertainty | dwa | gradnorm) over ``tasks`` with the user's
    ``base_weights`` and method ``options`` (uncertainty: init; dwa: window, temperature; gradnorm:
    alpha). One-line ``ConfigError`` for an unknown method, an unknown option or a bad value."""
    cls = LOSS_WEIGHTINGS.lookup(method)
    allowed = LOSS_WEIGHTINGS.options(method)
    for key in options:
        if key not in allowed:
            raise ConfigError(f"train.loss_weighting.options: unknown option {key!r} for method {method!r}; "
                              f"allowed: {', '.join(allowed) or 'none'}")
    return cls(tasks, base_weights, **options)


__all__ = [
    "GRADNORM_MIN_WEIGHT",
    "LOSS_WEIGHTINGS",
    "DynamicWeightAverage",
    "FixedWeighting",
    "GradNorm",
    "LossWeighting",
    "UncertaintyWeighting",
    "build_loss_weighting",
]
