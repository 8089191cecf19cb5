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

Hooks are documented here, where they are declared (pytest's convention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from pipeline.task import Task

PROJECT = "densepipe"
ENTRY_POINT_GROUP = "densepipe.tasks"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def densepipe_register_tasks() -> list[Task]:
    """Return the tasks this plugin provides (``pipeline.task.Task`` instances).

    Called once per registry. Each task name must be unique across all plugins; a second task
    with a name already taken is reported as an error for that plugin and not used. Must not
    build models or read data: construction is cheap and side-effect free.
    """
