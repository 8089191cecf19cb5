"""The manual (mkdocs.yml, docs/): generated pages are current, the site builds with --strict, the
plugin example the manual shows installs through its entry point and trains."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO_ROOT, tiny_overrides
from tests.plugin_dist import EXAMPLE_PLUGIN, write_distribution

GENERATED = {
    "docs/configuration.md": "docs/gen_reference.py",
    "docs/benchmarks.md": "docs/gen_benchmarks.py",
}
"""Pages written by a script: never edited by hand (docs/bad-inputs.md, from docs/bad_inputs.py,
runs every bad input for real in about 3 minutes; its messages are pinned by their own tests)."""


def _script(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_{Path(path).stem}", REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize(("page", "script"), sorted(GENERATED.items()))
def test_generated_page_is_up_to_date(page: str, script: str) -> None:
    expected = _script(script).render()
    committed = (REPO_ROOT / page).read_text() if (REPO_ROOT / page).exists() else ""
    assert committed == expected, (
        f"{page} is stale (or edited by hand): regenerate it with `.venv/bin/python {script}`")


def test_every_config_key_is_described() -> None:
    """Every key has a description in the reference: its attribute docstring in
    pipeline/config.py, else an entry in gen_reference.UNDOCUMENTED; an entry there is dropped
    once the key has a docstring (or no longer exists)."""
    gen = _script("docs/gen_reference.py")
    keys = gen.all_keys()
    missing = [k for k, documented in keys.items() if not documented and k not in gen.UNDOCUMENTED]
    assert not missing, f"config keys with no docstring in pipeline/config.py: {missing}"
    stale = [k for k in gen.UNDOCUMENTED if keys.get(k, True)]
    assert not stale, f"drop from docs/gen_reference.py UNDOCUMENTED (documented or gone): {stale}"


@pytest.mark.slow
def test_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` (broken links and anchors, missing files or API references, pages
    left out of the nav all fail it), offline, into a temporary folder."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # no --quiet: it hides the warnings from --strict's count, and the build passes with them
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(REPO_ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "WARNING" not in proc.stderr, proc.stdout + proc.stderr
    api = (tmp_path / "site" / "api.html").read_text()
    for name in ("pipeline.task.Task.build_head", "pipeline.task.Task.losses",
                 "pipeline.hookspecs", "pipeline.data.formats", "pipeline.data.label_kinds"):
        assert f'id="{name}' in api, f"{name} missing from the rendered plugin API"
    plugins = (tmp_path / "site" / "plugins.html").read_text()
    assert "BrightnessTask" in plugins and "--8&lt;--" not in plugins  # the example, included


@pytest.mark.slow
def test_plugin_example_installs_and_trains(tiny_dataset: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The worked example of docs/plugins.md, installed as `pip install` leaves it (a
    distribution with its `densepipe.tasks` entry point), found by the default registry and
    trained for a few steps next to `semantic`."""
    import pipeline.registry
    from pipeline import stages
    from pipeline.config import load_config
    from pipeline.engine.checkpoint import load_checkpoint

    site = write_distribution(tmp_path / "site", dist="densepipe-brightness",
                              module="densepipe_brightness", source=EXAMPLE_PLUGIN.read_text(),
                              entry_name="brightness")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(pipeline.registry, "_default", None)  # rediscover the entry points
    monkeypatch.delitem(sys.modules, "densepipe_brightness", raising=False)
    try:
        entry = next(e for e in pipeline.registry.default_registry().entries()
                     if e.name == "brightness")
        assert entry.provider == "densepipe-brightness" and entry.status == "ok"
        over = tiny_overrides(tiny_dataset, tmp_path, None, train__steps=2, train__eval_every=2,
                              model__heads="{semantic: {conv_dims: 8}, brightness: {conv_dims: 8}}",
                              model__fpn_channels=16)
        summary = stages.train(load_config(None, [*over, "model.tasks=[semantic,brightness]"]))
        assert summary["step"] == 2
        metrics = load_checkpoint(Path(summary["last"]))["metrics"]
        assert "brightness/mae" in metrics and "semantic/mIoU" in metrics
    finally:
        sys.modules.pop("densepipe_brightness", None)


def test_bad_inputs_page_lists_every_case() -> None:
    """docs/bad-inputs.md holds one row per case of docs/bad_inputs.py, in order, with the command
    as the generator shows it (running the cases takes minutes: a case added, removed or changed
    without regenerating the page fails here; the messages themselves are pinned by the tests of
    each error)."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("densepipe_docs_bad_inputs",
                                                  root / "docs" / "bad_inputs.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.modules.pop(spec.name, None)  # type: ignore[union-attr]
    port = "http://127.0.0.1:PORT"
    expected = [f"| {c.what} | `densepipe {' '.join(c.args)}` |" for c in module.cases(port)]
    rows = [line for line in (root / "docs" / "bad-inputs.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| case |", "|---"))]
    got = [row[:len(e)] for row, e in zip(rows, expected, strict=False)]
    assert len(rows) == len(expected) and got == expected, (
        "docs/bad-inputs.md is stale: regenerate it with `.venv/bin/python docs/bad_inputs.py`")
