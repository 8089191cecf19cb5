"""The pipeline stages: what the CLI, DVC and Prefect all call.

- ``prepare(cfg)``: render the synthetic world into ``data.root`` (or check a user's folder).
- ``train(cfg)``: train or resume; checkpoints in ``train.out_dir``; MLflow run.
- ``evaluate(cfg)``: every task's evaluator on the val split; ``metrics.json``; same MLflow run.
- ``predict(cfg, images, checkpoint, out_dir)``: visualisations and raw outputs per image.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.errors import CheckpointError, DataError
from pipeline.io import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


# -- prepare ------------------------------------------------------------------------------------
def prepare(cfg: Config) -> dict[str, Any]:
    """Make ``data.root`` ready. Synthetic: render it unless an identical render is there."""
    from pipeline.data import open_dataset

    root = Path(cfg.data.root)
    if cfg.data.source == "synthetic":
        from pipeline.data.card import DatasetCard
        from pipeline.data.synthetic import write_synthetic_dataset

        syn = cfg.data.synthetic
        wanted = {"seed": syn.seed, "image_size": syn.image_size,
                  "num_train": syn.num_train, "num_val": syn.num_val}
        if (root / "meta.json").exists():
            from pipeline.data.synthetic.spec import GENERATOR_VERSION

            extra = DatasetCard.load(root / "meta.json").extra
            have = {"seed": extra.get("seed"), "image_size": extra.get("image_size"),
                    "num_train": extra.get("splits", {}).get("train"),
                    "num_val": extra.get("splits", {}).get("val")}
            if have == wanted and extra.get("generator_version") == GENERATOR_VERSION:
                log.info("%s already holds this synthetic dataset; nothing to do", root)
                return {"root": str(root), "rendered": False, **wanted}
        t0 = time.perf_counter()
        summary = write_synthetic_dataset(root, num_train=syn.num_train, num_val=syn.num_val,
                                          image_size=syn.image_size, seed=syn.seed,
                                          workers=syn.workers)
        return {"root": str(root), "rendered": True, "seconds": time.perf_counter() - t0,
                **wanted, **{k: v for k, v in summary.items() if isinstance(v, int | float | str)}}
    counts = {}
    for split in (cfg.data.train_split, cfg.data.val_split):
        ds = open_dataset(root, split)
        counts[split] = len(ds)
        if len(ds) == 0:
            raise DataError(root, f"split {split!r} has no images")
    return {"root": str(root), "rendered": False, "images": counts}


def check_config(cfg: Config) -> None:
    """Fail fast, before any data is read or file written: unknown tasks or backbone."""
    from pipeline.config import check_tasks
    from pipeline.errors import ConfigError
    from pipeline.nn.backbones import BACKBONES
    from pipeline.registry import default_registry

    registry = default_registry()
    check_tasks(cfg, registry.names)
    registry.resolve(cfg.model.tasks)
    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {cfg.model.backbone!r}; "
                          f"allowed: {', '.join(sorted(BACKBONES))}")


# -- train --------------------------------------------------------------------------------------
def train(cfg: Config) -> dict[str, Any]:
    """Train (resuming from ``last.pt``), log to MLflow; returns a summary dict.

    Under torchrun every process runs this; only rank 0 tracks, writes the loss curve and logs
    the model, and the process group is closed at the end."""
    from pipeline.engine import distributed
    from pipeline.engine.trainer import train as run_training
    from pipeline.tracking import make_tracker

    check_config(cfg)
    out_dir = Path(cfg.train.out_dir)
    main = distributed.env_from_torchrun().is_main
    tracker = make_tracker(cfg.tracking) if main else None
    if tracker is not None:
        tracker.check_reachable()  # before any training: no GPU hours go untracked
    try:
        result = run_training(cfg, tracker=tracker)
    finally:
        distributed.destroy()
    summary = {"step": result.step, "out_dir": str(out_dir), "best": str(result.best),
               "last": str(result.last), "metrics": result.metrics, "run_id": result.run_id,
               "images_per_s": result.images_per_s, "skipped_nonfinite": result.skipped_nonfinite,
               "stopped_early": result.stopped_early}
    if not main:
        return summary
    if result.losses:
        _write_loss_curve(out_dir / "train_log.csv", result.losses, start=result.step - len(result.losses))
    if tracker is not None:
        tracker.log_artifact(out_dir / "config.yaml")
        if result.best is not None and result.best.exists():
            tracker.log_artifact(result.best, "checkpoints")
        if cfg.tracking.log_model:
            from pipeline.engine.trainer import load_trained_model

            model, _ = load_trained_model(cfg, result.best)
            tracker.log_model(model)
    return summary


def _write_loss_curve(path: Path, rows: list[dict[str, float]], *, start: int) -> None:
    keys = sorted({k for r in rows for k in r})
    lines = [",".join(["step", *keys])]
    for i, row in enumerate(rows):
        lines.append(",".join([str(start + i + 1), *(f"{row.get(k, float('nan')):.6g}" for k in keys)]))
    atomic_write_text(path, "\n".join(lines) + "\n")


def default_checkpoint(cfg: Config) -> Path:
    if cfg.evaluate.checkpoint:
        return Path(cfg.evaluate.checkpoint)
    out = Path(cfg.train.out_dir)
    for name in ("best.pt", "last.pt"):
        if (out / name).exists():
            return out / name
    raise CheckpointError(f"{out}: no best.pt or last.pt (run `densepipe train` first)")


# -- evaluate -----------------------------------------------------------------------------------
def evaluate(cfg: Config, checkpoint: str | Path | None = None) -> dict[str, float]:
    """Evaluate a checkpoint on ``data.val_split``; write ``evaluate.metrics_file`` and log it.

    Returns the flat ``{"task/metric": float}`` dict (ratios in [0, 1])."""
    from pipeline.engine.evaluation import evaluate_model
    from pipeline.engine.loaders import eval_dataset, eval_loader
    from pipeline.engine.trainer import load_trained_model, resolve_device
    from pipeline.tracking import make_tracker
    from pipeline.viz import panel_grid

    check_config(cfg)
    path = Path(checkpoint) if checkpoint else default_checkpoint(cfg)
    device = resolve_device(cfg.train.device)
    dataset = eval_dataset(cfg)
    model, ckpt = load_trained_model(cfg, path, dataset.card, device=device)  # type: ignore[attr-defined]
    loader = eval_loader(cfg, dataset, batch_size=cfg.evaluate.batch_size)
    out_dir = Path(cfg.evaluate.out_dir)
    artifacts: list[Path] = []
    metrics, drawings = evaluate_model(model, loader, device=device,
                                       num_visualizations=cfg.evaluate.num_visualizations,
                                       artifacts_dir=out_dir, saved=artifacts)
    metrics = dict(sorted(metrics.items()))
    metrics_path = Path(cfg.evaluate.metrics_file)
    atomic_write_json(metrics_path, metrics)
    grid_path = out_dir / "vis_grid.png"
    if drawings:
        with atomic_path(grid_path) as tmp:
            panel_grid(drawings, ncols=1 + len(model.tasks)).save(tmp, format="PNG")
    tracker = make_tracker(cfg.tracking)
    if tracker is not None:
        tracker.start(run_id=ckpt.get("mlflow_run_id"), run_name="evaluate",
                      tags={"densepipe.stage": "evaluate"})
        tracker.log_metrics(metrics, int(ckpt["step"]))
        tracker.log_artifact(metrics_path)
        for path in [grid_path, *artifacts]:
            if path.exists():
                tracker.log_artifact(path)
        tracker.finish()
    return metrics


# -- predict ------------------------------------------------------------------------------------
def predict(cfg: Config, images: list[str | Path], *, checkpoint: str | Path,
            out_dir: str | Path) -> list[str]:
    """Run the checkpoint's model (its own stored config) on image files.

    Writes ``<stem>_<task>_vis.png`` and each task's raw outputs into ``out_dir``."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.engine.trainer import load_trained_model, resolve_device

    device = resolve_device(cfg.train.device)
    model, _ = load_trained_model(None, checkpoint, device=device)  # its own config and card
    card = model.card
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for image_path in map(Path, images):
        try:
            with Image.open(image_path) as im:
                rgb = np.array(im.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise DataError(image_path, f"cannot read image ({type(e).__name__})") from None
        batch = {"image": torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).contiguous(),
                 "image_ids": [0], "has": {}}
        predictions = model.predict(batch)
        for name, task in model.tasks.items():
            pred = predictions[name][0]
            vis = task.visualize(rgb, pred, card=card)
            vis_path = out / f"{image_path.stem}_{name}_vis.png"
            with atomic_path(vis_path) as tmp:
                Image.fromarray(vis).save(tmp, format="PNG")
            written.append(str(vis_path))
            written += task.save_prediction(pred, str(out / image_path.stem), card=card)
    return written
