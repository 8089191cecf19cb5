"""Task registry: built-in and third-party task plugins through one pluggy PluginManager.

Plugins are discovered through the ``densepipe.tasks`` entry-point group (the built-ins register
there too). A plugin that fails to import, or whose hook raises, is recorded with its name, entry
point and the error, and every other task stays usable.

The same plugins may register dense label kinds (``densepipe_register_label_kinds``, see
``pipeline.data.label_kinds``); the registry reports a failing one next to the tasks
(``densepipe tasks``), and the data code collects the process's kinds itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline import hookspecs
from pipeline.data.label_kinds import plugin_label_kinds
from pipeline.errors import ConfigError, PluginError, error_line
from pipeline.task import VIEWS, Task


@dataclass
class TaskEntry:
    """One row of ``densepipe tasks``."""

    name: str
    provider: str  # distribution that provides it
    entry_point: str  # "name = module" of the entry point
    task: Task | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        return "ok" if self.error is None else f"error: {self.error}"

    def describe(self) -> dict[str, Any]:
        base = self.task.describe() if self.task else {
            "name": self.name, "requires": [], "depends_on": [], "shares_with": [], "input_view": None,
        }
        return {**base, "provider": self.provider, "entry_point": self.entry_point,
                "status": self.status}


class TaskRegistry:
    """All tasks known to this process.

    ``plugins`` adds plugin modules/objects directly (tests, notebooks); ``entry_points=False``
    skips discovery."""

    def __init__(self, *, entry_points: bool = True, plugins: Iterable[Any] = ()) -> None:
        loaded = hookspecs.load_task_plugins(entry_points=entry_points, plugins=plugins)
        self.pm = loaded.pm
        self._loaded = loaded
        self._entries: dict[str, TaskEntry] = {}
        self._failed: list[TaskEntry] = [TaskEntry(name, provider, where, error=error)
                                         for name, provider, where, error in loaded.failed]
        self._collect_tasks()
        self.dense_label_kinds, failures = plugin_label_kinds(loaded)
        """Every usable dense label kind by name: built-ins first, then the plugins' in
        registration order (``pipeline.data.label_kinds``)."""
        self._failed += [TaskEntry(name, provider, where, error=error)
                         for name, provider, where, error in failures]

    def _collect_tasks(self) -> None:
        for impl in self.pm.hook.densepipe_register_tasks.get_hookimpls():
            provider, where = self._loaded.where(impl.plugin_name)
            try:
                tasks = list(impl.function() or [])
                for task in tasks:
                    _check_task(task)
            except Exception as e:  # noqa: BLE001 - reported per plugin
                self._failed.append(TaskEntry(impl.plugin_name, provider, where,
                                              error=f"densepipe_register_tasks failed: {error_line(e)}"))
                continue
            for task in tasks:
                if task.name in self._entries:
                    other = self._entries[task.name]
                    self._failed.append(TaskEntry(task.name, provider, where,
                                                  error=f"task name already provided by {other.entry_point}"))
                    continue
                self._entries[task.name] = TaskEntry(task.name, provider, where, task=task)

    # -- queries --------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[TaskEntry]:
        """Usable tasks, then failed plugins (for ``densepipe tasks``)."""
        return [self._entries[n] for n in self.names] + list(self._failed)

    def get(self, name: str) -> Task:
        if name in self._entries:
            return self._entries[name].task  # type: ignore[return-value]
        for failed in self._failed:
            if failed.name == name:
                raise PluginError(f"task {name!r} ({failed.entry_point}) is unusable: {failed.error}")
        raise ConfigError(f"unknown task {name!r}; allowed: {', '.join(self.names) or 'none'}")

    def resolve(self, names: Iterable[str]) -> list[Task]:
        """The tasks named plus everything they depend on, dependencies first (stable order); a
        task also comes after the enabled tasks it ``shares_with``."""
        names = list(names)
        enabled = {t.name for t in self._visit(names, lambda t: t.depends_on)}
        return self._visit(names, lambda t: (*t.depends_on,
                                             *(s for s in t.shares_with if s in enabled)))

    def _visit(self, names: list[str], before: Any) -> list[Task]:
        order: list[Task] = []
        state: dict[str, str] = {}

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise PluginError(f"task dependency cycle: {' -> '.join((*chain, name))}")
            state[name] = "visiting"
            task = self.get(name)
            for dep in before(task):
                visit(dep, (*chain, name))
            state[name] = "done"
            order.append(task)

        for name in names:
            visit(name, ())
        return order


def _check_task(task: object) -> None:
    if not isinstance(task, Task):
        raise PluginError(f"{task!r} is not a pipeline.task.Task")
    if not getattr(task, "name", None):
        raise PluginError(f"{type(task).__name__} has no name")
    if task.input_view not in VIEWS:
        raise PluginError(f"task {task.name!r}: input_view {task.input_view!r} not in {VIEWS}")


_default: TaskRegistry | None = None


def default_registry() -> TaskRegistry:
    """The process-wide registry (entry points loaded once)."""
    global _default
    if _default is None:
        _default = TaskRegistry()
    return _default
