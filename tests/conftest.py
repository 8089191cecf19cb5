"""Shared fixtures: tiny datasets rendered once per session, isolated tool homes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:  # `make test`: one core per worker
    import torch

    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = REPO_ROOT.parent / "shared" / "testdata" / "conformance"


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line a refused ``densepipe`` command printed, after checking that it
    exited with code 2 and printed nothing else on stderr."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """``run_main(*args, cwd=...)``: ``densepipe ARGS`` through ``pipeline.cli.main()`` in this
    process (the code the ``densepipe`` script runs, without an interpreter start per call),
    as a ``CompletedProcess`` with its exit code, stdout and stderr."""
    from pipeline.cli import main

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["densepipe", *args])
        code: int = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["densepipe", *args], code, out.out, out.err)

    return run


@contextmanager
def http_server(status: int, body: bytes) -> Iterator[str]:
    """A loopback HTTP server answering every GET with ``status`` and ``body``; yields its URL."""
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


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


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created once (table creation costs seconds)."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_uri(tmp_path: Path, _mlflow_template: Path) -> str:
    """A fresh SQLite MLflow store in this test's temp folder (absolute URI)."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copy(_mlflow_template, db)
    return f"sqlite:///{db}"


def tiny_overrides(data_root: Path, out: Path, uri: str | None, **extra: object) -> list[str]:
    """--set overrides for a small, fast run on the tiny dataset."""
    values = {
        "data.root": str(data_root), "data.image_size": 64, "data.num_workers": 0,
        "model.fpn_channels": 32, "model.heads": "{semantic: {conv_dims: 32}}",
        "train.steps": 4, "train.batch_size": 2, "train.warmup_steps": 1, "train.eval_every": 0,
        "train.checkpoint_every": 2, "train.device": "cpu", "train.progress": False,
        "train.out_dir": str(out / "train"), "evaluate.out_dir": str(out / "eval"),
        "evaluate.metrics_file": str(out / "metrics.json"), "evaluate.batch_size": 4,
        "evaluate.num_visualizations": 2,
        "tracking.enabled": uri is not None, "tracking.uri": uri or "null",
        "tracking.log_model": False,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


TINY_DATA = {"data.synthetic.num_train": 6, "data.synthetic.num_val": 2,
             "data.synthetic.image_size": 64, "data.synthetic.workers": 1}
"""Overrides for a synthetic dataset small enough to render inside an end-to-end test."""


def write_tiny_params(folder: Path, *, mlflow_uri: str | None) -> Path:
    """A params.yaml for a 2-step run on a tiny synthetic dataset rendered into ``folder/data``."""
    import yaml

    from pipeline.config import load_config

    over = tiny_overrides(folder / "data", folder / "runs", mlflow_uri, train__steps=2)
    over += [f"{k}={v}" for k, v in TINY_DATA.items()] + ["evaluate.num_visualizations=1"]
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(load_config(None, over).model_dump(mode="json")))
    return path


def plant_marker(path: str) -> None:
    """What a malicious pickle calls when unpickled: leaves a marker file (the tests that check
    nothing is unpickled look for it)."""
    Path(path).write_text("code ran")


class PlantedPickle:
    """Unpickles into ``plant_marker(path)``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (plant_marker, (self.path,))


def descendants(pid: int) -> list:
    """The live descendants of process ``pid`` (psutil processes; none when it is gone)."""
    import psutil  # a dvc dependency

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def still_alive(procs: list, timeout: float = 10.0) -> list[str]:
    """Wait up to ``timeout`` s for ``procs`` to exit; kill those left and describe them (pid, command)."""
    import psutil  # a dvc dependency

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    left = []
    for p in alive:
        try:
            left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return left
