"""The same stages under DVC (`dvc repro` in a temporary git repo) and Prefect (test harness)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, tiny_overrides

TINY_DATA = {"data.synthetic.num_train": 6, "data.synthetic.num_val": 2,
             "data.synthetic.image_size": 64, "data.synthetic.workers": 1}


def _tiny_params(root: Path, data_root: str) -> dict:
    from pipeline.config import load_config

    over = tiny_overrides(Path(data_root), Path("runs"), None, train__steps=2)
    over = [o for o in over if not o.startswith(("train.out_dir", "evaluate.", "tracking."))]
    over += [f"{k}={v}" for k, v in TINY_DATA.items()]
    over += ["tracking.log_model=false", "evaluate.num_visualizations=1"]
    return load_config(None, over).model_dump(mode="json")


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_runs_three_stages_then_nothing_then_only_what_changed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("pipeline", "plugins", "dvc.yaml", ".dvcignore"):  # the deps dvc.yaml names
        src = REPO_ROOT / item
        if src.is_dir():
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / item)
    (repo / "params.yaml").write_text(yaml.safe_dump(_tiny_params(repo, "data/synthetic")))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [bin_dir + "/dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    _run(dvc + ["config", "core.analytics", "false"], repo, env)

    out = _run(dvc + ["repro"], repo, env)
    for stage in ("prepare", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = yaml.safe_load((repo / "metrics.json").read_text())
    assert 0.0 <= metrics["semantic/mIoU"] <= 1.0
    assert (repo / "dvc.lock").exists()

    again = _run(dvc + ["repro"], repo, env)
    assert "Running stage" not in again

    _run(dvc + ["repro", "--dry"], repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 0.001
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    changed = _run(dvc + ["repro"], repo, env)
    assert "Running stage 'train'" in changed and "Running stage 'evaluate'" in changed
    assert "Running stage 'prepare'" not in changed


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    if old is None:
        os.environ.pop("PREFECT_HOME", None)
    else:
        os.environ["PREFECT_HOME"] = old


@pytest.mark.slow
def test_prefect_pipeline_flow_runs_the_stages(prefect_harness, tmp_path: Path, mlflow_uri: str,
                                               monkeypatch) -> None:
    from flows.pipeline import pipeline_flow

    monkeypatch.chdir(tmp_path)
    params = _tiny_params(tmp_path, str(tmp_path / "data"))
    params["tracking"].update({"enabled": True, "uri": mlflow_uri})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # loader workers inside a flow: forked ones died at shutdown (exit code 1); forkserver ones live
    state = pipeline_flow(params=str(tmp_path / "params.yaml"),
                          overrides=["train.steps=2", "data.num_workers=1"], return_state=True)
    assert state.is_completed()
    metrics = state.result()
    assert set(metrics) >= {"semantic/mIoU", "semantic/pixel_acc"}
    assert (tmp_path / "runs" / "train" / "last.pt").exists()
    assert (tmp_path / "data" / "meta.json").exists()
