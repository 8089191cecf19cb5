"""The same stages under Prefect (test harness); DVC: tests/test_dvc.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_overrides

TINY_DATA = {"data.synthetic.num_train": 6, "data.synthetic.num_val": 2,
             "data.synthetic.image_size": 64, "data.synthetic.workers": 1}


def _tiny_params(root: Path, data_root: str) -> dict:
    from pipeline.config import load_config

    over = tiny_overrides(Path(data_root), Path("runs"), None, train__steps=2)
    over = [o for o in over if not o.startswith(("train.out_dir", "evaluate.", "tracking."))]
    over += [f"{k}={v}" for k, v in TINY_DATA.items()]
    over += ["tracking.log_model=false", "evaluate.num_visualizations=1"]
    return load_config(None, over).model_dump(mode="json")


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
