"""Training lifecycle hooks: the run's state, the plugin manager that calls them, built-in hooks.

Hook specifications are in ``pipeline.hookspecs``. Plugins come from the ``densepipe.hooks``
entry-point group (all of them, minus ``train.disabled_hooks``) and from the built-ins enabled by
config (``train.ema``). A plugin that fails to import stops the run with its entry point named:
a silently missing logger or weight average is worse than no run.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import nn

from pipeline import hookspecs
from pipeline.config import Config
from pipeline.errors import PluginError
from pipeline.hookspecs import hookimpl

log = logging.getLogger(__name__)

LIFECYCLE = ("densepipe_train_start", "densepipe_before_step", "densepipe_after_step",
             "densepipe_before_evaluation", "densepipe_after_evaluation", "densepipe_on_checkpoint",
             "densepipe_train_end")


@dataclass
class TrainState:
    """What lifecycle hooks see. ``model`` is the plain model (not the DDP wrapper)."""

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    out_dir: Path
    step: int = 0
    rank: int = 0
    world_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: dict[str, Any] | None = None
    should_stop: bool = False
    """A hook may set this to end training after the current step (like early stopping)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def saved(self, name: str) -> Any:
        """What hook ``name`` put in ``payload["hooks"][name]`` of the resumed checkpoint."""
        if self.resumed_from is None:
            return None
        return (self.resumed_from.get("hooks") or {}).get(name)


class HookRunner:
    """Calls every lifecycle hook of the run's plugins, in pluggy's order."""

    def __init__(self, plugins: Iterable[tuple[str, Any]] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        for name, plugin in plugins:
            self.pm.register(plugin, name=name)
        self.pm.check_pending()

    @property
    def names(self) -> list[str]:
        return sorted(n for n, _ in self.pm.list_name_plugin())

    def call(self, hook: str, **kwargs: Any) -> None:
        getattr(self.pm.hook, hook)(**kwargs)


def entry_point_hooks(disabled: Iterable[str] = ()) -> list[tuple[str, Any]]:
    """``(name, module)`` of every ``densepipe.hooks`` entry point not in ``disabled``."""
    skip = set(disabled)
    found: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for ep in md.entry_points(group=hookspecs.HOOKS_ENTRY_POINT_GROUP):
        if ep.name in skip or ep.name in seen:
            continue
        seen.add(ep.name)
        try:
            found.append((ep.name, ep.load()))
        except Exception as e:  # noqa: BLE001 - any import failure is reported with its source
            detail = " ".join(str(e).split())
            raise PluginError(f"training hook {ep.name} = {ep.value}: import failed: "
                              f"{type(e).__name__}: {detail}") from None
    return found


def build_hooks(cfg: Config, extra: Iterable[tuple[str, Any]] = ()) -> HookRunner:
    """The run's hooks: built-ins enabled by ``cfg``, entry points, then ``extra``."""
    plugins: list[tuple[str, Any]] = []
    if cfg.train.ema.decay is not None:
        plugins.append(("ema", WeightEMA(decay=cfg.train.ema.decay, warmup=cfg.train.ema.warmup)))
    plugins += entry_point_hooks(cfg.train.disabled_hooks)
    plugins += list(extra)
    return HookRunner(plugins)


class WeightEMA:
    """Exponential moving average of the weights (``train.ema.decay``), a built-in hook.

    After every step ``avg = d * avg + (1 - d) * weights`` for floating-point parameters and
    buffers (integer buffers are copied), with ``d = min(decay, (1 + n) / (10 + n))`` after ``n``
    updates when ``warmup``. Evaluation during training runs on the average (swapped in, then
    back). Checkpoints carry it as ``payload["model_ema"]`` (used by ``evaluate`` and ``predict``)
    and its update count in ``payload["hooks"]["ema"]``; the raw weights stay in ``model`` for
    resuming."""

    def __init__(self, *, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.average: dict[str, torch.Tensor] = {}
        self._raw: dict[str, torch.Tensor] | None = None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @hookimpl
    def densepipe_train_start(self, state: TrainState) -> None:
        own = state.model.state_dict()
        saved = state.saved("ema")
        if saved is not None and state.resumed_from is not None and "model_ema" in state.resumed_from:
            self.updates = int(saved["updates"])
            self.average = {k: v.to(own[k].device).clone()
                            for k, v in state.resumed_from["model_ema"].items()}
        else:
            self.updates = 0
            self.average = {k: v.detach().clone() for k, v in own.items()}

    @hookimpl
    @torch.no_grad()
    def densepipe_after_step(self, state: TrainState) -> None:
        d = self.current_decay()
        for k, v in state.model.state_dict().items():
            avg = self.average[k]
            if avg.is_floating_point():
                avg.mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                avg.copy_(v)
        self.updates += 1

    @hookimpl
    def densepipe_before_evaluation(self, state: TrainState) -> None:
        self._raw = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        state.model.load_state_dict(self.average)

    @hookimpl
    def densepipe_after_evaluation(self, state: TrainState) -> None:
        if self._raw is not None:
            state.model.load_state_dict(self._raw)
            self._raw = None

    @hookimpl
    def densepipe_on_checkpoint(self, payload: dict[str, Any]) -> None:
        payload["model_ema"] = {k: v.detach().clone() for k, v in self.average.items()}
        payload.setdefault("hooks", {})["ema"] = {"updates": self.updates, "decay": self.decay}
