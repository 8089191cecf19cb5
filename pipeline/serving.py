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
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
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
from pipeline.model_store import DEVICE_KEY, IMAGE_COLUMN  # noqa: E402

STEM = "image"
"""The file stem ``save_prediction`` writes under; stripped (with ``_``) from the answer's keys."""
Answer = dict[str, dict[str, Any]]
"""One image's answer: ``{task: {file name: base64 string | parsed JSON}}``."""

_DATA_URL = re.compile(r"^data:[^,;]*(;[^,;]*)*;base64,", re.IGNORECASE)


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

    Raises (one line naming the file, store or value): ``ConfigError`` for a bad device;
    ``CheckpointError`` for an MLmodel without densepipe's flavor, a missing weights file,
    weights whose sha256 differs from the MLmodel's, or a file torch refuses to read as weights;
    ``TrackingError`` when the tracking store's checksum differs or the store does not know the
    model."""
    device = serving_device((model_config or {}).get(DEVICE_KEY, "auto"))
    weights = verified_weights(path)
    source = str(weights)
    payload = model_store.read_weights(weights, source=source)
    model = model_store.build_from_payload(payload, source=source, device=device)
    return DensepipePyfunc(model)


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
    """The object ``_load_pyfunc`` returns; MLflow wraps it in a ``PyFuncModel``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        """The ``MultiTaskModel``, in eval mode."""

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[Answer]:
        """One answer per row of ``model_input`` (a DataFrame with column ``image``: base64 image
        files), in row order: ``{task: {file name: base64 string | parsed JSON}}`` (module
        docstring). Every row is decoded before the model runs; ``ImageInputError`` (one line
        naming the row) for the first that is not an image. ``params`` are not used."""
        images = [decode_image(value, row=i) for i, value in enumerate(_image_column(model_input))]
        return [self.predict_image(rgb) for rgb in images]

    def predict_image(self, rgb: np.ndarray) -> Answer:
        """The answer for one ``HxWx3 uint8`` image (as ``predict``), computed as ``densepipe
        predict`` computes its files (``pipeline.stages.predict``)."""
        rgb = np.require(rgb, requirements=["C", "W"])
        batch = {"image": torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).contiguous(),
                 "image_ids": [0], "has": {}}
        with torch.inference_mode():
            predictions = self.model.predict(batch)
        answer: Answer = {}
        with tempfile.TemporaryDirectory(prefix="densepipe-serve-") as tmp:
            folder = Path(tmp)
            for name, task in self.model.tasks.items():
                files = task.save_prediction(predictions[name][0], str(folder / STEM), card=self.model.card,
                                             options=self.model.options[name])
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


__all__ = ["DensepipePyfunc", "ImageInputError", "_load_pyfunc", "decode_image",
           "decode_png", "verified_weights"]
