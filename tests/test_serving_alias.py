"""Serving follows the ``champion`` alias: a pyfunc loaded with ``model_config`` ``follow``
(``models:/<name>@<alias>``) answers with the version the alias names, picks up a moved alias at
most every ``refresh_s`` seconds without being reloaded, keeps the old version when the new one
fails verification, and ``densepipe predict --model models:/<name>@champion`` predicts with the
version the alias names."""

from __future__ import annotations

import base64
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import torch

from pipeline import model_store, serving, stages
from pipeline.config import load_config
from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError, TrackingError
from pipeline.model import build_model
from pipeline.predict import MANIFEST
from pipeline.serving import MODEL_CONFIG, _load_pyfunc
from pipeline.tracking import Tracker, store_uri
from tests.conftest import tiny_overrides

NAME = "densepipe"
CHAMPION = f"models:/{NAME}@champion"
VERSIONS = ("1", "2", "3")
CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def registry(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path) -> dict:
    """A SQLite store in a temp folder holding versions 1, 2 and 3 of ``densepipe``: tiny
    semantic + depth models of different random weights (seeds 1, 2, 3), trained for ``step``
    1, 2 and 3; ``folders``: each version's artifact folder; ``expected``: each version's answer
    to ``frame`` (one PNG), from ``mlflow.pyfunc.load_model("models:/densepipe/<v>")``."""
    folder = tmp_path_factory.mktemp("serving-alias")
    shutil.copy(_mlflow_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cfg = load_config(None, tiny_overrides(tiny_dataset, folder, uri, model__tasks="[semantic,depth]"))
    card = DatasetCard.load(tiny_dataset / "meta.json")
    tracker = Tracker(cfg.tracking)
    run_id = tracker.start(run_name="train")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    folders = {}
    for seed, version in enumerate(VERSIONS, start=1):
        torch.manual_seed(seed)
        payload = model_store.model_payload(build_model(cfg, card), config=cfg.model_dump(mode="json"),
                                            step=seed, train_run_id=run_id)
        model_uri = tracker.log_model(payload, metadata={"step": seed, "tasks": payload["tasks"]})
        assert tracker.register_model(model_uri, name=NAME, source_run_id=run_id, tags={},
                                      description="") == version
        location = client.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
        folders[version] = Path(location.removeprefix("file://"))
    tracker.finish()

    image = sorted((tiny_dataset / "images" / "val").iterdir())[0]
    frame = pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode("ascii")]})
    with store_uri(uri):
        expected = {v: mlflow.pyfunc.load_model(f"models:/{NAME}/{v}", model_config=CPU).predict(frame)
                    for v in VERSIONS}
    assert len({json.dumps(a, sort_keys=True) for a in expected.values()}) == 3  # tells versions apart
    return {"cfg": cfg, "uri": uri, "client": client, "folders": folders, "frame": frame,
            "image": image, "expected": expected}


def _champion(registry: dict, version: str) -> None:
    registry["client"].set_registered_model_alias(NAME, "champion", version)


def _follow(registry: dict, *, passed: str = "1", refresh_s: float = 0) -> serving.DensepipePyfunc:
    """What MLflow does for ``-m models:/densepipe@champion``: ``_load_pyfunc`` with the weights
    of the version it resolved (``passed``) and ``follow``, with the store as the environment
    sets it."""
    config = {**CPU, "follow": CHAMPION, "refresh_s": refresh_s}
    with store_uri(registry["uri"]):
        return _load_pyfunc(str(registry["folders"][passed] / model_store.WEIGHTS_FILE), config)


def test_the_flavor_declares_every_key_the_loader_reads(registry: dict) -> None:
    """MLflow drops model_config keys the MLmodel does not declare (with only a warning)."""
    with store_uri(registry["uri"]):
        info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    declared = info.flavors["python_function"].get("config", {})  # mlflow.models.model.MODEL_CONFIG
    assert set(MODEL_CONFIG) <= set(declared), (
        f"the python_function flavor declares {sorted(declared)}: pipeline.model_store."
        f"add_pyfunc_flavor must declare {sorted(MODEL_CONFIG)} (pipeline.serving.MODEL_CONFIG)")


def test_mlflow_served_model_follows_the_alias_without_reloading(registry: dict) -> None:
    _champion(registry, "1")
    config = {**CPU, "follow": CHAMPION, "refresh_s": 0}
    with store_uri(registry["uri"]):  # as MLFLOW_TRACKING_URI sets it for `mlflow models serve`
        pyfunc = mlflow.pyfunc.load_model(CHAMPION, model_config=config)
    served = pyfunc.unwrap_python_model()
    assert served.served_version == "1"
    assert pyfunc.predict(registry["frame"]) == registry["expected"]["1"]

    _champion(registry, "2")  # promotion: the next request answers as version 2
    assert pyfunc.predict(registry["frame"]) == registry["expected"]["2"]
    assert served.served_version == "2"


def test_without_follow_the_loaded_weights_serve_for_good(registry: dict) -> None:
    _champion(registry, "1")
    pyfunc = _load_pyfunc(str(registry["folders"]["1"] / model_store.WEIGHTS_FILE), CPU)
    _champion(registry, "2")
    assert pyfunc.served_version is None and pyfunc.follow is None
    assert pyfunc.predict(registry["frame"]) == registry["expected"]["1"]


def test_the_alias_is_checked_at_load_and_at_most_every_refresh_s(registry: dict, monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(serving, "_clock", lambda: now[0])
    _champion(registry, "2")
    pyfunc = _follow(registry, passed="1", refresh_s=60)  # MLflow passed v1; the alias names v2 now
    assert pyfunc.served_version == "2"
    assert pyfunc.predict(registry["frame"]) == registry["expected"]["2"]

    _champion(registry, "1")
    now[0] += 59.9
    assert pyfunc.predict(registry["frame"]) == registry["expected"]["2"]  # not checked yet
    assert pyfunc.served_version == "2"
    now[0] += 0.1
    assert pyfunc.predict(registry["frame"]) == registry["expected"]["1"]
    assert pyfunc.served_version == "1"


def test_a_version_failing_verification_is_not_served_and_is_retried(
        registry: dict, caplog: pytest.LogCaptureFixture) -> None:
    _champion(registry, "1")
    pyfunc = _follow(registry)
    weights = registry["folders"]["3"] / model_store.WEIGHTS_FILE
    original = weights.read_bytes()
    payload = torch.load(weights, weights_only=True)
    first = next(iter(payload["model"]))
    payload["model"][first] = payload["model"][first] + 1  # valid weights, not the registered ones
    torch.save(payload, weights)
    try:
        _champion(registry, "3")
        with caplog.at_level(logging.WARNING, logger="pipeline.serving"):
            assert pyfunc.predict(registry["frame"]) == registry["expected"]["1"]
        assert pyfunc.served_version == "1"
        (record,) = [r for r in caplog.records if r.name == "pipeline.serving"]
        line = record.getMessage()
        assert record.levelno == logging.WARNING and len(line.splitlines()) == 1
        assert line.startswith(f"model_config follow {CHAMPION}: cannot serve version 3 (--model "
                               f"models:/{NAME}/3: weights.pt does not match the checksum"), line
        assert line.endswith("still serving version 1, retrying in 0 s")

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.serving"):
            assert pyfunc.predict(registry["frame"]) == registry["expected"]["1"]
        assert len([r for r in caplog.records if r.name == "pipeline.serving"]) == 1  # retried
    finally:
        weights.write_bytes(original)
    assert pyfunc.predict(registry["frame"]) == registry["expected"]["3"]  # the next check loads it
    assert pyfunc.served_version == "3"


def test_an_alias_the_store_does_not_know_is_refused_at_load(registry: dict) -> None:
    with store_uri(registry["uri"]), pytest.raises(TrackingError) as refused:
        _load_pyfunc(str(registry["folders"]["1"] / model_store.WEIGHTS_FILE),
                     {**CPU, "follow": f"models:/{NAME}@nobody"})
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"model_config follow: models:/{NAME}@nobody: cannot resolve the alias in "
                              f"{registry['uri']} ("), message


@pytest.mark.parametrize(("key", "value"), [
    ("follow", "densepipe@champion"), ("follow", f"models:/{NAME}/2"), ("follow", f"models:/{NAME}@"),
    ("follow", "runs:/abc/model"), ("follow", 3),
    ("refresh_s", -1), ("refresh_s", "soon"), ("refresh_s", float("nan")), ("refresh_s", True),
])
def test_a_bad_follow_or_refresh_s_is_one_config_error_line(tmp_path: Path, key: str, value: Any) -> None:
    config = {**CPU, "follow": CHAMPION, key: value}
    with pytest.raises(ConfigError) as refused:  # checked before anything is read
        _load_pyfunc(str(tmp_path / "missing" / model_store.WEIGHTS_FILE), config)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"model_config {key}: {value!r} is not "), message


def test_predict_with_the_alias_uses_the_version_it_names(registry: dict, tmp_path: Path) -> None:
    _champion(registry, "2")
    out = tmp_path / "out"
    stages.predict(registry["cfg"], [registry["image"]], model_uri=CHAMPION, out_dir=out, vis=False,
                   progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model"] == CHAMPION and manifest["step"] == 2  # version 2 was trained to step 2
    depth = out / "depth" / f"{registry['image'].stem}_depth.png"
    assert depth.read_bytes() == base64.b64decode(registry["expected"]["2"][0]["depth"]["depth.png"])


def test_an_alias_that_cannot_be_resolved_keeps_the_served_version(
        registry: dict, caplog: pytest.LogCaptureFixture) -> None:
    _champion(registry, "2")
    pyfunc = _follow(registry)
    registry["client"].delete_registered_model_alias(NAME, "champion")
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.serving"):
            assert pyfunc.predict(registry["frame"]) == registry["expected"]["2"]
    finally:
        _champion(registry, "2")
    (record,) = [r for r in caplog.records if r.name == "pipeline.serving"]
    line = record.getMessage()
    assert len(line.splitlines()) == 1
    assert line.startswith(f"model_config follow: {CHAMPION}: cannot resolve the alias in "
                           f"{registry['uri']} ("), line
    assert line.endswith("still serving version 2, retrying in 0 s")
    assert pyfunc.served_version == "2"
