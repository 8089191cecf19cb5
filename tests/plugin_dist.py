"""Make a module discoverable as an installed distribution with a real entry point.

Writes ``<name>-<version>.dist-info`` (METADATA + entry_points.txt) next to the module in a folder
that goes on ``sys.path``: exactly what ``pip install`` leaves for ``importlib.metadata``."""

from __future__ import annotations

from pathlib import Path

EXAMPLE_PLUGIN = Path(__file__).parent / "example_plugin" / "densepipe_brightness.py"


def write_distribution(folder: Path, *, dist: str, module: str, source: str,
                       entry_name: str, group: str = "densepipe.tasks") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(source)
    info = folder / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry_name} = {module}\n")
    return folder
