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
COMMAND_MODULES = ("pipeline.cli", "flows.cli", "plugins.rcnn.cli", "plugins.panoptic.cli",
                   "plugins.semantic.cli", "pipeline.config", "pipeline.data.formats")
UNTRACKED_MODULES = ("pipeline.stages", "pipeline.tracking", "pipeline.engine.trainer",
                     "pipeline.predict", "pipeline.trained_model")
"""What ``prepare``, an untracked ``train`` / ``evaluate`` and ``predict --checkpoint`` import:
MLflow is loaded by the tracker when tracking is on, Prefect and DVC by their own commands."""
LIGHT: dict[str, tuple[str, ...]] = {**dict.fromkeys(COMMAND_MODULES, HEAVY),
                                     **dict.fromkeys(UNTRACKED_MODULES, ("mlflow", "prefect", "dvc"))}
"""Module -> the libraries importing it may not load (``tests/test_layering.py`` keeps imports
inside functions where moving them would break this)."""


def _imported(*modules: str) -> set[str]:
    """The ``HEAVY`` libraries a fresh interpreter has loaded after importing ``modules``."""
    code = (f"import sys, json, {', '.join(modules)}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_command_modules_import_nothing_heavy(module: str) -> None:
    """Each command module loads none of ``HEAVY`` (one interpreter each: they are light)."""
    assert _imported(module) & set(LIGHT[module]) == set()


def test_untracked_stage_modules_import_neither_mlflow_nor_prefect_nor_dvc() -> None:
    """Together (one interpreter: each loads torch, and none may load these, so neither may
    their union)."""
    assert _imported(*UNTRACKED_MODULES) & {"mlflow", "prefect", "dvc"} == set()
