"""Import the example plugin module from its file (it is not installed in the test venv)."""

from __future__ import annotations

import importlib.util
from functools import cache
from types import ModuleType

from tests.plugin_dist import EXAMPLE_PLUGIN


@cache
def brightness_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_densepipe_brightness", EXAMPLE_PLUGIN)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
