"""The MLflow model registry: a trained model registered, loaded back by ``models:/`` URI and
giving the checkpoint's outputs; evaluate and predict from the registry; runs nested per stage."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import stages
from pipeline.config import load_config
from pipeline.engine.trainer import load_trained_model
from pipeline.errors import ConfigError, TrackingError
from pipeline.tracking import load_registered_model, parent_run
from tests.conftest import REPO_ROOT, tiny_overrides


@pytest.fixture(scope="module")
def registered(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path):
    """A tiny model trained (tracking on, model logged), evaluated and registered, once."""
    import shutil

    folder = tmp_path_factory.mktemp("registry")
    shutil.copy(_mlflow_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        cfg = load_config(None, tiny_overrides(tiny_dataset, folder, uri, train__steps=2,
                                               tracking__log_model=True))
        trained = stages.train(cfg)
        metrics = stages.evaluate(cfg)
        version = stages.register(cfg, model_uri=trained["model_uri"], metrics=metrics)
    finally:
        os.chdir(cwd)
    return cfg, trained, metrics, version, folder


def test_registered_model_loads_back_with_the_checkpoint_outputs(registered, tiny_dataset: Path) -> None:
    cfg, trained, metrics, version, _ = registered
    assert version["name"] == "densepipe" and version["version"] == "1"
    assert version["model_uri"] == "models:/densepipe/1"

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    mv = client.get_model_version("densepipe", "1")
    assert mv.run_id == trained["run_id"]  # the version links to the run that trained it
    assert float(mv.tags["metric.semantic/mIoU"]) == pytest.approx(metrics["semantic/mIoU"], rel=1e-5)
    assert "semantic/mIoU" in mv.description and mv.tags["tasks"] == "semantic"

    from_registry, meta = load_registered_model("models:/densepipe/latest", tracking_uri=cfg.tracking.uri)
    assert meta["step"] == 2 and meta["train_run_id"] == trained["run_id"]
    assert meta["config"]["model"]["tasks"] == ["semantic"]  # the config travels with the model
    from_checkpoint, _ = load_trained_model(None, trained["best"])
    image = np.array(Image.open(next((tiny_dataset / "images" / "val").iterdir())).convert("RGB"))
    batch = {"image": torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).contiguous(),
             "image_ids": [0], "has": {}}
    with torch.no_grad():
        a = from_registry(batch)["semantic"]
        b = from_checkpoint(batch)["semantic"]
    a = a if isinstance(a, torch.Tensor) else a["logits"]
    b = b if isinstance(b, torch.Tensor) else b["logits"]
    assert a.shape == b.shape and torch.equal(a, b)

    # evaluate from the registry gives the checkpoint's metrics, in a run nested under training
    again = stages.evaluate(cfg, model_uri="models:/densepipe/latest")
    assert again == pytest.approx(metrics)
    evals = client.search_runs([client.get_run(trained["run_id"]).info.experiment_id],
                               filter_string="tags.`densepipe.stage` = 'evaluate'")
    assert {r.data.tags["mlflow.parentRunId"] for r in evals} == {trained["run_id"]}
    assert {trained["best"], "models:/densepipe/latest"} <= {r.data.params["evaluate.model"] for r in evals}


def _densepipe(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``densepipe ARGS`` in this process (main()'s error handling included): (code, out, err)."""
    from pipeline.cli import main

    capsys.readouterr()
    argv, sys.argv = sys.argv, ["densepipe", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_evaluate_and_predict_from_the_registry(registered, tiny_dataset: Path, tmp_path: Path,
                                                    capsys, monkeypatch) -> None:
    cfg, *_ = registered  # a new working folder, the registry's store
    monkeypatch.chdir(tmp_path)
    sets = sum((["--set", o] for o in tiny_overrides(tiny_dataset, tmp_path, cfg.tracking.uri)), [])
    image = next((tiny_dataset / "images" / "val").iterdir())
    code, out, err = _densepipe("predict", str(image), "--model", "models:/densepipe/1",
                                "--out", str(tmp_path / "pred"), *sets, capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "pred" / f"{image.stem}_semantic_vis.png").exists()

    code, out, err = _densepipe("evaluate", "--model", "models:/densepipe/latest", *sets, capsys=capsys)
    assert code == 0, err
    assert "semantic/mIoU" in json.loads((tmp_path / "metrics.json").read_text())

    code, out, err = _densepipe("evaluate", "--model", "models:/nosuchmodel/3", *sets, capsys=capsys)
    assert code == 2
    assert err.startswith("error: --model models:/nosuchmodel/3: cannot load it from sqlite:")
    assert len(err.strip().splitlines()) == 1


def test_model_source_errors(tiny_dataset: Path, tmp_path: Path, mlflow_uri: str) -> None:
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path, mlflow_uri))
    with pytest.raises(ConfigError, match=r"--model models:/densepipe/1 and --checkpoint x.pt: give one"):
        stages.evaluate(cfg, "x.pt", model_uri="models:/densepipe/1")
    with pytest.raises(ConfigError, match=r"predict: give --checkpoint PATH or --model"):
        stages.predict(cfg, [], out_dir=tmp_path / "p")
    with pytest.raises(TrackingError, match=r"--model models:/densepipe/1: cannot load it"):
        load_registered_model("models:/densepipe/1", tracking_uri=mlflow_uri)
    off = load_config(None, tiny_overrides(tiny_dataset, tmp_path, None))
    with pytest.raises(ConfigError, match="register: tracking.enabled is false"):
        stages.register(off)


def test_parent_run_ends_failed_when_the_pipeline_raises(tmp_path: Path, mlflow_uri: str) -> None:
    """(Nesting under a finished parent run is checked end to end in test_prefect_flows.py.)"""
    from pipeline.config import TrackingConfig

    cfg = TrackingConfig(uri=mlflow_uri)
    with parent_run(cfg, run_name="pipeline-ok", params={"train.lr": 0.1}) as ok:
        pass
    with pytest.raises(RuntimeError, match="boom"), \
            parent_run(cfg, run_name="pipeline-broken", params={}) as broken:
        raise RuntimeError("boom")
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(ok.run_id).info.status == "FINISHED"
    assert client.get_run(ok.run_id).data.params == {"train.lr": "0.1"}
    assert client.get_run(broken.run_id).info.status == "FAILED"
    with parent_run(TrackingConfig(enabled=False), run_name="x", params={}) as off:
        assert off is None


def test_readme_documents_the_registry_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "densepipe evaluate --model models:/densepipe/latest" in readme
    assert "densepipe register" in readme
