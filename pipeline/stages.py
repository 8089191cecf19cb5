"""The pipeline stages: what the CLI, DVC and Prefect all call.

- ``prepare(cfg)``: render the synthetic world into ``data.root`` (or check a user's folder).
- ``train(cfg)``: train or resume; checkpoints in ``train.out_dir``; MLflow run.
- ``evaluate(cfg)``: every task's evaluator on the val split; ``metrics.json``; MLflow run.
- ``register(cfg)``: the trained model as a new version in the MLflow model registry.
- ``predict(cfg, images, checkpoint | model_uri, out_dir)``: visualisations and raw outputs per image.

Each takes ``parent_run_id`` (except predict) so a pipeline run nests one MLflow run per stage.

Imports inside functions: each stage imports the engine, MLflow (``pipeline.tracking``), the
exporters and the dataset checks it needs when it runs. ``densepipe`` imports this module on
every call, so it loads no torch at import (``tests/test_import_cost.py``), and each DVC stage's
deps in ``dvc.yaml`` stay exactly the code it runs: ``prepare`` does not rerun when the trainer
changes (``tests/test_layering.py``, ``tests/test_dvc.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.config import Config, check_metric, check_tasks, resolve_best_metric, unrecorded_reads
from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError, TrackingError
from pipeline.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

TRAIN_SUMMARY = "train_summary.json"
"""Written by ``train`` into ``train.out_dir`` (rank 0): the summary it returns."""


# -- prepare ------------------------------------------------------------------------------------
def _wanted_synthetic(cfg: Config) -> dict[str, Any]:
    syn = cfg.data.synthetic
    return {"seed": syn.seed, "image_size": syn.image_size,
            "num_train": syn.num_train, "num_val": syn.num_val}


def dataset_ready(cfg: Config) -> bool:
    """True when ``data.root`` already holds what ``prepare`` would make: for the synthetic
    source, a render with the same seed, sizes and generator version; for another format, what
    the format calls ready (``DatasetFormat.ready``: densepipe's layout, its card). With
    ``data.sources``: every source."""
    if cfg.data.sources:
        from pipeline.data.sources import views as source_views

        return all(dataset_ready(view.cfg) for view in source_views(cfg))
    root = Path(cfg.data.root)
    if cfg.data.source != "synthetic":
        from pipeline.engine.loaders import dataset_format

        fmt, options = dataset_format(cfg)
        return fmt.ready(root, options=options)
    if not (root / "meta.json").exists():
        return False
    from pipeline.data.synthetic.spec import GENERATOR_VERSION

    extra = DatasetCard.load(root / "meta.json").extra
    have = {"seed": extra.get("seed"), "image_size": extra.get("image_size"),
            "num_train": extra.get("splits", {}).get("train"),
            "num_val": extra.get("splits", {}).get("val")}
    return have == _wanted_synthetic(cfg) and extra.get("generator_version") == GENERATOR_VERSION


def prepare(cfg: Config, *, parent_run_id: str | None = None) -> dict[str, Any]:
    """Make ``data.root`` ready (every source's, with ``data.sources``). Synthetic: render it
    unless an identical render is there (only into a new or empty folder or over its own earlier
    render: ``synthetic.ownership``). A user's folder (``data.source: folder``) is only read:
    ``pipeline.data.check.check_dataset`` checks every referenced file and reports all problems in
    one ``DataError``.

    With ``parent_run_id`` (a pipeline run), the stage is a nested MLflow run with the data params."""
    with _stage_run(cfg, "prepare", parent_run_id=parent_run_id) as tracker:
        if tracker is not None:
            tracker.log_params({k: v for k, v in cfg.flat().items() if k.startswith("data.")})
        summary = _prepare_sources(cfg) if cfg.data.sources else _prepare_data(cfg)
        if tracker is not None:
            tracker.log_metrics({k: float(v) for k, v in summary.items()
                                 if isinstance(v, int | float) and not isinstance(v, bool)}, 0)
            summary["run_id"] = tracker.run_id
    return summary


def _prepare_sources(cfg: Config) -> dict[str, Any]:
    """``_prepare_data`` of every ``data.sources`` entry: ``{"sources": {name: summary}}``."""
    from pipeline.data.sources import views as source_views

    return {"sources": {view.name: _prepare_data(view.cfg) for view in source_views(cfg)}}


def _prepare_data(cfg: Config) -> dict[str, Any]:
    """``prepare``'s work, untracked: its summary."""
    root = Path(cfg.data.root)
    if cfg.data.source == "synthetic":
        wanted = _wanted_synthetic(cfg)
        if dataset_ready(cfg):
            log.info("%s already holds this synthetic dataset; nothing to do", root)
            summary: dict[str, Any] = {"root": str(root), "rendered": False, **wanted}
        else:
            from pipeline.data.synthetic import write_synthetic_dataset

            t0 = time.perf_counter()
            rendered = write_synthetic_dataset(root, num_train=wanted["num_train"],
                                               num_val=wanted["num_val"],
                                               image_size=wanted["image_size"], seed=wanted["seed"],
                                               workers=cfg.data.synthetic.workers)
            summary = {"root": str(root), "rendered": True, "seconds": time.perf_counter() - t0,
                       **wanted,
                       **{k: v for k, v in rendered.items() if isinstance(v, int | float | str)}}
    else:
        from pipeline.engine.loaders import dataset_format

        fmt, options = dataset_format(cfg)
        checked = fmt.check(root, (cfg.data.train_split, cfg.data.val_split), options=options)
        summary = {"rendered": False, **checked}
    return summary


@contextlib.contextmanager
def _stage_run(cfg: Config, name: str, *, parent_run_id: str | None) -> Iterator[Any]:
    """The block as MLflow run ``name`` nested under ``parent_run_id`` (the ``Tracker``; FAILED
    with the error as tag ``densepipe.error`` if the block raises), or ``None`` without a parent
    or with tracking off."""
    if parent_run_id is None or not cfg.tracking.enabled:  # `densepipe prepare` imports no MLflow
        yield None
        return
    from pipeline.tracking import make_tracker

    tracker = make_tracker(cfg.tracking, parent_run_id=parent_run_id)
    assert tracker is not None
    with tracker.running(run_name=name, tags={"densepipe.stage": name}):
        yield tracker


def check_config(cfg: Config) -> None:
    """Fail fast, before any data is read or file written: unknown tasks (in ``model.tasks``,
    ``model.heads``, ``model.loss_weights``), each enabled task's options (``Task.parse_options``
    of ``model.heads.<task>``; the dataset-dependent part, ``resolve_options``, needs the data),
    the backbone, and ``train.best_metric`` / ``train.early_stopping.metric``
    (``pipeline.config.check_metric``; ``auto`` with no main metric to pick is refused only when
    early stopping needs it), ``data.source`` and ``data.options``. ``densepipe config`` runs it
    too."""
    with unrecorded_reads():  # validation reads every section; the stages record what they use
        _check_config(cfg)


def _check_config(cfg: Config) -> None:
    from pipeline.data.sources import views as source_views
    from pipeline.engine.loaders import dataset_format
    from pipeline.nn.backbones import BACKBONES, known_backbone
    from pipeline.registry import default_registry

    for view in source_views(cfg):
        dataset_format(view.cfg)  # data.source and data.options (each source's)
    registry = default_registry()
    check_tasks(cfg, registry.names)
    enabled = registry.resolve(cfg.model.tasks)
    for i, src in enumerate(cfg.data.sources):
        unknown = [t for t in src.tasks or [] if t not in {e.name for e in enabled}]
        if unknown:
            raise ConfigError(f"data.sources[{i}] ({src.name}).tasks: {unknown[0]!r} is not an "
                              f"enabled task; enabled: {', '.join(e.name for e in enabled)}")
    for task in enabled:
        task.parse_options(cfg.model.heads.get(task.name))
    if not known_backbone(cfg.model.backbone):
        raise ConfigError(f"model.backbone: unknown backbone {cfg.model.backbone!r}; "
                          f"allowed: {', '.join(sorted(BACKBONES))} or timm:<model name>")
    best = resolve_best_metric(cfg.train.best_metric, cfg.model.tasks, enabled, cfg.data.sources)
    if best is not None and cfg.train.best_metric != "auto":
        check_metric("train.best_metric", best, enabled, cfg.data.sources)
    stop = cfg.train.early_stopping
    if stop.metric is not None:
        check_metric("train.early_stopping.metric", stop.metric, enabled, cfg.data.sources)
    elif stop.patience > 0 and best is None:
        raise ConfigError(f"train.early_stopping.patience={stop.patience}: no metric to watch: "
                          f"train.best_metric is auto and no enabled task "
                          f"({', '.join(t.name for t in enabled)}) has a main_metric; set "
                          "train.early_stopping.metric or train.best_metric")


def check_labels(cfg: Config, label_kinds: Iterable[str], *, split: str,
                 tasks: Iterable[str] | None = None) -> None:
    """Refuse a task (of ``tasks``, default ``model.tasks``, or one they enable) whose required
    label kinds (``Task.requires``) are absent from split ``split`` (``label_kinds``): it would
    train at zero loss and vanish from the metrics. One ``ConfigError`` naming the task and the
    kind."""
    from pipeline.registry import default_registry

    have = set(label_kinds)
    named = list(cfg.model.tasks if tasks is None else tasks)
    tasks_ = default_registry().resolve(named)
    for task in tasks_:
        lacking = [k for k in task.requires if k not in have]
        if not lacking:
            continue
        users = [t.name for t in tasks_ if task.name in t.depends_on]
        why = f" (enabled by {', '.join(users)})" if task.name not in named and users else ""
        found = ", ".join(sorted(have)) or "none"
        raise ConfigError(f"model.tasks: task '{task.name}'{why} needs {' and '.join(lacking)} "
                          f"labels, but split '{split}' of {cfg.data.root} has none (label kinds "
                          f"found: {found}); remove the task from model.tasks or add "
                          f"{lacking[0]} labels (docs/own-data.md)")


def _check_train_labels(cfg: Config) -> None:
    """``check_labels`` for the train split (every source's, with ``data.sources``: a task needs
    labels in one of them), from which label files exist (no JSON parsed); nothing when no
    dataset is there yet (training then says so)."""
    from pipeline.data.sources import views as source_views
    from pipeline.engine.loaders import dataset_format, required_label_kinds

    have: set[str] = set()
    known = False
    for view in source_views(cfg):
        fmt, options = dataset_format(view.cfg)
        kinds = fmt.split_label_kinds(Path(view.cfg.data.root), view.cfg.data.train_split,
                                      options=options)
        if kinds is None:
            continue
        known = True
        have |= set(kinds) if view.tasks is None else set(kinds) & set(required_label_kinds(view.tasks))
    if known:
        check_labels(cfg, have, split=cfg.data.train_split)


# -- train --------------------------------------------------------------------------------------
def train(cfg: Config, *, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train (resuming from ``last.pt``), log to MLflow; returns a summary dict (``model_uri``:
    the logged MLflow model, when ``tracking.log_model``).

    ``parent_run_id``: nest a new training run under this pipeline run. Under torchrun every
    process runs this; only rank 0 tracks, writes the loss curve and logs the model, and the
    process group is closed at the end."""
    from pipeline.engine import distributed
    from pipeline.engine.trainer import MLflowTracking
    from pipeline.engine.trainer import train as run_training
    from pipeline.tracking import make_tracker

    check_config(cfg)
    _check_train_labels(cfg)
    out_dir = Path(cfg.train.out_dir)
    main = distributed.env_from_torchrun().is_main
    tracker = make_tracker(cfg.tracking, parent_run_id=parent_run_id) if main else None
    if tracker is not None:
        tracker.check_reachable()  # before any training: no GPU hours go untracked
    try:
        result = run_training(cfg, trainer_hooks=[MLflowTracking(tracker)] if tracker is not None else [])
        summary = {"step": result.step, "steps_run": len(result.losses), "out_dir": str(out_dir),
                   "best": str(result.best), "last": str(result.last), "metrics": result.metrics,
                   "run_id": result.run_id, "images_per_s": result.images_per_s,
                   "skipped_nonfinite": result.skipped_nonfinite,
                   "stopped_early": result.stopped_early, "model_uri": None}
        if tracker is not None and tracker.run_id is not None:  # None: nothing was trained
            tracker.log_artifact(out_dir / "config.yaml")
            if result.losses and result.best is not None and result.best.exists():
                tracker.log_artifact(result.best, "checkpoints")
                if cfg.tracking.log_model:  # not again when the run was already complete
                    summary["model_uri"] = log_trained_model(cfg, tracker, result.best)
    except BaseException as e:
        if tracker is not None:
            tracker.fail(e)
        raise
    finally:
        distributed.destroy()
    if not main:
        return summary
    if tracker is not None:
        tracker.finish()
    _report_train_lineage(cfg, summary, tracker=tracker, parent_run_id=parent_run_id)
    atomic_write_json(out_dir / TRAIN_SUMMARY, summary)
    return summary


def _report_train_lineage(cfg: Config, summary: dict[str, Any], *, tracker: Any,
                          parent_run_id: str | None) -> None:
    """Say what a training that did not simply train under ``parent_run_id`` did. Nothing
    trained (the checkpoint is already at ``train.steps`` or stopped early): a warning, and on
    the pipeline run tag ``densepipe.skipped.train`` naming the run that trained it. A run
    resumed from an earlier pipeline or a standalone ``train``: it keeps its parent, and the
    pipeline run gets tag ``densepipe.resumed.train`` naming it."""
    from pipeline.tracking import SKIPPED_TAG

    run_id = summary.get("run_id")
    from_run = f"; trained in MLflow run {run_id}" if run_id else ""
    if summary["steps_run"] == 0:
        why = "stopped early" if summary.get("stopped_early") else f"at step {summary['step']} of " \
            f"train.steps={cfg.train.steps}"
        note = f"nothing trained: {summary['last']} is already {why}{from_run}"
        log.warning("%s", note)
        if tracker is not None and parent_run_id is not None:
            tracker.client.set_tag(parent_run_id, SKIPPED_TAG.format(stage="train"), note)
        return
    if tracker is None or parent_run_id is None or run_id is None:
        return
    parent = tracker.parent_of(run_id)
    if parent != parent_run_id:
        start = summary["step"] - summary["steps_run"]
        where = f"nested under run {parent}" if parent else "a top-level run"
        tracker.client.set_tag(parent_run_id, "densepipe.resumed.train",
                               f"resumed MLflow run {run_id} ({where}) at step {start}, "
                               f"trained {summary['steps_run']} steps to step {summary['step']}")


def log_trained_model(cfg: Config, tracker: Any, checkpoint: Path) -> str:
    """Log the checkpoint's model (EMA weights when kept) in the tracker's run as an MLflow
    model of weights plus config (``pipeline.model_store``: no pickled object), whose metadata
    holds the step, the tasks and the config; returns its URI."""
    from pipeline.engine.trainer import load_trained_model
    from pipeline.model_store import model_payload

    model, ckpt = load_trained_model(cfg, checkpoint)
    config = cfg.model_dump(mode="json")
    metadata = {"step": int(ckpt["step"]), "tasks": list(model.tasks),
                "train_run_id": tracker.run_id, "config": config}
    payload = model_payload(model, config=config, step=int(ckpt["step"]), train_run_id=tracker.run_id)
    return tracker.log_model(payload, metadata=metadata)


# -- evaluate -----------------------------------------------------------------------------------
def evaluate(cfg: Config, checkpoint: str | Path | None = None, *, model_uri: str | None = None,
             parent_run_id: str | None = None) -> dict[str, float]:
    """Evaluate a checkpoint (or the MLflow model ``model_uri``) on ``data.val_split``; write
    ``evaluate.metrics_file``, the visualisations and plot data under ``evaluate.out_dir``.

    MLflow: a run named ``evaluate`` nested under ``parent_run_id`` (a pipeline run) or else under
    the run that trained the model; the metrics are also logged on that parent so the runs table
    compares them. Returns the flat ``{"task/metric": float}`` dict (ratios in [0, 1])."""
    from pipeline.data.sources import labelled_metrics, with_source
    from pipeline.data.sources import views as source_views
    from pipeline.engine.evaluation import evaluate_model
    from pipeline.engine.loaders import eval_datasets, eval_loader, loaded_kinds
    from pipeline.engine.trainer import resolve_device
    from pipeline.tracking import make_tracker
    from pipeline.trained_model import load_model_to_evaluate
    from pipeline.viz import panel_grid

    check_config(cfg)
    device = resolve_device(cfg.train.device)
    datasets = eval_datasets(cfg)
    # a task needs labels in the split (of one of the sources, with data.sources)
    kinds = {k for ds in datasets.values() for k in loaded_kinds(ds)}
    every = source_views(cfg)
    where = every[0].cfg if len(every) == 1 else cfg  # the one dataset's root in messages
    if model_uri is None:  # a checkpoint's model is built with model.tasks: refuse before loading
        check_labels(where, kinds, split=where.data.val_split)
    first = next(iter(datasets.values()))
    model, step, train_run_id, source = load_model_to_evaluate(
        cfg, checkpoint=checkpoint, model_uri=model_uri, card=first.card, device=device)  # type: ignore[attr-defined]
    if model_uri is not None:  # a registered model's own tasks
        check_labels(where, kinds, split=where.data.val_split, tasks=list(model.tasks))
    metrics: dict[str, float] = {}
    artifacts: list[Path] = []
    grids: list[Path] = []
    for name, dataset in datasets.items():
        loader = eval_loader(cfg, dataset, batch_size=cfg.evaluate.batch_size)
        out_dir = Path(cfg.evaluate.out_dir) / name if name else Path(cfg.evaluate.out_dir)
        found, drawings = evaluate_model(model, loader, device=device,
                                         num_visualizations=cfg.evaluate.num_visualizations,
                                         artifacts_dir=out_dir, saved=artifacts)
        if name:  # one of data.sources: only the tasks it has labels for
            found = labelled_metrics(found, model.tasks, loaded_kinds(dataset))
        metrics.update(with_source(found, name))
        if drawings:
            grids.append(out_dir / "vis_grid.png")
            with atomic_path(grids[-1]) as tmp:
                panel_grid(drawings, ncols=1 + len(model.tasks)).save(tmp, format="PNG")
    metrics = dict(sorted(metrics.items()))
    metrics_path = Path(cfg.evaluate.metrics_file)
    atomic_write_json(metrics_path, metrics)
    parent = parent_run_id or train_run_id
    tracker = make_tracker(cfg.tracking, parent_run_id=parent)
    if tracker is not None:
        if parent is not None and tracker.run_exists(parent):
            tracker.run_id = parent
            tracker.log_metrics(metrics, step)
        else:
            tracker.parent_run_id = None  # a model from another store: a top-level run
        with tracker.running(run_name="evaluate", tags={"densepipe.stage": "evaluate"}):
            tracker.log_params({"evaluate.model": source, "data.val_split": cfg.data.val_split,
                                "data.root": cfg.data.root})
            tracker.log_metrics(metrics, step)
            tracker.log_artifact(metrics_path)
            for path in [*grids, *artifacts]:
                if path.exists():
                    tracker.log_artifact(path)
    return metrics


# -- register -----------------------------------------------------------------------------------
def register(cfg: Config, *, checkpoint: str | Path | None = None, model_uri: str | None = None,
             metrics: dict[str, float] | None = None, parent_run_id: str | None = None) -> dict[str, str]:
    """Add the trained model to the MLflow model registry as a new version of
    ``tracking.registered_model``, tagged with its metrics (``metrics.json`` when not given) and
    described by them; the model's metadata holds the config.

    ``model_uri``: the model ``train`` logged; otherwise the checkpoint's model (default
    ``default_checkpoint``) is logged first, in its training run. Returns ``{"name", "version",
    "model_uri": "models:/<name>/<version>", "run_id"}``."""
    from pipeline.engine.checkpoint import load_checkpoint
    from pipeline.metrics import headline_metrics
    from pipeline.tracking import make_tracker
    from pipeline.trained_model import default_checkpoint

    tracker = make_tracker(cfg.tracking, parent_run_id=parent_run_id)
    if tracker is None:
        raise ConfigError("register: tracking.enabled is false; the model registry is MLflow's")
    if metrics is None:
        path = Path(cfg.evaluate.metrics_file)
        metrics = json.loads(path.read_text()) if path.exists() else {}
    if model_uri is None:
        path = Path(checkpoint) if checkpoint else default_checkpoint(cfg)
        train_run_id = load_checkpoint(path).get("mlflow_run_id")
        if train_run_id is None or not tracker.run_exists(train_run_id):
            raise TrackingError(f"{path}: its training run ({train_run_id}) is not in {tracker.uri}; "
                                "register from the store that tracked the training")
        tracker.run_id = train_run_id
        model_uri = log_trained_model(cfg, tracker, path)
    else:
        from pipeline.tracking import load_registered_model_info

        train_run_id = load_registered_model_info(model_uri, tracking_uri=tracker.uri).get("train_run_id")
    name = cfg.tracking.registered_model
    headline = headline_metrics(metrics)
    lines = [f"| {k} | {v:.4f} |" for k, v in headline.items()]
    description = "\n".join(["densepipe model, validation metrics:", "", "| metric | value |",
                              "|---|---|", *lines])
    tags = {f"metric.{k}": f"{v:.6g}" for k, v in headline.items()}
    tags["tasks"] = ",".join(cfg.model.tasks)
    with tracker.running(run_name="register", tags={"densepipe.stage": "register"}):
        version = tracker.register_model(model_uri, name=name, source_run_id=train_run_id, tags=tags,
                                         description=description)
        tracker.log_params({"register.name": name, "register.version": version,
                            "register.source": model_uri})
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}",
            "run_id": tracker.run_id or ""}


# -- predict ---------------------------------------------------------------------------------
def predict(cfg: Config, images: list[str | Path], *, checkpoint: str | Path | None = None,
            model_uri: str | None = None, out_dir: str | Path, batch_size: int | None = None,
            num_workers: int | None = None, vis: bool = True, eval_files: bool = False,
            coco_gt: str | Path | None = None, progress: bool = True) -> list[str]:
    """Run a trained model on image files, folders and glob patterns (``images``): the
    checkpoint's (with its own stored config) or the MLflow model ``model_uri``
    (``models:/densepipe/latest``); one of them is required. Returns the written paths.

    Writes the layout of ``pipeline.predict`` into ``out_dir``: ``<task>/<name>_<task>.<ext>``
    (raw outputs), ``vis/<task>/<name>.png`` (unless ``vis`` is false), ``eval/`` (files the
    standalone evaluators read, with ``eval_files`` or ``coco_gt``: a COCO JSON whose ``images``
    give the image ids) and ``predict_manifest.json``; ``<name>`` is the input's path relative to
    the folder given, without extension. Batches of ``batch_size`` (default
    ``evaluate.batch_size``) same-size images, read by ``num_workers`` processes (default
    ``data.num_workers``); predictions at each image's original resolution. All or nothing: every
    image is read before the model is loaded, outputs are staged in a temporary folder inside
    ``out_dir`` and moved into place only when every image succeeded, so a failing run leaves
    ``out_dir`` as it was (not created when it did not exist); a file there that an earlier
    predict did not write is never replaced. ``progress``: items/s and ETA on a terminal's stderr,
    and a summary line."""
    from pipeline.predict import run_predict

    return run_predict(cfg, images, checkpoint=checkpoint, model_uri=model_uri, out_dir=out_dir,
                       batch_size=batch_size, num_workers=num_workers, vis=vis,
                       eval_files=eval_files, coco_gt=coco_gt, progress=progress)
