"""MLflow tracking: one run per training, resumed by the evaluate stage and by resumed training.

Default store: ``sqlite:///<working folder>/mlflow.db`` with artifacts in ``<working folder>/mlruns``
(``MLFLOW_TRACKING_URI`` is honoured when ``tracking.uri`` is unset). Any MLflow URI works.
"""

from __future__ import annotations

import os
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

    def __init__(self, cfg: TrackingConfig) -> None:
        import mlflow

        self.cfg = cfg
        self.mlflow = mlflow
        self.uri = resolve_uri(cfg)
        self._client = None
        self.run_id: str | None = None

    @property
    def client(self):
        """The MLflow client, created on first use (creating a SQLite store writes the file)."""
        if self._client is None:
            self._client = self.mlflow.MlflowClient(tracking_uri=self.uri)
        return self._client

    def check_reachable(self, *, timeout_s: float = 10.0) -> None:
        """Fail fast, before any training, when the store cannot take this run: an HTTP(S)
        tracking server that does not answer within ``timeout_s`` seconds, or a SQLite file whose
        folder does not exist. ``TrackingError`` names the URI (no GPU hours go untracked)."""
        import urllib.error
        import urllib.request

        from pipeline.errors import TrackingError

        if self.uri.startswith(("http://", "https://")):
            url = self.uri.rstrip("/") + "/health"
            try:
                with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 - the user's URI
                    pass
            except urllib.error.HTTPError:
                return  # the server answered (an old server without /health, a proxy's 404)
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise TrackingError(f"tracking.uri {self.uri}: MLflow server not reachable "
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
        """Resume ``run_id`` when it exists in this store, else create a new run."""
        if run_id is not None:
            try:
                self.client.get_run(run_id)
                self.run_id = run_id
                return run_id
            except Exception:  # noqa: BLE001 - run from another store: start a new one
                pass
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        return self.run_id

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    @property
    def run_url(self) -> str:
        run = self.client.get_run(self.run_id)  # type: ignore[arg-type]
        return f"{self.uri} experiment {run.info.experiment_id} run {self.run_id}"

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

    def log_model(self, model: Any, *, name: str = "model") -> None:
        """The model as an MLflow PyTorch model (pickle format: dict outputs do not export)."""
        import torch

        self.mlflow.set_tracking_uri(self.uri)
        with self.mlflow.start_run(run_id=self.run_id):
            self.mlflow.pytorch.log_model(
                model, name=name, serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "densepipe"],
            )


def _metric_key(name: str) -> str:
    """MLflow keys allow ``/``; keep letters, digits and ``_-. /``."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def make_tracker(cfg: TrackingConfig) -> Tracker | None:
    return Tracker(cfg) if cfg.enabled else None
