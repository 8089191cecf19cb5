"""The MLflow model registry: a trained model registered, loaded back by ``models:/`` URI and
giving the checkpoint's outputs; evaluate and predict from the registry; runs nested per stage."""

from __future__ import annotations

import json
import subprocess
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


@pytest.fixture
def registered(tiny_dataset: Path, tmp_path: Path, mlflow_uri: str, monkeypatch):
    """A tiny model trained (tracking on, model logged), evaluated and registered."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path, mlflow_uri, train__steps=2,
                                           tracking__log_model=True))
    trained = stages.train(cfg)
    metrics = stages.evaluate(cfg)
    version = stages.register(cfg, model_uri=trained["model_uri"], metrics=metrics)
    return cfg, trained, metrics, version


def test_registered_model_loads_back_with_the_checkpoint_outputs(registered, tiny_dataset: Path) -> None:
    cfg, trained, metrics, version = registered
    assert version["name"] == "densepipe" and version["version"] == "1"
    assert version["model_uri"] == "models:/densepipe/1"

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    mv = client.get_model_version("densepipe", "1")
    assert mv.run_id == version["run_id"]
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
    assert len(evals) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in evals} == {trained["run_id"]}
    assert {r.data.params["evaluate.model"] for r in evals} == {trained["best"], "models:/densepipe/latest"}


def test_cli_evaluate_and_predict_from_the_registry(registered, tiny_dataset: Path, tmp_path: Path) -> None:
    cfg, *_ = registered
    sets = sum((["--set", o] for o in tiny_overrides(tiny_dataset, tmp_path, cfg.tracking.uri)), [])
    cli = [sys.executable, "-m", "pipeline.cli"]
    image = next((tiny_dataset / "images" / "val").iterdir())
    proc = subprocess.run([*cli, "predict", str(image), "--model", "models:/densepipe/1",
                           "--out", str(tmp_path / "pred"), *sets],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pred" / f"{image.stem}_semantic_vis.png").exists()

    proc = subprocess.run([*cli, "evaluate", "--model", "models:/densepipe/latest", *sets],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "semantic/mIoU" in json.loads((tmp_path / "metrics.json").read_text())

    proc = subprocess.run([*cli, "evaluate", "--model", "models:/nosuchmodel/3", *sets],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --model models:/nosuchmodel/3: cannot load it from sqlite:")
    assert len(proc.stderr.strip().splitlines()) == 1


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


def test_pipeline_parent_run_nests_stage_runs(tiny_dataset: Path, tmp_path: Path, mlflow_uri: str,
                                              monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path, mlflow_uri, train__steps=1))
    with parent_run(cfg.tracking, run_name="pipeline-test", params=cfg.flat()) as tracker:
        parent = tracker.run_id
        stages.train(cfg, parent_run_id=parent)
        metrics = stages.evaluate(cfg, parent_run_id=parent)
    with pytest.raises(RuntimeError, match="boom"), \
            parent_run(cfg.tracking, run_name="pipeline-broken", params={}) as broken:
        raise RuntimeError("boom")

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.metrics["semantic/mIoU"] == pytest.approx(metrics["semantic/mIoU"])
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["densepipe.stage"] for r in children) == ["evaluate", "train"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert client.get_run(broken.run_id).info.status == "FAILED"


def test_readme_documents_the_registry_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "densepipe evaluate --model models:/densepipe/latest" in readme
    assert "densepipe register" in readme
