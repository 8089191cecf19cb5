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
from tests.conftest import REPO_ROOT, PlantedPickle, http_server, plant_marker, tiny_overrides


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
    assert (tmp_path / "pred" / "vis" / "semantic" / f"{image.stem}.png").exists()

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


# -- what the registry refuses to load ----------------------------------------------------------
class _PickledModule(torch.nn.Module):
    """A module that, pickled as a whole (the old ``mlflow.pytorch`` pickle format), unpickles
    into ``plant_marker(path)``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = str(path)
        self.linear = torch.nn.Linear(1, 1)

    def __reduce__(self) -> tuple:
        return (plant_marker, (self.path,))


@pytest.fixture
def logged(registered, mlflow_uri: str) -> dict:
    """The trained checkpoint logged and registered (``densepipe`` version 1, alias
    ``champion``) in a fresh store of this test, whose artifacts the test may tamper with."""
    from pipeline.tracking import Tracker

    cfg, trained, *_ = registered
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": mlflow_uri})})
    tracker = Tracker(cfg.tracking)
    run_id = tracker.start(run_name="train")
    model_uri = stages.log_trained_model(cfg, tracker, Path(trained["best"]))
    tracker.register_model(model_uri, name="densepipe", source_run_id=run_id, tags={}, description="")
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    client.set_registered_model_alias("densepipe", "champion", "1")
    model_id = model_uri.removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location
    weights = Path(location.removeprefix("file://")) / "weights.pt"
    assert weights.is_file()
    return {"cfg": cfg, "uri": mlflow_uri, "model_uri": model_uri, "model_id": model_id,
            "run_id": run_id, "weights": weights, "client": client, "best": trained["best"]}


def _one_line(message: str) -> str:
    assert len(message.strip().splitlines()) == 1, message
    return message


def test_registry_models_are_weights_with_a_checksum_in_the_tracking_store(logged) -> None:
    """Stored as weights plus config (read with weights_only=True), the sha256 recorded on the
    logged model and the version, every kind of URI loads."""
    from pipeline import model_store
    from pipeline.tracking import store_uri

    client, sha = logged["client"], model_store.sha256_file(logged["weights"])
    payload = torch.load(logged["weights"], weights_only=True)
    assert payload["format"] == "densepipe-model/1" and payload["tasks"] == ["semantic"]
    assert payload["config"]["model"]["tasks"] == ["semantic"] and payload["card"]["classes"]
    assert client.get_logged_model(logged["model_id"]).tags["densepipe.weights_sha256"] == sha
    assert client.get_model_version("densepipe", "1").tags["densepipe.weights_sha256"] == sha
    with store_uri(logged["uri"]):
        info = mlflow.models.get_model_info(logged["model_uri"])
    assert info.flavors["densepipe"]["sha256"] == sha and "pytorch" not in info.flavors
    for uri in ("models:/densepipe/1", "models:/densepipe/latest", "models:/densepipe@champion",
                logged["model_uri"], f"runs:/{logged['run_id']}/model"):
        model, meta = load_registered_model(uri, tracking_uri=logged["uri"])
        assert meta["step"] == 2 and meta["train_run_id"] == logged["run_id"], uri
        assert list(model.tasks) == ["semantic"]


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_run(logged, tiny_dataset: Path,
                                                                  tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    import hashlib
    import pickle

    from pipeline.errors import CheckpointError

    marker = tmp_path / "pwned"
    logged["weights"].write_bytes(pickle.dumps({"model": PlantedPickle(marker)}, protocol=2))
    monkeypatch.chdir(tmp_path)
    sets = sum((["--set", o] for o in tiny_overrides(tiny_dataset, tmp_path, logged["uri"])), [])
    image = next((tiny_dataset / "images" / "val").iterdir())
    code, out, err = _densepipe("predict", str(image), "--model", "models:/densepipe/1",
                                "--out", str(tmp_path / "pred"), *sets, capsys=capsys)
    assert code == 2
    assert _one_line(err).startswith("error: --model models:/densepipe/1: weights.pt does not match "
                                     "the checksum recorded in sqlite:")
    assert not marker.exists()

    # whoever can also rewrite the tracking store's checksum still gets no code run
    forged = hashlib.sha256(logged["weights"].read_bytes()).hexdigest()
    logged["client"].set_logged_model_tags(logged["model_id"], {"densepipe.weights_sha256": forged})
    logged["client"].set_model_version_tag("densepipe", "1", "densepipe.weights_sha256", forged)
    with pytest.raises(CheckpointError) as refused:
        load_registered_model("models:/densepipe/1", tracking_uri=logged["uri"])
    message = _one_line(str(refused.value))
    assert "refuses to load: the file is a pickled object" in message
    assert "Unsupported global" in message and "plant_marker" in message, message
    assert not marker.exists()


def test_weights_that_differ_from_the_recorded_checksum_are_refused(logged) -> None:
    payload = torch.load(logged["weights"], weights_only=True)
    first = next(iter(payload["model"]))
    payload["model"][first] = payload["model"][first] + 1  # still valid weights, not the logged ones
    torch.save(payload, logged["weights"])
    for uri in ("models:/densepipe/latest", "models:/densepipe@champion", logged["model_uri"],
                f"runs:/{logged['run_id']}/model"):
        with pytest.raises(TrackingError) as refused:
            load_registered_model(uri, tracking_uri=logged["uri"])
        assert _one_line(str(refused.value)).startswith(
            f"--model {uri}: weights.pt does not match the checksum recorded in {logged['uri']}")


def test_a_model_logged_as_a_pickle_by_an_older_densepipe_is_refused_unread(
        tmp_path: Path, mlflow_uri: str, tiny_dataset: Path, capsys, monkeypatch) -> None:
    import logging

    from pipeline.config import TrackingConfig
    from pipeline.tracking import Tracker, store_uri

    marker = tmp_path / "pwned"
    tracker = Tracker(TrackingConfig(uri=mlflow_uri))
    run_id = tracker.start(run_name="train")
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with store_uri(mlflow_uri), mlflow.start_run(run_id=run_id):  # how densepipe logged models
        info = mlflow.pytorch.log_model(_PickledModule(marker), name="model",
                                        serialization_format="pickle", pip_requirements=["torch"])
    marker.unlink(missing_ok=True)
    tracker.register_model(info.model_uri, name="densepipe", source_run_id=run_id, tags={},
                           description="")
    with pytest.raises(TrackingError) as refused:
        load_registered_model("models:/densepipe/1", tracking_uri=mlflow_uri)
    message = _one_line(str(refused.value))
    assert message.startswith("--model models:/densepipe/1: not in densepipe's weights format")
    assert "densepipe register --checkpoint" in message
    monkeypatch.chdir(tmp_path)
    sets = sum((["--set", o] for o in tiny_overrides(tiny_dataset, tmp_path, mlflow_uri)), [])
    code, out, err = _densepipe("evaluate", "--model", "models:/densepipe/latest", *sets, capsys=capsys)
    assert code == 2 and "not in densepipe's weights format" in _one_line(err)
    assert not marker.exists()


# -- a tracking URI that is not MLflow ------------------------------------------------------------
def test_a_tracking_uri_at_a_server_that_is_not_mlflow_fails_before_training(
        tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    with http_server(404, b"<html>Not Found</html>") as uri:
        monkeypatch.chdir(tmp_path)
        sets = sum((["--set", o] for o in tiny_overrides(tiny_dataset, tmp_path, uri)), [])
        code, out, err = _densepipe("train", *sets, capsys=capsys)
    assert code == 2
    assert _one_line(err).startswith(f"error: tracking.uri {uri}: answers HTTP 404 but is not an "
                                     "MLflow tracking server (GET /health: HTTP 404; GET /api/2.0/")
    assert not (tmp_path / "train").exists()  # nothing trained, nothing written
