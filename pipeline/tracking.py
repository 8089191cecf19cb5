"""MLflow tracking: runs, nested runs and the model registry.

A pipeline run (``densepipe run``, the Prefect ``pipeline`` flow) is a parent run with one nested
run per stage (prepare, train, evaluate, register). A stage run on its own is a top-level run, except
``evaluate``, which nests under the run that trained its model. Resumed training continues its run.

Default store: ``sqlite:///<working folder>/mlflow.db`` with artifacts in ``<working folder>/mlruns``
(``MLFLOW_TRACKING_URI`` is honoured when ``tracking.uri`` is unset). Any MLflow URI works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from pipeline.config import TrackingConfig  # noqa: E402

MAX_PARAM_LEN = 6000


def resolve_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


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
        tracking server that does not answer within ``timeout_s`` seconds, or a SQLite file whose
        folder does not exist. ``TrackingError`` names the URI (no GPU hours go untracked)."""
        import urllib.error
        import urllib.request

        from pipeline.errors import TrackingError, TrackingUnreachableError

        if self.uri.startswith(("http://", "https://")):
            url = self.uri.rstrip("/") + "/health"
            try:
                with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 - the user's URI
                    pass
            except urllib.error.HTTPError:
                return  # the server answered (an old server without /health, a proxy's 404)
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise TrackingUnreachableError(f"tracking.uri {self.uri}: MLflow server not reachable "
                                    f"within {timeout_s:g} s ({reason}); start it or fix the URI, "
                                    "or set tracking.enabled=false") from None
        folder = _sqlite_dir(self.uri)
        if folder is not None and not folder.is_dir():
            raise TrackingError(f"tracking.uri {self.uri}: folder {folder} does not exist")

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
        """Resume ``run_id`` when it exists in this store (marked RUNNING again and, with a
        ``parent_run_id``, moved under that parent: the latest pipeline run that continued it),
        else create a new run (nested under ``parent_run_id`` when one is set)."""
        if run_id is not None and self.run_exists(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            if self.parent_run_id is not None and self.parent_run_id != run_id:
                self.client.set_tag(run_id, "mlflow.parentRunId", self.parent_run_id)
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

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    @contextmanager
    def running(self, *, run_name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
        """A new run for the block: FINISHED after it, FAILED (KILLED on Ctrl-C) if it raises."""
        run_id = self.start(run_name=run_name, tags=tags)
        try:
            yield run_id
        except BaseException as e:
            self.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
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
        import math
        import time

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

    def log_model(self, model: Any, *, name: str = "model", metadata: dict[str, Any] | None = None) -> str:
        """Log the model as an MLflow PyTorch model in the active run; returns its model URI.

        Pickle format: dict outputs and data-dependent control flow do not ``torch.export``.
        ``metadata`` (JSON-able) lands in the model's MLmodel file."""
        import logging

        import torch

        pickle_warning = logging.getLogger("mlflow.pytorch")  # "pickle needs caution": we chose it
        level = pickle_warning.level
        pickle_warning.setLevel(logging.ERROR)
        try:
            with store_uri(self.uri), self.mlflow.start_run(run_id=self.run_id):
                info = self.mlflow.pytorch.log_model(
                    model, name=name, serialization_format="pickle", metadata=metadata,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "densepipe"],
                )
        finally:
            pickle_warning.setLevel(level)
        return info.model_uri

    def register_model(self, model_uri: str, *, name: str, source_run_id: str | None,
                       tags: dict[str, str], description: str) -> str:
        """Register ``model_uri`` as a new version of ``name`` (created on first use), linked to
        ``source_run_id`` (the training run); returns the version number as a string."""
        from mlflow.exceptions import MlflowException

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
    ``config``) plus the MLflow ``run_id``, without loading the weights.

    Raises:
        TrackingError: the URI names nothing in this store (the message names the URI and store).
    """
    return _with_model(model_uri, tracking_uri, load=False)[1]


def load_registered_model(model_uri: str, *, tracking_uri: str, device: Any = None) -> tuple[Any, dict]:
    """Load a model logged by densepipe (``models:/<name>/<version|latest|@alias>``, ``runs:/...``
    or ``models:/m-...``) and its metadata (see ``load_registered_model_info``).

    Raises:
        TrackingError: the URI names nothing in this store (the message names the URI and store).
    """
    return _with_model(model_uri, tracking_uri, load=True, device=device)


def _with_model(model_uri: str, tracking_uri: str, *, load: bool, device: Any = None) -> tuple[Any, dict]:
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.errors import TrackingError

    try:
        with store_uri(tracking_uri):  # models:/ URIs resolve through the global store
            info = mlflow.models.get_model_info(model_uri)
            model = mlflow.pytorch.load_model(model_uri, map_location=device).eval() if load else None
    except (MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(f"--model {model_uri}: cannot load it from {tracking_uri} ({first})") from None
    meta = dict(info.metadata or {})
    meta.setdefault("run_id", info.run_id)
    return model, meta


def _metric_key(name: str) -> str:
    """MLflow keys allow ``/``; keep letters, digits and ``_-. /``."""
    import re

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
