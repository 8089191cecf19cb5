"""The plugin contract: pluggy hook specifications of the ``densepipe`` project.

A task plugin is a module (or object) with ``@hookimpl`` functions, registered through the
``densepipe.tasks`` entry-point group, exactly like the built-in plugins::

    # my_package/my_task.py
    from pipeline.hookspecs import hookimpl
    from pipeline.task import Task

    class MyTask(Task):
        name = "my_task"
        ...

    @hookimpl
    def densepipe_register_tasks():
        return [MyTask()]

    # pyproject.toml
    [project.entry-points."densepipe.tasks"]
    my_task = "my_package.my_task"

Training lifecycle hooks (``densepipe_train_start`` ... ``densepipe_train_end``) add behaviour to
the training loop without editing it: an extra logger, an average of the weights. A module with
any of them registered under the ``densepipe.hooks`` entry-point group is called in every training
run (``train.disabled_hooks`` lists names to skip)::

    # my_package/my_logger.py
    from pipeline.hookspecs import hookimpl

    @hookimpl
    def densepipe_after_step(state, losses):
        if state.is_main and state.step % 100 == 0:
            print(state.step, losses["loss"])

    # pyproject.toml
    [project.entry-points."densepipe.hooks"]
    my_logger = "my_package.my_logger"

A task plugin that also wants lifecycle hooks lists its module under both groups: the task
registry only calls ``densepipe_register_tasks``, the training loop only the lifecycle hooks.

Every lifecycle hook gets ``state`` (``pipeline.engine.hooks.TrainState``: config, model,
optimizer, step, rank, output folder, the checkpoint resumed from). Hooks run on every rank under
DDP (``state.is_main`` is rank 0, the one that writes files) except ``densepipe_on_checkpoint``,
which runs on rank 0 only. Hooks are documented here, where they are declared (pytest's
convention).
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from pipeline.errors import error_line

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.engine.hooks import TrainState
    from pipeline.task import Task

PROJECT = "densepipe"
ENTRY_POINT_GROUP = "densepipe.tasks"
HOOKS_ENTRY_POINT_GROUP = "densepipe.hooks"

def unique_entry_points(group: str) -> list[md.EntryPoint]:
    """The entry points of ``group`` in discovery order, each ``name = value`` once (a
    distribution found twice on ``sys.path`` lists its entry points twice). Loads nothing."""
    seen: set[tuple[str, str]] = set()
    out = []
    for ep in md.entry_points(group=group):
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            out.append(ep)
    return out


@dataclass
class LoadedPlugins:
    """The task plugins of a process (``load_task_plugins``)."""

    pm: pluggy.PluginManager
    origin: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Plugin name -> (distribution providing it, ``"name = value"`` of its entry point)."""
    failed: list[tuple[str, str, str, str]] = field(default_factory=list)
    """``(name, provider, "name = value", one-line error)`` per plugin that failed to load."""

    def where(self, plugin_name: str) -> tuple[str, str]:
        """``(provider, entry point)`` of a registered plugin."""
        return self.origin.get(plugin_name, ("?", plugin_name))


def load_task_plugins(*, entry_points: bool = True, plugins: Iterable[Any] = ()) -> LoadedPlugins:
    """A plugin manager holding the ``densepipe.tasks`` entry points (unless ``entry_points`` is
    false) and then ``plugins`` given directly (tests, notebooks). A plugin that fails to import,
    or whose name is taken, is recorded in ``failed`` and the others load. Calls no hook: the
    task registry (``pipeline.registry``) and the label kinds (``pipeline.data.label_kinds``)
    each ask the hooks they own."""
    loaded = LoadedPlugins(pluggy.PluginManager(PROJECT))
    loaded.pm.add_hookspecs(sys.modules[__name__])
    if entry_points:
        for ep in unique_entry_points(ENTRY_POINT_GROUP):
            provider = ep.dist.name if ep.dist is not None else "?"
            where = f"{ep.name} = {ep.value}"
            try:
                plugin = ep.load()
            except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
                loaded.failed.append((ep.name, provider, where, f"import failed: {error_line(e)}"))
                continue
            if loaded.pm.is_registered(plugin):
                continue
            try:
                loaded.pm.register(plugin, name=ep.name)
            except ValueError as e:  # name already taken by another plugin
                loaded.failed.append((ep.name, provider, where, error_line(e)))
                continue
            loaded.origin[ep.name] = (provider, where)
    for i, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", None) or f"plugin-{i}"
        loaded.origin[name] = ("(registered directly)", name)
        loaded.pm.register(plugin, name=name)
    loaded.pm.check_pending()
    return loaded


hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def densepipe_register_tasks() -> list[Task]:
    """Return the tasks this plugin provides (``pipeline.task.Task`` instances).

    Called once per registry. Each task name must be unique across all plugins; a second task
    with a name already taken is reported as an error for that plugin and not used. Must not
    build models or read data: construction is cheap and side-effect free.
    """


@hookspec
def densepipe_register_label_kinds() -> list[Any]:
    """Return the dense label kinds this plugin provides (``pipeline.data.label_kinds.
    DenseLabelKind`` instances): per-pixel label maps a task of the plugin needs, read from
    ``<root>/<kind>/<split>/`` of the densepipe layout, transformed and batched like the built-in
    ``semantic``/``depth``/``normals`` (see ``pipeline.data.label_kinds`` for the contract).

    Collected by the task registry from the ``densepipe.tasks`` plugins (a kind comes with the
    task that needs it). Each name must be unique across the built-ins and all plugins; a second
    provider of a name is reported as an error naming both and its kind is not used."""


@hookspec
def densepipe_register_dataset_formats() -> list[Any]:
    """Return the dataset formats this plugin provides (``pipeline.data.formats.DatasetFormat``
    instances), registered through the ``densepipe.formats`` entry-point group; ``data.source``
    names one. Each name must be unique; construction is cheap and reads no data."""


# -- training lifecycle --------------------------------------------------------------------------
@hookspec
def densepipe_train_start(state: TrainState) -> None:
    """Once, after the model is built and any checkpoint is loaded (``state.resumed_from`` is that
    checkpoint's dict, or ``None``; a hook restores what it saved with ``state.saved(name)``)."""


@hookspec
def densepipe_before_step(state: TrainState, batch: dict[str, Any]) -> None:
    """Before the forward pass of step ``state.step + 1`` (``batch`` is this rank's share)."""


@hookspec
def densepipe_after_step(state: TrainState, losses: dict[str, float]) -> None:
    """After the optimizer step; ``state.step`` is the step just done. ``losses``: every
    ``<task>/<term>``, the weighted ``loss``, and ``weight/<task>`` (the weights in force)."""


@hookspec
def densepipe_before_evaluation(state: TrainState) -> None:
    """Before an evaluation pass during training (the model is put in eval mode after this)."""


@hookspec
def densepipe_after_evaluation(state: TrainState, metrics: dict[str, float]) -> None:
    """After an evaluation pass; ``metrics`` are reduced over all ranks (``task/metric``)."""


@hookspec
def densepipe_on_checkpoint(state: TrainState, payload: dict[str, Any], path: Path) -> None:
    """Rank 0, before ``payload`` is written to ``path`` (``last.pt`` or ``best.pt``). A hook
    keeps state across a resume by putting plain data under ``payload["hooks"][<its name>]``."""


@hookspec
def densepipe_train_end(state: TrainState) -> None:
    """Once, after the last step (or an early stop), before the final checkpoint is used."""
