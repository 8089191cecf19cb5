"""The dataset-format registry (``data.source``): discovery, errors, ``densepipe formats``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import stages
from pipeline.config import load_config
from pipeline.data.formats import DatasetFormat, FormatRegistry, default_formats
from pipeline.errors import ConfigError
from pipeline.hookspecs import hookimpl

PUBLISHED = {"folder", "synthetic", "coco", "cityscapes", "ade20k", "voc", "nyuv2"}


def test_every_built_in_format_is_found_through_its_entry_point() -> None:
    registry = default_formats()
    assert PUBLISHED <= set(registry.names) and registry.failed == {}


def test_unknown_source_and_bad_option_are_one_config_line(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.source=kitty", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^data.source: unknown dataset format 'kitty'; "
                                          r"allowed: ade20k, cityscapes, coco, "):
        stages.check_config(cfg)
    cfg = load_config(None, ["data.source=cityscapes", "data.options={depht: true}"])
    with pytest.raises(ConfigError, match=r"^data.options.depht: Extra inputs are not permitted; "
                                          r"options of data.source cityscapes: depth$"):
        stages.check_config(cfg)


def test_a_plugin_taking_a_used_name_or_failing_is_reported() -> None:
    class Clash(DatasetFormat):
        name = "folder"

        def open(self, root, split, *, label_kinds=None, options):  # type: ignore[no-untyped-def]
            raise AssertionError("never used")

    class Plugin:
        @hookimpl
        def densepipe_register_dataset_formats(self) -> list[DatasetFormat]:
            return [Clash()]

    class Broken:
        @hookimpl
        def densepipe_register_dataset_formats(self) -> list[object]:
            return ["not a format"]

    registry = FormatRegistry(plugins=[Plugin(), Broken()])
    assert type(registry.get("folder")).__module__ == "plugins.formats.builtin"
    assert "already taken" in registry.failed["folder"]
    assert any("is not a named pipeline.data.formats.DatasetFormat" in e for e in registry.failed.values())
    alone = FormatRegistry(entry_points=False, plugins=[Broken()])
    assert list(alone.failed.values()) == ["PluginError: 'not a format' is not a named "
                                           "pipeline.data.formats.DatasetFormat"]
    with pytest.raises(ConfigError, match="unknown dataset format 'folder'; allowed: none"):
        alone.get("folder")


def test_densepipe_formats_lists_names_and_options() -> None:
    from pipeline.cli import app

    result = CliRunner().invoke(app, ["formats", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert PUBLISHED <= set(rows)
    assert rows["cityscapes"]["options"] == ["depth"] and rows["cityscapes"]["status"] == "ok"
    assert rows["folder"]["options"] == ["depth_encoding", "semantic_values"]
