"""MLflow pyfunc serving of a densepipe model: ``mlflow models serve`` and ``mlflow.pyfunc``.

Every model ``Tracker.log_model`` logs carries, next to its ``densepipe`` flavor (weights plus
config, ``pipeline.model_store``), the ``python_function`` flavor with ``loader_module``
``pipeline.serving``: no pickled ``PythonModel``, nothing is unpickled. MLflow calls
``_load_pyfunc`` with the model's ``weights.pt``, which is loaded only after its sha256 matches
the one the MLmodel's ``densepipe`` flavor records and, when MLflow resolves a tracking store
(``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``, or an existing ``./mlflow.db``), the one
that store records for the logged model (tag ``densepipe.weights_sha256``): whoever can write
only the artifact store cannot swap the weights. It is then read with ``torch.load(weights_only=True)``
and the model rebuilt from its config and dataset card through the task registry.

Request (``pipeline.model_store.pyfunc_signature``): a DataFrame with a string column
``image``, one image per row, each the base64 of an image *file* (PNG, JPEG, anything
``read_image`` reads; whitespace and a ``data:...;base64,`` prefix are allowed). Pixels are
read as ``densepipe predict`` reads them (``pipeline.data.reader.read_image``: upright, EXIF
orientation applied).

Answer: one dict per row, ``{task: {file: value}}`` for every task of the model. ``file`` is the
name of a file the task's ``save_prediction`` writes, without the ``<stem>_`` prefix
``densepipe predict`` gives it (``semantic.png``, ``depth.png``, ``panoptic.json``, ...); ``value``
is the parsed JSON for a ``.json`` file and the base64 of the file's bytes for any other file
(the same bytes ``densepipe predict`` writes; PNGs have the input's height and width). The
stem used is ``image``, so a JSON that names its image file says ``image_<task>.png``.

Following an alias (``model_config`` ``follow``: ``models:/<name>@<alias>``, ``refresh_s``): the
model served is the registered version the alias names, checked at most every ``refresh_s``
seconds as requests come in; when the alias moved, that version is loaded (verified, weights only,
``pipeline.tracking.load_registered_model``) and swapped in, so moving ``champion`` changes what is
served without redeploying. A version that fails to load is not served: the old one keeps
answering, with one warning line, and the next check retries.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read once, when mlflow is imported

import io

import mlflow
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE  # noqa: E402
from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
from PIL import Image

from pipeline import model_store  # noqa: E402
from pipeline.data.reader import read_image
from pipeline.errors import CheckpointError, ConfigError, DataError, TrackingError  # noqa: E402
from pipeline.model_store import (  # noqa: E402
    DEFAULT_REFRESH_S,
    DEVICE_KEY,
    FOLLOW_KEY,
    IMAGE_COLUMN,
    MODEL_CONFIG,
    REFRESH_KEY,
)
from pipeline.tracking import error_line, load_registered_model

STEM = "image"
"""The file stem ``save_prediction`` writes under; stripped (with ``_``) from the answer's keys."""
Answer = dict[str, dict[str, Any]]
"""One image's answer: ``{task: {file name: base64 string | parsed JSON}}``."""

_DATA_URL = re.compile(r"^data:[^,;]*(;[^,;]*)*;base64,", re.IGNORECASE)
_ALIAS_URI = re.compile(r"^models:/([^/@]+)@([^/@]+)$")
_clock: Callable[[], float] = time.monotonic
"""Seconds, for ``refresh_s`` (tests replace it)."""
logger = logging.getLogger(__name__)


class ImageInputError(DataError, MlflowException):
    """A row of the input is not a readable image: a ``DataError`` (one line naming the row and
    what was expected) that MLflow's scoring server answers as HTTP 400 with that line (an
    ``MlflowException`` with ``INVALID_PARAMETER_VALUE``) instead of a generic 500."""

    def __init__(self, path: object, problem: str) -> None:
        DataError.__init__(self, path, problem)
        MlflowException.__init__(self, str(self), error_code=INVALID_PARAMETER_VALUE)


# -- loading --------------------------------------------------------------------------------------
def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> DensepipePyfunc:
    """MLflow's entry point: ``path`` is the model's ``weights.pt`` (or its folder). Verifies the
    file (``verified_weights``), reads it with ``torch.load(weights_only=True)``, rebuilds the
    model in eval mode on ``model_config["device"]`` (``serving_device``; default ``auto``).
    With ``model_config["follow"]`` (``follow_uri``) the version the alias names now is served
    instead of ``path`` and followed every ``refresh_s`` seconds (``DensepipePyfunc.following``).

    Raises (one line naming the file, store or value): ``ConfigError`` for a bad device,
    ``follow`` or ``refresh_s``; ``CheckpointError`` for an MLmodel without densepipe's flavor, a
    missing weights file, weights whose sha256 differs from the MLmodel's, or a file torch refuses
    to read as weights; ``TrackingError`` when the tracking store's checksum differs or the store
    does not know the model (or, with ``follow``, the alias or its version)."""
    config = model_config or {}
    device = serving_device(config.get(DEVICE_KEY, "auto"))
    follow = follow_uri(config.get(FOLLOW_KEY))
    refresh_s = refresh_seconds(config.get(REFRESH_KEY, DEFAULT_REFRESH_S))
    if follow is not None:
        return DensepipePyfunc.following(follow, refresh_s=refresh_s, device=device)
    weights = verified_weights(path)
    source = str(weights)
    payload = model_store.read_weights(weights, source=source)
    model = model_store.build_from_payload(payload, source=source, device=device)
    return DensepipePyfunc(model)


def follow_uri(value: Any) -> str | None:
    """``model_config["follow"]``: ``None`` (or empty) not to follow, else a
    ``models:/<name>@<alias>`` URI (returned stripped). ``ConfigError`` otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or not _ALIAS_URI.match(value.strip()):
        raise ConfigError(f"model_config {FOLLOW_KEY}: {value!r} is not a registered model alias; "
                          "expected models:/<name>@<alias>, e.g. models:/densepipe@champion")
    return value.strip()


def refresh_seconds(value: Any) -> float:
    """``model_config["refresh_s"]``: a finite number of seconds >= 0 (a numeric string too).
    ``ConfigError`` otherwise."""
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"model_config {REFRESH_KEY}: {value!r} is not a number of seconds >= 0; "
                          f"expected e.g. {DEFAULT_REFRESH_S:g} (0: check the alias on every request)")
    return seconds


def serving_device(value: Any) -> torch.device:
    """``model_config["device"]``: ``auto`` (CUDA when available, else CPU) or a torch device
    name (``cpu``, ``cuda``, ``cuda:1``). ``ConfigError`` for another value or a CUDA device
    that is not there."""
    name = str(value).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model_config {DEVICE_KEY}: {value!r} is not a device; expected auto, "
                          "cpu or cuda[:index]") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or
                                  (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"model_config {DEVICE_KEY}: {name!r} requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s); use auto or cpu")
    return device


def verified_weights(path: str | Path) -> Path:
    """The weights file of the MLflow model at ``path`` (its ``weights.pt`` or its folder), after
    checking its sha256 against the MLmodel's ``densepipe`` flavor and, when MLflow resolves a
    tracking store (``_tracking_store``) and the MLmodel names a logged model (``model_id``),
    against that store's tag ``densepipe.weights_sha256`` (a store that does not know the model
    is refused too: the MLmodel sits in the same artifact store as the weights). Errors as
    ``_load_pyfunc``."""
    given = Path(path)
    folder = given if given.is_dir() else given.parent
    mlmodel_path = folder / MLMODEL_FILE_NAME
    try:
        mlmodel = Model.load(str(mlmodel_path))
    except (OSError, MlflowException, ValueError) as e:
        raise CheckpointError(f"{mlmodel_path}: cannot read the MLmodel file ({_first_line(e)})") from None
    flavor = mlmodel.flavors.get(model_store.FLAVOR)
    if not isinstance(flavor, dict) or flavor.get("format") != model_store.FORMAT or \
            flavor.get("weights") != model_store.WEIGHTS_FILE or not flavor.get("sha256"):
        raise CheckpointError(f"{mlmodel_path}: no densepipe flavor of format {model_store.FORMAT} "
                              f"with weights {model_store.WEIGHTS_FILE} and their sha256 (flavors: "
                              f"{', '.join(sorted(mlmodel.flavors)) or 'none'}); log the model "
                              "again with this densepipe")
    weights = folder / model_store.WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; the model folder holds no weights file")
    actual, recorded = model_store.sha256_file(weights), str(flavor["sha256"])
    if actual != recorded:
        raise CheckpointError(f"{weights}: sha256 {actual[:12]}... does not match {recorded[:12]}... "
                              f"recorded in its {MLMODEL_FILE_NAME}: the file was changed after "
                              "logging; refusing to load it")
    _check_tracking_store(weights, actual, mlmodel.model_id)
    return weights


def _check_tracking_store(weights: Path, actual: str, model_id: str | None) -> None:
    """``TrackingError`` unless the tracking store MLflow resolves (``_tracking_store``) records
    ``actual`` for the logged model ``model_id``; nothing to check without a store or a
    ``model_id``."""
    uri = _tracking_store()
    if not model_id or uri is None:
        return
    try:
        logged = mlflow.MlflowClient(tracking_uri=uri).get_logged_model(model_id)
    except MlflowException as e:
        raise TrackingError(f"{weights}: its logged model {model_id} is not in the tracking store "
                            f"{uri} ({_first_line(e)}); serve it with MLFLOW_TRACKING_URI set to "
                            "the store it was logged in") from None
    stored = logged.tags.get(model_store.SHA256_TAG)
    if stored != actual:
        what = f"sha256 {stored[:12]}..." if stored else f"no checksum (tag {model_store.SHA256_TAG})"
        raise TrackingError(f"{weights}: sha256 {actual[:12]}... does not match {what} recorded for "
                            f"logged model {model_id} in {uri}; refusing to load it")


def _tracking_store() -> str | None:
    """The tracking store MLflow resolves models from: the URI set (``MLFLOW_TRACKING_URI``,
    ``mlflow.set_tracking_uri``), else MLflow's default SQLite file when it exists (``None``
    when it does not: nothing is created by checking)."""
    uri = mlflow.get_tracking_uri()
    if is_tracking_uri_set():
        return uri
    if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).is_file():
        return uri
    return None


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "message", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- predicting -----------------------------------------------------------------------------------
class DensepipePyfunc:
    """The object ``_load_pyfunc`` returns; MLflow wraps it in a ``PyFuncModel``
    (``PyFuncModel.unwrap_python_model()`` returns it). Safe to call from several threads."""

    def __init__(self, model: Any, *, follow: str | None = None, refresh_s: float = DEFAULT_REFRESH_S,
                 served_version: str | None = None, tracking_uri: str | None = None,
                 device: torch.device | None = None) -> None:
        """``model`` (a ``MultiTaskModel`` in eval mode) answers; with ``follow`` it is version
        ``served_version`` of that alias in ``tracking_uri``, replaced on ``device`` when the
        alias moves (``following`` builds one)."""
        self.follow = follow
        """The ``models:/<name>@<alias>`` URI followed, or ``None``."""
        self.refresh_s = refresh_s
        self._model = model
        self._version = served_version
        self._tracking_uri = tracking_uri
        self._device = device
        self._lock = threading.Lock()  # guards the (model, version) pair
        self._checking = threading.Lock()  # one alias check at a time; others answer meanwhile
        self._checked_at = _clock()

    @classmethod
    def following(cls, follow: str, *, refresh_s: float, device: torch.device) -> DensepipePyfunc:
        """The version the alias ``follow`` names now, loaded from the tracking store MLflow
        resolves (``_tracking_store``) and followed from then on. ``TrackingError`` (one line
        naming ``follow``) without a store, for an alias the store does not know, or a version
        that does not load (``load_registered_model``'s errors)."""
        uri = _tracking_store()
        if uri is None:
            raise TrackingError(f"model_config {FOLLOW_KEY}: {follow} needs the tracking store that "
                                "holds the registry; set MLFLOW_TRACKING_URI (e.g. "
                                "sqlite:////abs/path/mlflow.db)")
        version = _alias_version(follow, uri)
        model = _load_version(follow, version, uri, device)
        logger.info("serving version %s of %s (%s)", version, follow, uri)
        return cls(model, follow=follow, refresh_s=refresh_s, served_version=version,
                   tracking_uri=uri, device=device)

    @property
    def model(self) -> Any:
        """The ``MultiTaskModel`` answering now, in eval mode."""
        with self._lock:
            return self._model

    @property
    def served_version(self) -> str | None:
        """The registered version answering now (``follow``); ``None`` when not following."""
        with self._lock:
            return self._version

    @property
    def python_model(self) -> DensepipePyfunc:
        """This object: what ``PyFuncModel.unwrap_python_model()`` returns."""
        return self

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[Answer]:
        """One answer per row of ``model_input`` (a DataFrame with column ``image``: base64 image
        files), in row order: ``{task: {file name: base64 string | parsed JSON}}`` (module
        docstring). Every row is decoded before the model runs; ``ImageInputError`` (one line
        naming the row) for the first that is not an image. With ``follow``, the alias is checked
        first when ``refresh_s`` has passed (``refresh``); the whole request is answered by one
        model. ``params`` are not used."""
        images = [decode_image(value, row=i) for i, value in enumerate(_image_column(model_input))]
        self.refresh()
        model = self.model
        return [_answer(model, rgb) for rgb in images]

    def predict_image(self, rgb: np.ndarray) -> Answer:
        """The answer for one ``HxWx3 uint8`` image (as ``predict``), computed as ``densepipe
        predict`` computes its files (``pipeline.stages.predict``)."""
        return _answer(self.model, rgb)

    def refresh(self) -> None:
        """With ``follow``, when ``refresh_s`` seconds passed since the last check (and no other
        thread is checking): look up the alias and, when it names another version, load that
        one and swap it in (requests already running finish on the old model). Never raises: a
        failed lookup or load logs one warning line naming ``follow`` and the error, the old
        model keeps serving and the next check retries."""
        if self.follow is None or not self._checking.acquire(blocking=False):
            return
        try:
            now = _clock()
            if now - self._checked_at < self.refresh_s:
                return
            self._checked_at = now
            served, version = self.served_version, None
            try:
                version = _alias_version(self.follow, self._tracking_uri)
                if version == served:
                    return
                model = _load_version(self.follow, version, self._tracking_uri, self._device)
            except Exception as e:  # noqa: BLE001 - whatever fails, the served model keeps serving
                what = error_line(e) if version is None else (
                    f"model_config {FOLLOW_KEY} {self.follow}: cannot serve version {version} "
                    f"({error_line(e)})")
                logger.warning("%s; still serving version %s, retrying in %g s", what, served, self.refresh_s)
                return
            with self._lock:
                self._model, self._version = model, version
            logger.info("serving version %s of %s (was version %s)", version, self.follow, served)
        finally:
            self._checking.release()


def _alias_version(follow: str, tracking_uri: str | None) -> str:
    """The version (a string) the alias ``follow`` names in the registry of ``tracking_uri``.
    ``TrackingError`` (one line) when the store does not answer or knows no such alias."""
    name, alias = _name_and_alias(follow)
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        raise TrackingError(f"model_config {FOLLOW_KEY}: {follow}: cannot resolve the alias in "
                            f"{tracking_uri} ({_first_line(e)})") from None


def _load_version(follow: str, version: str, tracking_uri: str | None, device: torch.device | None) -> Any:
    """Version ``version`` of the model ``follow`` names, verified and read as weights only
    (``pipeline.tracking.load_registered_model``), on ``device``."""
    name, _ = _name_and_alias(follow)
    model, _ = load_registered_model(f"models:/{name}/{version}", tracking_uri=str(tracking_uri),
                                     device=device)
    return model


def _name_and_alias(follow: str) -> tuple[str, str]:
    """``(name, alias)`` of a ``models:/<name>@<alias>`` URI (``ConfigError`` otherwise)."""
    match = _ALIAS_URI.match(follow_uri(follow) or "")
    if match is None:
        raise ConfigError(f"model_config {FOLLOW_KEY}: {follow!r} is not set")
    return match.group(1), match.group(2)


def _answer(model: Any, rgb: np.ndarray) -> Answer:
    """``model``'s answer for one ``HxWx3 uint8`` image (``DensepipePyfunc.predict_image``)."""
    rgb = np.require(rgb, requirements=["C", "W"])
    batch = {"image": torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).contiguous(),
             "image_ids": [0], "has": {}}
    with torch.inference_mode():
        predictions = model.predict(batch)
    answer: Answer = {}
    with tempfile.TemporaryDirectory(prefix="densepipe-serve-") as tmp:
        folder = Path(tmp)
        for name, task in model.tasks.items():
            files = task.save_prediction(predictions[name][0], str(folder / STEM), card=model.card,
                                         options=model.options[name])
            answer[name] = {Path(f).relative_to(folder).as_posix().removeprefix(f"{STEM}_"):
                            _encode(Path(f)) for f in files}
    return answer


def _image_column(model_input: Any) -> list[Any]:
    """The values of column ``image`` of a DataFrame (or a mapping of columns)."""
    if hasattr(model_input, "columns"):
        columns = list(model_input.columns)
    else:
        columns = list(model_input) if isinstance(model_input, dict) else []
    if IMAGE_COLUMN not in columns:
        raise ImageInputError("model input", f"no column {IMAGE_COLUMN!r} (columns: "
                              f"{', '.join(map(str, columns)) or 'none'}); expected a DataFrame "
                              f"with a column {IMAGE_COLUMN!r} of base64-encoded image files")
    return list(model_input[IMAGE_COLUMN])


def decode_image(value: Any, *, row: int) -> np.ndarray:
    """``value`` (the base64 of an image file, or its raw bytes) as ``HxWx3 uint8``, read by
    ``pipeline.data.reader.read_image``. ``ImageInputError`` naming ``row`` otherwise."""
    where = f"column {IMAGE_COLUMN}, row {row}"
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str):
        text = _DATA_URL.sub("", "".join(value.split()), count=1)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageInputError(where, f"not base64 ({e}); expected the base64 of an image file "
                                         "(PNG, JPEG)") from None
    else:
        raise ImageInputError(where, f"a {type(value).__name__} ({str(value)[:40]!r}); expected a "
                                     "string: the base64 of an image file (PNG, JPEG)")
    if not data:
        raise ImageInputError(where, "empty; expected the base64 of an image file (PNG, JPEG)")
    with tempfile.TemporaryDirectory(prefix="densepipe-serve-") as tmp:
        path = Path(tmp) / "input"
        path.write_bytes(data)
        try:
            return read_image(path)
        except DataError as e:
            raise ImageInputError(where, e.problem) from None


def _encode(path: Path) -> Any:
    """A ``.json`` file parsed; any other file as the base64 (ASCII string) of its bytes."""
    if path.suffix.lower() == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return base64.b64encode(path.read_bytes()).decode("ascii")


def decode_png(value: str) -> np.ndarray:
    """A PNG answer value as an array, as stored: ``HxW`` (uint8 label map, uint16 millimetres)
    or ``HxWx3`` uint8 (normals, colours). For clients and tests."""
    with Image.open(io.BytesIO(base64.b64decode(value))) as img:
        return np.asarray(img)


__all__ = ["MODEL_CONFIG", "DensepipePyfunc", "ImageInputError", "_load_pyfunc", "decode_image",
           "decode_png", "follow_uri", "refresh_seconds", "verified_weights"]
