"""Where the model a stage evaluates, predicts with or exports comes from: a checkpoint (the
configured one, else ``best.pt`` / ``last.pt`` of the training folder) or an MLflow registered
model. Used by ``pipeline.stages``, ``pipeline.predict`` and ``pipeline.cli_export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.engine.trainer import load_trained_model
from pipeline.errors import CheckpointError, ConfigError
from pipeline.model import configured_views
from pipeline.tracking import load_registered_model, resolve_uri  # lazy: MLflow


def default_checkpoint(cfg: Config) -> Path:
    """``evaluate.checkpoint`` when set, else ``best.pt``, else ``last.pt`` of ``train.out_dir``;
    ``CheckpointError`` when there is none."""
    if cfg.evaluate.checkpoint:
        return Path(cfg.evaluate.checkpoint)
    out = Path(cfg.train.out_dir)
    for name in ("best.pt", "last.pt"):
        if (out / name).exists():
            return out / name
    raise CheckpointError(f"{out}: no best.pt or last.pt (run `densepipe train` first)")


def load_model_to_evaluate(cfg: Config, *, checkpoint: str | Path | None = None,
                           model_uri: str | None = None, card: Any = None,
                           device: torch.device | None = None) -> tuple[Any, int, str | None, str]:
    """The model to evaluate or predict with: from the MLflow ``model_uri`` (``models:/...``) when
    given, else from ``checkpoint`` (default ``default_checkpoint``), built with ``cfg`` and the
    dataset ``card`` when a card is given, else with the checkpoint's own config and card.
    Its test views (multi-scale / flip inference) are ``cfg``'s ``evaluate.scales`` and
    ``evaluate.flip``, whichever config built it. Returns ``(model, step, training run id,
    source)``; ``source`` names where it came from."""
    if model_uri is not None:
        if checkpoint is not None:
            raise ConfigError(f"--model {model_uri} and --checkpoint {checkpoint}: give one of them")
        model, meta = load_registered_model(model_uri, tracking_uri=resolve_uri(cfg.tracking),
                                            device=device)
        run_id = meta.get("train_run_id") or meta.get("run_id")
        model.test_views = configured_views(cfg)
        return model, int(meta.get("step", 0)), run_id, model_uri
    path = Path(checkpoint) if checkpoint else default_checkpoint(cfg)
    model, ckpt = load_trained_model(cfg if card is not None else None, path, card, device=device)
    model.test_views = configured_views(cfg)
    return model, int(ckpt["step"]), ckpt.get("mlflow_run_id"), str(path)
