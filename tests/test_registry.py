"""Task registry: built-ins and third-party plugins through real entry points; broken plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, PluginError
from pipeline.hookspecs import hookimpl
from pipeline.registry import TaskRegistry
from tests.plugin_dist import EXAMPLE_PLUGIN, write_distribution

BROKEN = "raise RuntimeError('boom: missing CUDA extension')\n"


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site folder holding the example plugin and a broken one, both with entry points."""
    site = tmp_path / "site"
    write_distribution(site, dist="densepipe-brightness", module="densepipe_brightness",
                       source=EXAMPLE_PLUGIN.read_text(), entry_name="brightness")
    write_distribution(site / "b", dist="densepipe-broken", module="densepipe_broken",
                       source=BROKEN, entry_name="broken")
    monkeypatch.syspath_prepend(str(site / "b"))
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("densepipe_brightness", None)
    sys.modules.pop("densepipe_broken", None)


def test_builtin_semantic_registers_through_the_entry_point() -> None:
    reg = TaskRegistry()
    entry = next(e for e in reg.entries() if e.name == "semantic")
    assert entry.provider == "densepipe"
    assert entry.entry_point == "semantic = plugins.semantic.task"
    assert entry.status == "ok"
    task = reg.get("semantic")
    assert task.requires == ("semantic",) and task.input_view == "rgb"


def test_third_party_plugin_and_broken_plugin(plugin_path: Path) -> None:
    reg = TaskRegistry()
    assert {"semantic", "brightness"} <= set(reg.names)
    rows = {e.name: e for e in reg.entries()}
    assert rows["brightness"].provider == "densepipe-brightness"
    assert rows["brightness"].status == "ok"
    broken = rows["broken"]
    assert broken.provider == "densepipe-broken"
    assert broken.entry_point == "broken = densepipe_broken"
    assert "import failed: RuntimeError: boom: missing CUDA extension" in broken.status
    # the other tasks stay usable, the broken one is named on use
    assert [t.name for t in reg.resolve(["brightness", "semantic"])] == ["brightness", "semantic"]
    with pytest.raises(PluginError, match=r"task 'broken' \(broken = densepipe_broken\) is unusable"):
        reg.get("broken")


def test_unknown_task_lists_allowed() -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'sematic'; allowed: .*semantic"):
        TaskRegistry().resolve(["sematic"])


def _task_class(name: str, deps: tuple[str, ...]):
    from tests.example_plugin_loader import brightness_module

    base = brightness_module().BrightnessTask
    return type(f"T_{name}", (base,), {"name": name, "depends_on": deps})


def test_depends_on_is_resolved_dependencies_first_and_cycles_named() -> None:
    a, b, c = _task_class("a", ()), _task_class("b", ("a",)), _task_class("c", ("b", "a"))

    class Plugin:
        @hookimpl
        def densepipe_register_tasks(self):
            return [c(), b(), a()]

    reg = TaskRegistry(entry_points=False, plugins=[Plugin()])
    assert [t.name for t in reg.resolve(["c"])] == ["a", "b", "c"]

    x, y = _task_class("x", ("y",)), _task_class("y", ("x",))

    class Cyclic:
        @hookimpl
        def densepipe_register_tasks(self):
            return [x(), y()]

    with pytest.raises(PluginError, match="cycle: x -> y -> x"):
        TaskRegistry(entry_points=False, plugins=[Cyclic()]).resolve(["x"])


def test_shares_with_orders_but_does_not_enable() -> None:
    a = _task_class("a", ())
    s = type("T_s", (_task_class("s", ()),), {"shares_with": ("a",)})

    class Plugin:
        @hookimpl
        def densepipe_register_tasks(self):
            return [s(), a()]

    reg = TaskRegistry(entry_points=False, plugins=[Plugin()])
    assert [t.name for t in reg.resolve(["s"])] == ["s"]  # sharing does not enable a
    assert [t.name for t in reg.resolve(["s", "a"])] == ["a", "s"]  # but runs after it


def test_hook_that_raises_and_duplicate_names_are_reported() -> None:
    class Raises:
        @hookimpl
        def densepipe_register_tasks(self):
            raise ValueError("bad options")

    class Duplicate:
        @hookimpl
        def densepipe_register_tasks(self):
            return [_task_class("semantic", ())()]

    reg = TaskRegistry(plugins=[Raises(), Duplicate()])
    statuses = [e.status for e in reg.entries() if e.error]
    assert any("densepipe_register_tasks failed: ValueError: bad options" in s for s in statuses)
    assert any("task name already provided by semantic = plugins.semantic.task" in s for s in statuses)
    assert reg.get("semantic").__class__.__module__ == "plugins.semantic.task"


@pytest.mark.slow
def test_cli_tasks_json_lists_third_party_and_broken(plugin_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(plugin_path / "b")])}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "tasks", "--json"],
                          capture_output=True, text=True, env=env, check=True)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["semantic"]["status"] == "ok"
    assert rows["brightness"]["provider"] == "densepipe-brightness"
    assert rows["brightness"]["requires"] == [] and rows["brightness"]["input_view"] == "rgb"
    assert rows["broken"]["status"].startswith("error: import failed")
