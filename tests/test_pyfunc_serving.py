"""A registered densepipe model is an MLflow pyfunc model: ``mlflow.pyfunc.load_model`` and the
real ``mlflow models serve`` answer an image with every task's outputs, the same bytes
``densepipe predict`` writes; changed weights and rows that are not images are refused in one line."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline import model_store, stages
from pipeline.config import load_config
from pipeline.data.card import DatasetCard
from pipeline.errors import CheckpointError, DataError, TrackingError
from pipeline.model import build_model
from pipeline.predict import MANIFEST
from pipeline.serving import ImageInputError, _load_pyfunc, decode_png
from pipeline.tracking import Tracker, store_uri
from tests.conftest import PlantedPickle, tiny_overrides

TASKS = ["semantic", "instance", "keypoints", "panoptic", "depth", "normals", "colorization"]
FILES = {"semantic": {"semantic.png"}, "instance": {"instance.json"}, "keypoints": {"keypoints.json"},
         "panoptic": {"panoptic.png", "panoptic.json"}, "depth": {"depth.png"},
         "normals": {"normals.png"}, "colorization": {"colorization.png"}}
"""What each task answers: the files ``densepipe predict`` writes, less ``<stem>_`` and the drawings."""
CPU = {"device": "cpu"}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encoded(array: np.ndarray, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path) -> dict:
    """A model of all seven tasks (random init: the serving path does not care what it learnt),
    logged by ``Tracker.log_model`` and registered as ``densepipe`` version 1 in a SQLite store
    with its artifacts in the same temp folder; two inputs: a 48x64 PNG and a 64x40 JPEG whose
    EXIF says rotate 90 degrees, so it is read upright at 40x64 (each saved as ``image.*`` in its
    own folder for ``predict``)."""
    import shutil

    folder = tmp_path_factory.mktemp("serving")
    shutil.copy(_mlflow_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cfg = load_config(None, tiny_overrides(tiny_dataset, folder, uri, model__tasks=f"[{','.join(TASKS)}]",
                                           model__heads="{}"))
    torch.manual_seed(0)
    model = build_model(cfg, DatasetCard.load(tiny_dataset / "meta.json"))
    tracker = Tracker(cfg.tracking)
    run_id = tracker.start(run_name="train")
    payload = model_store.model_payload(model, config=cfg.model_dump(mode="json"), step=0,
                                        train_run_id=run_id)
    model_uri = tracker.log_model(payload, metadata={"step": 0, "tasks": TASKS})
    tracker.register_model(model_uri, name="densepipe", source_run_id=run_id, tags={}, description="")
    tracker.finish()

    rgb = np.asarray(Image.open(sorted((tiny_dataset / "images" / "val").iterdir())[0]).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display; read_image applies it (64x40 -> 40x64)
    inputs = {"png": _encoded(np.ascontiguousarray(rgb[:48]), "PNG"),
              "jpeg": _encoded(np.ascontiguousarray(rgb[:, :40]), "JPEG", exif=exif.tobytes())}
    paths = {}
    for kind, data in inputs.items():
        (folder / kind).mkdir()
        paths[kind] = folder / kind / f"image.{'png' if kind == 'png' else 'jpg'}"
        paths[kind].write_bytes(data)
    return {"cfg": cfg, "uri": uri, "model_uri": model_uri, "run_id": run_id, "payload": payload,
            "inputs": inputs, "paths": paths, "sizes": {"png": (48, 64), "jpeg": (40, 64)},
            "card": model.card}


@pytest.fixture(scope="module")
def pyfunc(served: dict) -> Any:
    """``mlflow.pyfunc.load_model("models:/densepipe/1")`` on the CPU."""
    with store_uri(served["uri"]):
        return mlflow.pyfunc.load_model("models:/densepipe/1", model_config=CPU)


@pytest.fixture(scope="module")
def answers(served: dict, pyfunc: Any) -> list[dict]:
    """The pyfunc's answers for the PNG and the JPEG, one DataFrame of two rows."""
    frame = pd.DataFrame({"image": [_b64(served["inputs"]["png"]), _b64(served["inputs"]["jpeg"])]})
    return pyfunc.predict(frame)


def test_every_logged_model_is_a_pyfunc_of_weights_with_a_signature(served: dict) -> None:
    with store_uri(served["uri"]):
        info = mlflow.models.get_model_info("models:/densepipe/1")
    assert set(info.flavors) == {"densepipe", "python_function"}
    pyfunc_flavor = info.flavors["python_function"]
    assert pyfunc_flavor["loader_module"] == "pipeline.serving" and pyfunc_flavor["data"] == "weights.pt"
    assert "python_model" not in pyfunc_flavor  # no cloudpickled PythonModel
    assert info.signature.inputs.to_dict() == [{"type": "string", "name": "image", "required": True}]
    (output,) = info.signature.outputs.to_dict()
    assert output["type"] == "object" and sorted(output["properties"]) == sorted(TASKS)
    client = mlflow.MlflowClient(tracking_uri=served["uri"])
    folder = Path(client.get_logged_model(served["model_uri"].removeprefix("models:/"))
                  .artifact_location.removeprefix("file://"))
    assert {p.name for p in folder.iterdir()} == {"MLmodel", "weights.pt", "requirements.txt",
                                                  "python_env.yaml"}  # no pickle beside the weights
    assert yaml.safe_load((folder / "python_env.yaml").read_text())["dependencies"] == ["-r requirements.txt"]


def test_pyfunc_answers_every_task_as_densepipe_predict_writes_it(served: dict, answers: list[dict],
                                                                 tmp_path: Path) -> None:
    assert len(answers) == 2
    card = served["card"]
    for kind, answer in zip(("png", "jpeg"), answers, strict=True):
        height, width = served["sizes"][kind]
        assert list(answer) == TASKS
        assert {task: set(files) for task, files in answer.items()} == FILES
        assert decode_png(answer["semantic"]["semantic.png"]).shape == (height, width)
        assert decode_png(answer["semantic"]["semantic.png"]).dtype == np.uint8
        depth_mm = decode_png(answer["depth"]["depth.png"])
        assert depth_mm.shape == (height, width) and depth_mm.dtype == np.uint16 and depth_mm.min() >= 1
        for task in ("normals", "colorization", "panoptic"):
            image = decode_png(answer[task][f"{task}.png"])
            assert image.shape == (height, width, 3) and image.dtype == np.uint8, task
        panoptic = answer["panoptic"]["panoptic.json"]
        assert panoptic["file_name"] == "image_panoptic.png" and isinstance(panoptic["segments_info"], list)
        category_ids = {c.id for c in card.classes}
        for task in ("instance", "keypoints"):
            for result in answer[task][f"{task}.json"]:  # COCO results
                assert result["image_id"] == 0 and result["category_id"] in category_ids
                assert len(result["bbox"]) == 4 and 0.0 <= result["score"] <= 1.0
        assert all("segmentation" in r for r in answer["instance"]["instance.json"])
        assert all(len(r["keypoints"]) % 3 == 0 for r in answer["keypoints"]["keypoints.json"])

        # densepipe predict on the same file writes exactly these bytes (and its drawings)
        out = tmp_path / kind
        written = stages.predict(served["cfg"], [served["paths"][kind]], model_uri="models:/densepipe/1",
                                 out_dir=out)
        files = {Path(p).relative_to(out).as_posix() for p in written}
        assert {f for f in files if not f.startswith("vis/")} == \
            {f"{task}/image_{name}" for task, names in FILES.items() for name in names} | {MANIFEST}
        for task, values in answer.items():
            for name, value in values.items():
                on_disk = out / task / f"image_{name}"
                if name.endswith(".json"):
                    assert value == json.loads(on_disk.read_text()), name
                else:
                    assert base64.b64decode(value) == on_disk.read_bytes(), name


def test_base64_with_line_breaks_and_a_data_url_prefix_read_the_same(served: dict, pyfunc: Any,
                                                                    answers: list[dict]) -> None:
    text = _b64(served["inputs"]["png"])
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))  # what `base64 FILE` prints
    frame = pd.DataFrame({"image": [wrapped, f"data:image/png;base64,{text}"]})
    assert pyfunc.predict(frame) == [answers[0], answers[0]]


@pytest.mark.parametrize(("value", "problem"), [
    ("not base64!", "not base64 ("),
    (_b64(b"hello, not an image"), "not an image file PIL can read (unknown or corrupt header; "
                                   "expected PNG, JPEG"),
    ("", "empty; expected the base64 of an image file (PNG, JPEG)"),
], ids=["not-base64", "not-an-image", "empty"])
def test_a_row_that_is_not_an_image_is_refused_in_one_line(served: dict, pyfunc: Any, value: str,
                                                           problem: str) -> None:
    frame = pd.DataFrame({"image": [_b64(served["inputs"]["png"]), value]})
    with pytest.raises(ImageInputError) as refused:
        pyfunc.predict(frame)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"column image, row 1: {problem}"), message
    assert isinstance(refused.value, DataError)  # densepipe's one-line input error, and MLflow's 400


def test_a_truncated_image_is_refused_in_one_line(served: dict, pyfunc: Any) -> None:
    data = served["inputs"]["png"]
    with pytest.raises(ImageInputError) as refused:
        pyfunc.predict(pd.DataFrame({"image": [_b64(data[: len(data) // 2])]}))
    assert len(str(refused.value).splitlines()) == 1
    assert str(refused.value).startswith("column image, row 0: truncated or corrupt image (PNG: ")


def _logged_copy(served: dict) -> tuple[str, Path]:
    """The registered weights logged again as a new model of the same run (its own artifact
    folder, which the test may change): ``(models:/m-... URI, folder)``."""
    tracker = Tracker(served["cfg"].tracking)
    tracker.run_id = served["run_id"]
    model_uri = tracker.log_model(served["payload"])
    location = mlflow.MlflowClient(tracking_uri=served["uri"]).get_logged_model(
        model_uri.removeprefix("models:/")).artifact_location
    return model_uri, Path(location.removeprefix("file://"))


def _set_mlmodel_sha256(folder: Path, sha256: str) -> None:
    """What whoever can write the artifact store can also do: record the new hash in MLmodel."""
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"]["densepipe"]["sha256"] = sha256
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))




def test_changed_weights_in_the_artifact_store_are_refused_in_one_line(served: dict, tmp_path: Path,
                                                                      mlflow_uri: str) -> None:
    model_uri, folder = _logged_copy(served)
    weights = folder / "weights.pt"
    payload = torch.load(weights, weights_only=True)
    first = next(iter(payload["model"]))
    payload["model"][first] = payload["model"][first] + 1  # valid weights, not the logged ones
    torch.save(payload, weights)

    with pytest.raises(CheckpointError) as refused:  # MLflow's own entry point
        _load_pyfunc(str(weights), CPU)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{weights}: sha256 ") and "does not match" in message
    assert message.endswith("recorded in its MLmodel: the file was changed after logging; "
                            "refusing to load it")
    with store_uri(served["uri"]), pytest.raises(CheckpointError, match="does not match"):
        mlflow.pyfunc.load_model(model_uri)

    # the MLmodel rewritten to match: the tracking store's checksum still refuses it
    _set_mlmodel_sha256(folder, model_store.sha256_file(weights))
    with store_uri(served["uri"]), pytest.raises(TrackingError) as refused:
        mlflow.pyfunc.load_model(model_uri, model_config=CPU)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{weights}: sha256 ")
    assert f"recorded for logged model {model_uri.removeprefix('models:/')} in {served['uri']}" in message
    with store_uri(mlflow_uri), pytest.raises(TrackingError, match="is not in the tracking store"):
        _load_pyfunc(str(weights), CPU)  # a store that does not know the model: refused too


def test_with_no_tracking_uri_set_the_default_store_checks_the_weights(served: dict,
                                                                        monkeypatch) -> None:
    """`mlflow models serve` run beside the project's mlflow.db, MLFLOW_TRACKING_URI unset."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    model_uri, folder = _logged_copy(served)
    weights = folder / "weights.pt"
    payload = torch.load(weights, weights_only=True)
    payload["step"] = 7  # other bytes
    torch.save(payload, weights)
    _set_mlmodel_sha256(folder, model_store.sha256_file(weights))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.chdir(Path(served["uri"].removeprefix("sqlite:///")).parent)
    with pytest.raises(TrackingError, match=r"recorded for logged model m-\w+ in sqlite:///"):
        _load_pyfunc(str(weights), CPU)


def test_a_pickle_in_place_of_the_weights_is_never_run(served: dict, tmp_path: Path) -> None:
    """Even with both checksums forged, the pickle is refused by torch.load(weights_only=True)."""
    model_uri, folder = _logged_copy(served)
    marker = tmp_path / "pwned"
    weights = folder / "weights.pt"
    weights.write_bytes(pickle.dumps({"model": PlantedPickle(marker)}, protocol=2))
    forged = model_store.sha256_file(weights)
    _set_mlmodel_sha256(folder, forged)
    mlflow.MlflowClient(tracking_uri=served["uri"]).set_logged_model_tags(
        model_uri.removeprefix("models:/"), {model_store.SHA256_TAG: forged})
    with store_uri(served["uri"]), pytest.raises(CheckpointError) as refused:
        mlflow.pyfunc.load_model(model_uri, model_config=CPU)
    assert len(str(refused.value).splitlines()) == 1
    assert "refuses to load: the file is a pickled object" in str(refused.value)
    assert not marker.exists()


# -- the real `mlflow models serve` -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:  # noqa: S310 - loopback
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_for_ping(proc: subprocess.Popen, port: int, log: Path, *, timeout_s: float) -> float:
    """Seconds until ``GET /ping`` answers 200; fails with the server's log if it exits or is late."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:  # noqa: S310
                if answer.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"mlflow models serve: no /ping within {timeout_s:g} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_an_image_over_http(served: dict, answers: list[dict],
                                                        tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": served["uri"], "SERVING_MODEL_CONFIG": json.dumps(CPU),
           "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # uvicorn
           # as many threads as this process: CPU kernels round differently with another count
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve",
                                 "-m", "models:/densepipe/1", "--env-manager", "local",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_ping(proc, port, log, timeout_s=120)
        png, jpeg = _b64(served["inputs"]["png"]), _b64(served["inputs"]["jpeg"])
        expected = json.loads(json.dumps(answers))  # what JSON carries of the in-process answers
        status, body = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[png], [jpeg]]}})
        assert status == 200 and body == {"predictions": expected}
        status, body = _post(port, {"dataframe_records": [{"image": jpeg}]})
        assert status == 200 and body == {"predictions": expected[1:]}
        assert decode_png(body["predictions"][0]["semantic"]["semantic.png"]).shape == served["sizes"]["jpeg"]

        status, body = _post(port, {"dataframe_records": [{"image": png}, {"image": _b64(b"GIF? no")}]})
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert body["message"].splitlines()[-1].startswith(
            "Error: column image, row 1: not an image file PIL can read"), body["message"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
