"""Models in the MLflow registry as weights plus config, never as a pickled object.

A densepipe MLflow model is a folder with an ``MLmodel`` file (flavor ``densepipe``: the weights
file's name, format and sha256) and ``weights.pt``: a ``torch.save``'d dict of plain data that
``torch.load(weights_only=True)`` reads, as checkpoints are read:

``format`` (``densepipe-model/1``), ``model`` (state dict; the EMA weights when training kept
them), ``config`` (the full config as plain data), ``card`` (dataset card JSON), ``step``,
``tasks``, ``train_run_id``.

Loading rebuilds the model from ``config`` and ``card`` through the task registry and loads the
weights strictly. The file's sha256 is also recorded in the tracking store (tag
``densepipe.weights_sha256`` on the MLflow logged model and on each registered version), which is
checked before the file is read: whoever can write the artifact store cannot swap the weights.
This module is also the flavor ``mlflow.models.Model.log`` saves with (``save_model``).

The same folder is an MLflow ``python_function`` model (``loader_module`` ``pipeline.serving``,
``data`` ``weights.pt``, an explicit signature; no pickled ``PythonModel``), so ``mlflow models
serve`` and ``mlflow.pyfunc.load_model`` serve it; see ``pipeline.serving``.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from pipeline.config import config_from_dict
from pipeline.data.card import DatasetCard
from pipeline.engine.checkpoint import load_model_state, unreadable_message
from pipeline.errors import CheckpointError
from pipeline.io import sha256_file
from pipeline.model import build_model

# Imports inside functions: MLflow, when a model is logged or saved: an untracked training imports
# this module without it.

FLAVOR = "densepipe"
FORMAT = "densepipe-model/1"
WEIGHTS_FILE = "weights.pt"
SHA256_TAG = "densepipe.weights_sha256"
"""Tag holding the weights file's sha256 in the tracking store (logged model, model version)."""
PYFUNC_LOADER_MODULE = "pipeline.serving"
"""The ``loader_module`` of the ``python_function`` flavor (the module serving the model)."""
IMAGE_COLUMN = "image"
"""The input column: base64-encoded image files (strings)."""
DEVICE_KEY = "device"
"""``model_config`` key (``mlflow.pyfunc.load_model(..., model_config=...)``, or the
``SERVING_MODEL_CONFIG`` JSON of ``mlflow models serve``): ``auto`` (default), ``cpu``, ``cuda``."""
FOLLOW_KEY = "follow"
"""``model_config`` key: a ``models:/<name>@<alias>`` URI whose version is served and followed
(default ``None``: serve the weights MLflow passed, for good)."""
REFRESH_KEY = "refresh_s"
"""``model_config`` key: at most how often (seconds, >= 0; 0: every request) ``follow`` is checked."""
DEFAULT_REFRESH_S = 30.0
MODEL_CONFIG: dict[str, Any] = {DEVICE_KEY: "auto", FOLLOW_KEY: None, REFRESH_KEY: DEFAULT_REFRESH_S}
"""Every ``model_config`` key ``pipeline.serving`` reads, with its default: what the ``python_function``
flavor must declare (MLflow passes on to ``_load_pyfunc`` only keys the MLmodel declares)."""


def model_payload(model: Any, *, config: dict[str, Any], step: int,
                  train_run_id: str | None) -> dict[str, Any]:
    """The plain data stored for ``model`` (a ``MultiTaskModel`` holding the weights to keep):
    its state dict on the CPU, ``config`` (``cfg.model_dump(mode="json")``), its dataset card,
    ``step``, its tasks and the training run."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "model": state, "config": config, "card": model.card.to_json(),
            "step": int(step), "tasks": list(model.tasks), "train_run_id": train_run_id}


def write_weights(payload: dict[str, Any], path: str | Path) -> str:
    """Write ``payload`` with ``torch.save`` to ``path``; returns the file's sha256 (hex)."""
    torch.save(payload, path)
    return sha256_file(path)


def save_model(path: str, mlflow_model: Any, *, weights_file: str, sha256: str, tasks: list[str],
               pip_requirements: list[str] | None = None) -> None:
    """The ``densepipe`` flavor for ``mlflow.models.Model.log``: move ``weights_file`` (written
    by ``write_weights`` into a temporary folder of the caller's, whose hash is ``sha256``) into
    the new model folder ``path`` and write its ``MLmodel`` (plus ``requirements.txt`` when
    ``pip_requirements`` are given). The model also gets the ``python_function`` flavor, whose
    signature names ``tasks`` (the model's, in order), and a ``python_env.yaml``
    (``add_pyfunc_flavor``)."""
    from mlflow.models.model import MLMODEL_FILE_NAME

    folder = Path(path)
    folder.mkdir(parents=True)
    shutil.move(weights_file, folder / WEIGHTS_FILE)  # a rename on one filesystem: no second copy
    if pip_requirements:
        (folder / "requirements.txt").write_text("\n".join(pip_requirements) + "\n")
    mlflow_model.add_flavor(FLAVOR, weights=WEIGHTS_FILE, format=FORMAT, sha256=sha256,
                            torch_version=str(torch.__version__))
    add_pyfunc_flavor(mlflow_model, folder, tasks=list(tasks))
    mlflow_model.save(str(folder / MLMODEL_FILE_NAME))


def read_weights(path: str | Path, *, source: str) -> dict[str, Any]:
    """Read a weights file with ``torch.load(weights_only=True)`` (nothing is unpickled beyond
    tensors and plain data). ``CheckpointError`` (one line naming ``source``) when the file is
    not readable that way (a pickled object is refused, naming the global it needs) or not in
    ``FORMAT``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle errors, unsafe globals
        raise CheckpointError(unreadable_message(Path(path), e, source=source,
                                                 what="model weights file")) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or \
            not all(k in payload for k in ("model", "config", "card")):
        raise CheckpointError(f"{source}: weights file is not a densepipe model (expected format {FORMAT})")
    return payload


def build_from_payload(payload: dict[str, Any], *, source: str,
                       device: torch.device | str | None = None) -> Any:
    """The model ``payload`` describes: built from its config (without ``model.weights``: the
    stored state replaces any pretrained backbone file) and dataset card through the task
    registry, the weights loaded strictly, in eval mode on ``device`` (default CPU)."""
    cfg = config_from_dict(payload["config"], source=source)
    card = DatasetCard.from_json(payload["card"], source=source)
    model = build_model(cfg, card, load_weights=False)  # no weights file read: the payload's weights
    load_model_state(model, payload["model"], source=source)
    return model.to(device or "cpu").eval()


def pyfunc_signature(tasks: list[str]) -> Any:
    """The ``ModelSignature`` of a model with ``tasks``: input a string column ``image``; output
    one object per row with a property per task, each a map from file name to value (a base64
    string, or the parsed JSON of a ``.json`` file)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Map, Object, Property, Schema

    inputs = Schema([ColSpec(DataType.string, IMAGE_COLUMN)])
    outputs = Schema([ColSpec(Object([Property(t, Map(AnyType())) for t in tasks]))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def add_pyfunc_flavor(mlflow_model: Any, folder: str | Path, *, tasks: list[str]) -> None:
    """Give ``mlflow_model`` (being saved into ``folder``, which already holds ``weights.pt``)
    the ``python_function`` flavor (``loader_module`` ``pipeline.serving``, ``data`` the weights file,
    ``model_config`` ``MODEL_CONFIG``, whose keys callers may override), a ``python_env.yaml``
    (this Python; pip installs ``requirements.txt``) and the signature of
    ``pyfunc_signature(tasks)``. Writes no pickle and needs no network."""
    import mlflow.pyfunc
    from mlflow.utils.environment import _PYTHON_ENV_FILE_NAME, _PythonEnv

    _PythonEnv.current().to_yaml(str(Path(folder) / _PYTHON_ENV_FILE_NAME))
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=PYFUNC_LOADER_MODULE,
                               data=WEIGHTS_FILE, python_env=_PYTHON_ENV_FILE_NAME,
                               model_config=dict(MODEL_CONFIG))  # MLflow passes on only declared keys
    mlflow_model.signature = pyfunc_signature(tasks)
