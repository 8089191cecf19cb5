"""MLflow tracking: runs, nested runs and the model registry.

A pipeline run (``densepipe run``, the Prefect ``pipeline`` flow) is a parent run with one nested
run per stage (prepare, train, evaluate, register). A stage run on its own is a top-level run, except
``evaluate``, which nests under the run that trained its model. Resumed training continues its run.

Default store: ``sqlite:///<working folder>/mlflow.db`` with artifacts in ``<working folder>/mlruns``
(``MLFLOW_TRACKING_URI`` is honoured when ``tracking.uri`` is unset). Any MLflow URI works.

Models are logged as weights plus config (flavor ``densepipe``, see ``pipeline.model_store``),
with the weights' sha256 recorded in the tracking store; nothing loaded from a store is unpickled.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import base64
import json
import logging
import math
import re
import tempfile
import time
import urllib.error
import urllib.request

import torch

from pipeline import model_store  # noqa: E402
from pipeline.config import TrackingConfig  # noqa: E402
from pipeline.errors import DensepipeError, TrackingError, TrackingUnreachableError

# Imports inside functions: MLflow, once a tracker is made or a model read: untracked stages
# import this module without loading it.

MAX_PARAM_LEN = 6000
ERROR_TAG = "densepipe.error"
"""Tag of a FAILED or KILLED run: the error that ended it, one line."""
SKIPPED_TAG = "densepipe.skipped.{stage}"
"""Tag of a pipeline run whose stage did no work (cached or already done): what and from which run."""
MAX_TAG_LEN = 5000


def error_line(error: BaseException) -> str:
    """The one line an operator reads: densepipe's own errors as they are, others with their type;
    at most ``MAX_TAG_LEN`` characters (what MLflow stores in a tag)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGTERM)"
    if not isinstance(error, Exception):  # SystemExit, Prefect's TerminationSignal (a cancelled run)
        return f"interrupted ({type(error).__name__})"
    text = " ".join(str(error).split()) or type(error).__name__
    line = text if isinstance(error, DensepipeError) else f"{type(error).__name__}: {text}"
    return line[:MAX_TAG_LEN]


def resolve_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _is_mlflow_json(body: bytes) -> bool:
    """Whether ``body`` is an MLflow REST answer: a JSON object with ``experiment`` or
    ``error_code``."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and ("experiment" in data or "error_code" in data)


def _sqlite_dir(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:////") else \
            (Path.cwd() / uri[len("sqlite:///"):]).parent
    return None


class Tracker:
    """Thin MLflow wrapper owning one active run (started or resumed by id)."""

    def __init__(self, cfg: TrackingConfig, *, parent_run_id: str | None = None) -> None:
        import mlflow

        self.cfg = cfg
        self.mlflow = mlflow
        self.uri = resolve_uri(cfg)
        self.parent_run_id = parent_run_id
        """New runs nest under this run (MLflow's ``mlflow.parentRunId`` tag)."""
        self._client = None
        self.run_id: str | None = None

    @property
    def client(self):
        """The MLflow client, created on first use (creating a SQLite store writes the file)."""
        if self._client is None:
            self._client = self.mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def check_reachable(self, *, timeout_s: float = 10.0) -> None:
        """Fail fast, before any training, when the store cannot take this run: an HTTP(S)
        tracking URI where no server answers within ``timeout_s`` seconds
        (``TrackingUnreachableError``) or where the server that answers is not MLflow, or a
        SQLite file whose folder does not exist. ``TrackingError`` names the URI (no GPU hours
        go untracked).

        A server is MLflow when ``GET /health`` answers 200 ``OK`` or, for a server without
        ``/health``, when its REST API answers ``experiments/get-by-name`` with MLflow's JSON
        (an experiment, or an ``error_code``) or asks for credentials (401/403)."""
        if self.uri.startswith(("http://", "https://")):
            base = self.uri.rstrip("/")
            status, body = self._http_get(f"{base}/health", timeout_s)
            if status == 200 and body.strip() == b"OK":
                return
            answers = [f"GET /health: HTTP {status}"]
            api = "/api/2.0/mlflow/experiments/get-by-name"
            query = urllib.parse.urlencode({"experiment_name": self.cfg.experiment})
            api_status, api_body = self._http_get(f"{base}{api}?{query}", timeout_s)
            if api_status in (401, 403) or _is_mlflow_json(api_body):
                return
            answers.append(f"GET {api}: HTTP {api_status}")
            raise TrackingError(f"tracking.uri {self.uri}: answers HTTP {status} but is not an MLflow "
                                f"tracking server ({'; '.join(answers)}); fix the URI (the "
                                "server's root, e.g. http://host:5000) or set tracking.enabled=false")
        folder = _sqlite_dir(self.uri)
        if folder is not None and not folder.is_dir():
            raise TrackingError(f"tracking.uri {self.uri}: folder {folder} does not exist")

    def _http_get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        """``(status, first 64 KiB of the body)`` of ``GET url`` with MLflow's credentials from
        the environment (``MLFLOW_TRACKING_TOKEN`` or ``_USERNAME``/``_PASSWORD``); an error
        status is an answer too. ``TrackingUnreachableError`` when nothing answers in time."""
        headers = {}
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            user = os.environ["MLFLOW_TRACKING_USERNAME"]
            secret = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(secret).decode()
        request = urllib.request.Request(url)
        for key, value in headers.items():  # not sent on to another host on a redirect
            request.add_unredirected_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:  # noqa: S310 - the user's URI
                return answer.status, answer.read(1 << 16)
        except urllib.error.HTTPError as e:
            try:
                body = e.read(1 << 16)
            except OSError:
                body = b""
            return e.code, body
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnreachableError(f"tracking.uri {self.uri}: MLflow server not reachable "
                                           f"within {timeout_s:g} s ({reason}); start it or fix the "
                                           "URI, or set tracking.enabled=false") from None

    # -- runs -----------------------------------------------------------------------------------
    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        base = _sqlite_dir(self.uri)
        if base is not None:
            location = (base / "mlruns").resolve().as_uri()
        return self.client.create_experiment(self.cfg.experiment, artifact_location=location)

    def start(self, *, run_id: str | None = None, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> str:
        """Resume ``run_id`` when it exists in this store (marked RUNNING again; its parent, if
        any, is kept: a run's parent never changes once set), else create a new run (nested under
        ``parent_run_id`` when one is set)."""
        if run_id is not None and self.run_exists(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = dict(tags or {})
        if self.parent_run_id is not None:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def run_exists(self, run_id: str) -> bool:
        """Whether ``run_id`` is a run of this store."""
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - MlflowException (not found) or a run of another store
            return False

    def parent_of(self, run_id: str) -> str | None:
        """The run ``run_id`` is nested under (MLflow's ``mlflow.parentRunId`` tag), if any."""
        return self.client.get_run(run_id).data.tags.get("mlflow.parentRunId")

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def fail(self, error: BaseException) -> None:
        """End the active run FAILED (an ``Exception``) or KILLED (anything else: Ctrl-C, SIGTERM,
        Prefect cancelling the run), with the error's one line as tag ``densepipe.error``. Never
        raises: the error being reported is what the caller re-raises."""
        if self.run_id is None:
            return
        try:
            self.client.set_tag(self.run_id, ERROR_TAG, error_line(error))
            self.finish("FAILED" if isinstance(error, Exception) else "KILLED")
        except Exception as e:  # noqa: BLE001 - the store may be what failed
            logging.getLogger(__name__).warning("could not mark MLflow run %s failed: %s", self.run_id,
                                                error_line(e))

    @contextmanager
    def running(self, *, run_name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
        """A new run for the block: FINISHED after it, FAILED (KILLED on Ctrl-C) with tag
        ``densepipe.error`` if it raises."""
        run_id = self.start(run_name=run_name, tags=tags)
        try:
            yield run_id
        except BaseException as e:
            self.fail(e)
            raise
        self.finish()

    def run_link(self, run_id: str | None = None, *, ui_url: str = "http://127.0.0.1:5000") -> str:
        """Where to see a run: the server's page for an HTTP store, else the page ``make ui``
        (``ui_url``) serves over this store."""
        run_id = run_id or self.run_id
        experiment = self.client.get_run(run_id).info.experiment_id  # type: ignore[arg-type]
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else ui_url
        return f"{base}/#/experiments/{experiment}/runs/{run_id}"

    # -- logging --------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; on a resumed run, values already logged are kept and changes become
        ``changed.<key>`` tags (MLflow params are immutable)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params  # type: ignore[arg-type]
        new, changed = [], {}
        for key, value in params.items():
            text = str(value)[:MAX_PARAM_LEN]
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text:
                changed[f"changed.{key}"] = text
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])  # type: ignore[arg-type]
        for key, value in changed.items():
            self.client.set_tag(self.run_id, key, value)  # type: ignore[arg-type]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(_metric_key(k), float(v), ts, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])  # type: ignore[arg-type]

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():  # a folder keeps its name under artifact_path
            sub = Path(path).name if artifact_path is None else f"{artifact_path}/{Path(path).name}"
            self.client.log_artifacts(self.run_id, str(path), sub)  # type: ignore[arg-type]
            return
        self.client.log_artifact(self.run_id, str(path), artifact_path)  # type: ignore[arg-type]

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)  # type: ignore[arg-type]

    def log_model(self, payload: dict[str, Any], *, name: str = "model",
                  metadata: dict[str, Any] | None = None) -> str:
        """Log ``payload`` (``pipeline.model_store.model_payload``: weights plus config, no
        pickled object) as an MLflow model of flavors ``densepipe`` and ``python_function``
        (``pipeline.serving``: ``mlflow models serve`` serves it) in the active run; returns its
        URI (``models:/m-...``). The weights file's sha256 is recorded in the tracking store, as
        the logged model's tag ``densepipe.weights_sha256``, and in the MLmodel flavor.
        ``metadata`` (JSON-able) lands in the model's MLmodel file."""
        from mlflow.models import Model

        with tempfile.TemporaryDirectory(prefix="densepipe-model-") as tmp:
            weights = Path(tmp) / model_store.WEIGHTS_FILE
            sha256 = model_store.write_weights(payload, weights)
            # the global URI and active run give the store and the experiment the model joins
            with store_uri(self.uri), self.mlflow.start_run(run_id=self.run_id):
                info = Model.log(
                    None, name=name, flavor=model_store, flavor_name=model_store.FLAVOR,
                    run_id=self.run_id, metadata=metadata, tags={model_store.SHA256_TAG: sha256},
                    weights_file=str(weights), sha256=sha256, tasks=list(payload["tasks"]),
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "densepipe"],
                )
        return info.model_uri

    def register_model(self, model_uri: str, *, name: str, source_run_id: str | None,
                       tags: dict[str, str], description: str) -> str:
        """Register ``model_uri`` as a new version of ``name`` (created on first use), linked to
        ``source_run_id`` (the training run); returns the version number as a string. The
        version is also tagged with the weights checksum recorded for ``model_uri``."""
        from mlflow.exceptions import MlflowException

        with store_uri(self.uri):
            recorded = _recorded_sha256(self.client, model_uri)
        if recorded and len(set(recorded)) == 1:
            tags = {**tags, model_store.SHA256_TAG: recorded[0]}
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(
                name, description="densepipe multi-task models (shared backbone, task heads).")
        with store_uri(self.uri):  # the registry resolves models:/m-... through the global client
            version = self.client.create_model_version(name, model_uri, run_id=source_run_id,
                                                       tags=tags, description=description)
        return str(version.version)


@contextmanager
def store_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking and registry URIs at ``uri`` for the block, then put back
    exactly what was there (unset stays unset, in MLflow and in the environment): parts of MLflow
    (logging a model, registering ``models:/m-...``) use the global client."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_registered_model_info(model_uri: str, *, tracking_uri: str) -> dict[str, Any]:
    """The metadata densepipe logged with a model (``step``, ``tasks``, ``train_run_id``,
    ``config``) plus the MLflow ``run_id``, read from its MLmodel file without loading the
    weights (so unverified: nothing here is executed or used to build a model).

    Raises:
        TrackingError: the URI names nothing in this store, or a model not in densepipe's weights
            format (an older densepipe's pickled model); one line naming the URI.
    """
    return _with_model(model_uri, tracking_uri, load=False)[1]


def load_registered_model(model_uri: str, *, tracking_uri: str, device: Any = None) -> tuple[Any, dict]:
    """Load a model logged by densepipe (``models:/<name>/<version|latest|@alias>``, ``runs:/...``
    or ``models:/m-...``) and its metadata (see ``load_registered_model_info``; ``step``,
    ``tasks``, ``config`` and ``train_run_id`` come from the verified weights file).

    Never unpickles: the weights file must match the sha256 the tracking store records for the
    URI and is read with ``torch.load(weights_only=True)``; the model is rebuilt from its config
    and dataset card through the task registry and the weights loaded strictly.

    Raises:
        TrackingError: the URI names nothing in this store; a model not in densepipe's weights
            format (an older densepipe's pickled model: re-register it from the checkpoint); no
            checksum recorded, or weights that do not match it.
        CheckpointError: a weights file torch refuses to read as weights (a pickled object) or
            not in densepipe's model format, or weights not fitting the config.
    All messages are one line naming the URI.
    """
    return _with_model(model_uri, tracking_uri, load=True, device=device)


def _with_model(model_uri: str, tracking_uri: str, *, load: bool, device: Any = None) -> tuple[Any, dict]:
    """The model behind ``model_uri`` (``None`` unless ``load``) and its metadata. Nothing is
    unpickled: the model must be of flavor ``densepipe``, its weights file must match the sha256
    the tracking store records for it (for ``models:/`` and ``runs:/`` URIs; the MLmodel's own
    for a local folder), and it is read with ``torch.load(weights_only=True)``."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="densepipe-model-") as tmp, store_uri(tracking_uri), \
            _no_progress_bars():
        try:  # models:/ URIs resolve through the global store
            if load:
                local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
                mlmodel = Model.load(local)
                run_id = mlmodel.run_id
            else:
                info = mlflow.models.get_model_info(model_uri)
                mlmodel, run_id = info, info.run_id
            flavor = _densepipe_flavor(model_uri, mlmodel.flavors)
            client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            recorded = _recorded_sha256(client, model_uri) if load else []
        except (MlflowException, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrackingError(f"--model {model_uri}: cannot load it from {tracking_uri} "
                                f"({first})") from None
        meta = dict(mlmodel.metadata or {})
        meta.setdefault("run_id", run_id)
        if not load:
            return None, meta
        weights = Path(local) / model_store.WEIGHTS_FILE
        if not weights.is_file():
            raise TrackingError(f"--model {model_uri}: its {model_store.WEIGHTS_FILE} is missing "
                                f"from the artifact store of {tracking_uri}")
        if recorded is None:  # not a registry or run URI: the tracking store knows nothing of it
            if "://" in model_uri and not model_uri.startswith("file://"):
                raise TrackingError(
                    f"--model {model_uri}: only models:/ and runs:/ URIs (whose weights checksum the "
                    "tracking store records) or a local model folder can be loaded; register the "
                    "model and load it as models:/<name>/<version>")
            recorded = [str(flavor.get("sha256"))]  # a local folder: its own MLmodel's checksum
        elif not recorded:
            raise TrackingError(f"--model {model_uri}: {tracking_uri} records no weights checksum "
                                f"for it (tag {model_store.SHA256_TAG}); re-register it from its "
                                "checkpoint with `densepipe register --checkpoint PATH`")
        actual = model_store.sha256_file(weights)
        if any(actual != r for r in recorded):
            raise TrackingError(f"--model {model_uri}: {model_store.WEIGHTS_FILE} does not match the "
                                f"checksum recorded in {tracking_uri} (sha256 {actual[:12]}..., "
                                f"recorded {recorded[0][:12]}...): the artifact was changed after "
                                "logging; refusing to load it")
        source = f"--model {model_uri} ({model_store.WEIGHTS_FILE})"
        payload = model_store.read_weights(weights, source=source)
    model = model_store.build_from_payload(payload, source=source, device=device)
    meta.update({"step": int(payload.get("step", 0)), "tasks": list(payload.get("tasks", [])),
                 "config": payload["config"]})
    if payload.get("train_run_id"):
        meta["train_run_id"] = payload["train_run_id"]
    return model, meta


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """No MLflow download progress bars for the block (errors stay one line on stderr)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def _densepipe_flavor(model_uri: str, flavors: dict[str, Any]) -> dict[str, Any]:
    """The MLmodel's ``densepipe`` flavor; ``TrackingError`` for a model without it (e.g. one an
    older densepipe logged as a pickled PyTorch model, which is never unpickled) or in a format
    this densepipe does not read."""
    flavor = flavors.get(model_store.FLAVOR)
    if not isinstance(flavor, dict):
        raise TrackingError(
            f"--model {model_uri}: not in densepipe's weights format (flavors: "
            f"{', '.join(sorted(flavors)) or 'none'}); a model an older densepipe logged as a "
            "pickled PyTorch object is not loaded, since unpickling can run code: re-register it "
            "from its checkpoint with `densepipe register --checkpoint PATH`")
    if flavor.get("format") != model_store.FORMAT or flavor.get("weights") != model_store.WEIGHTS_FILE:
        raise TrackingError(f"--model {model_uri}: densepipe model format {flavor.get('format')!r} "
                            f"(weights {flavor.get('weights')!r}) is not {model_store.FORMAT!r} "
                            f"({model_store.WEIGHTS_FILE!r}); log it again with this densepipe")
    return flavor


def _recorded_sha256(client: Any, model_uri: str) -> list[str] | None:
    """The weights checksums the tracking store records for ``model_uri``: the tag
    ``densepipe.weights_sha256`` of its registered version and of its logged model (the same
    LoggedModel MLflow resolves the URI to). ``[]``: none recorded; ``None``: not a ``models:/``
    or ``runs:/`` URI (a local folder). MLflow errors propagate (unknown name, version, run)."""
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    found: list[str | None] = []
    if model_uri.startswith("models:/"):
        resolved = get_model_name_and_version(client, model_uri)
        if len(resolved) == 1:
            found.append(client.get_logged_model(resolved[0]).tags.get(model_store.SHA256_TAG))
        else:
            version = client.get_model_version(*resolved)
            found.append(version.tags.get(model_store.SHA256_TAG))
            if version.model_id:
                found.append(client.get_logged_model(version.model_id).tags.get(model_store.SHA256_TAG))
    elif model_uri.startswith("runs:/"):
        run_id, path = RunsArtifactRepository.parse_runs_uri(model_uri)
        name = (path or "").split("/")[0]
        experiment = client.get_run(run_id).info.experiment_id
        token = None
        while True:  # the first logged model of that name from that run, as MLflow picks it
            page = client.search_logged_models(experiment_ids=[experiment],
                                               filter_string=f"name = '{name}'", page_token=token)
            match = next((m for m in page if m.source_run_id == run_id), None)
            if match is not None:
                found.append(match.tags.get(model_store.SHA256_TAG))
                break
            if not page.token:
                break
            token = page.token
    else:
        return None
    return [f for f in found if f]


def _metric_key(name: str) -> str:
    """MLflow keys allow ``/``; keep letters, digits and ``_-. /``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def make_tracker(cfg: TrackingConfig, *, parent_run_id: str | None = None) -> Tracker | None:
    return Tracker(cfg, parent_run_id=parent_run_id) if cfg.enabled else None


@contextmanager
def parent_run(cfg: TrackingConfig, *, run_name: str, params: dict[str, Any],
               tags: dict[str, str] | None = None) -> Iterator[Tracker | None]:
    """A parent run for a whole pipeline run (``None`` when tracking is off): checked reachable,
    started with ``params``, ended FINISHED, or FAILED (KILLED on Ctrl-C) when the body raises.
    Stages given its ``run_id`` as ``parent_run_id`` nest under it."""
    tracker = make_tracker(cfg)
    if tracker is None:
        yield None
        return
    tracker.check_reachable()
    with tracker.running(run_name=run_name, tags={"densepipe.stage": "pipeline", **(tags or {})}):
        tracker.log_params(params)
        yield tracker
