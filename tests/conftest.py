"""Shared fixtures: tiny datasets rendered once per session, isolated tool homes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = REPO_ROOT.parent / "shared" / "testdata" / "conformance"


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """``../shared/testdata/conformance``; tests that need it skip where it is absent."""
    if not CONFORMANCE.is_dir():
        pytest.skip(f"conformance vectors not found at {CONFORMANCE} (they live in ../shared)")
    return CONFORMANCE


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset (8 train, 4 val images at 64x64, seed 0) rendered once per session."""
    from pipeline.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic_dataset(root, num_train=8, num_val=4, image_size=64, seed=0, workers=1)
    return root
