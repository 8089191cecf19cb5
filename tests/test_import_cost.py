"""What each entry module may import: why the CLI and the stages import heavy libraries inside
functions. Every ``densepipe`` call imports ``pipeline.cli`` and the ``densepipe.commands``
modules, so they must not pull in torch, MLflow or Prefect (``densepipe --help``, ``config`` and
a bad ``--set`` answer in a fraction of a second); ``densepipe prepare`` / ``train`` without
tracking never import MLflow, and no library stage imports Prefect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "mlflow", "prefect", "torchvision", "pycocotools", "dvc")


def _imported(module: str) -> set[str]:
    code = (f"import sys, json, {module}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", ["pipeline.cli", "flows.cli", "plugins.rcnn.cli",
                                    "plugins.panoptic.cli", "plugins.semantic.cli",
                                    "pipeline.config", "pipeline.data.formats"])
def test_command_modules_import_nothing_heavy(module: str) -> None:
    assert _imported(module) == set()


def test_the_stages_import_neither_mlflow_nor_prefect() -> None:
    assert _imported("pipeline.stages") & {"mlflow", "prefect", "dvc"} == set()
