"""``densepipe``: the command line over ``pipeline.stages`` and the standalone evaluators.

Every command reads ``params.yaml`` (``--params``) with ``--set a.b=c`` overrides. Errors a user can
fix are printed as one ``error: ...`` line with exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.errors import DensepipeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Multi-task dense prediction: prepare, train, evaluate, predict.")
# markup off: paths, URIs and messages are the user's text and are printed literally
# (a path with "[/x]" or "my[red]ck.pt" is not rich markup)
out = Console(markup=False)
err = Console(stderr=True, markup=False)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Config file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: KEY=VALUE (YAML value).")]


def _config(params: Path, overrides: list[str] | None):
    from pipeline.config import load_config

    return load_config(params, overrides or [])


def _metrics_table(metrics: dict[str, float], title: str = "metrics") -> Table:
    """The headline ``task/metric`` rows of a flat metrics dict as a rich table."""
    # imported here, not at the top: `densepipe prepare` (a DVC stage) must not depend on pipeline.metrics
    from pipeline.metrics import headline_metrics

    metrics = headline_metrics(metrics)
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    return table


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Render the synthetic dataset into data.root (or check a user's dataset folder)."""
    from pipeline import stages

    summary = stages.prepare(_config(params, set_))
    out.print(json.dumps(summary, indent=2, sort_keys=True))


ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="MLflow model URI, e.g. models:/densepipe/latest (instead of --checkpoint).")]


@app.command()
def train(
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
    parent_run_id: Annotated[str | None, typer.Option(
        help="Nest the MLflow run under this run (a pipeline run).")] = None,
) -> None:
    """Train the configured tasks; resumes from <train.out_dir>/last.pt."""
    from pipeline import stages
    from pipeline.engine.distributed import env_from_torchrun

    summary = stages.train(_config(params, set_), parent_run_id=parent_run_id)
    if not env_from_torchrun().is_main:
        return
    out.print(f"trained to step {summary['step']}: best {summary['best']} "
              f"({summary['images_per_s']:.1f} img/s), MLflow run {summary['run_id']}")


@app.command()
def evaluate(
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Default: best.pt of train.out_dir.")] = None,
    model: ModelOpt = None,
) -> None:
    """Evaluate a checkpoint (or a registered MLflow model) on the val split; writes metrics.json."""
    from pipeline import stages

    cfg = _config(params, set_)
    metrics = stages.evaluate(cfg, checkpoint, model_uri=model)
    out.print(_metrics_table(metrics))
    out.print(f"wrote {cfg.evaluate.metrics_file}")


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    checkpoint: Annotated[Path | None, typer.Option(
        help="Checkpoint (its own model config is used).")] = None,
    model: ModelOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("predictions"),
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
) -> None:
    """Predict every task for image files: visualisations plus raw outputs."""
    from pipeline import stages

    files = stages.predict(_config(params, set_), list(images), checkpoint=checkpoint,
                           model_uri=model, out_dir=out_dir)
    out.print(f"wrote {len(files)} files to {out_dir}")


@app.command()
def register(
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Default: best.pt of train.out_dir.")] = None,
) -> None:
    """Add the trained model to the MLflow model registry (tracking.registered_model)."""
    from pipeline import stages

    result = stages.register(_config(params, set_), checkpoint=checkpoint)
    out.print(f"registered {result['model_uri']} (load it with --model models:/{result['name']}/latest)")


@app.command()
def tasks(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False) -> None:
    """List task plugins: name, provider, requires, depends_on, shares_with, input view, status."""
    from pipeline.registry import default_registry

    rows = [e.describe() for e in default_registry().entries()]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="densepipe tasks")
    for col in ("name", "provider", "requires", "depends_on", "shares_with", "input view", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["provider"], ", ".join(r["requires"]) or "-",
                      ", ".join(r["depends_on"]) or "-", ", ".join(r.get("shares_with", [])) or "-",
                      r["input_view"] or "-", r["status"])
    out.print(table)


@app.command("semseg-eval")
def semseg_eval(
    gt_dir: Annotated[Path, typer.Option(help="Ground-truth label PNGs.")],
    pred_dir: Annotated[Path, typer.Option(help="Predicted label PNGs (same file names).")],
    num_classes: Annotated[int, typer.Option(help="Number of classes.")],
    ignore: Annotated[int, typer.Option(help="Ignore label in the ground truth.")] = 255,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics here.")] = None,
) -> None:
    """Semantic segmentation metrics over two folders of label PNGs."""
    from pipeline.io import atomic_write_json
    from pipeline.metrics.semseg_files import evaluate_label_folders, format_semseg_table

    metrics = evaluate_label_folders(gt_dir, pred_dir, num_classes=num_classes, ignore_index=ignore)
    out.print(format_semseg_table(metrics))
    if json_out is not None:
        atomic_write_json(json_out, metrics)


@app.command("coco-eval")
def coco_eval(
    gt: Annotated[Path, typer.Option("--gt", help="COCO ground-truth JSON.")],
    pred: Annotated[Path, typer.Option("--pred", help="COCO results JSON (a list of detections).")],
    iou_type: Annotated[str, typer.Option("--type", help="bbox, segm or keypoints.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write {name: value} stats here.")] = None,
    sigmas: Annotated[str | None, typer.Option(help="Keypoint OKS sigmas, comma-separated.")] = None,
) -> None:
    """COCO AP/AR of a results file against a ground truth (pycocotools)."""
    from pipeline.errors import ConfigError
    from pipeline.io import atomic_write_json
    from pipeline.metrics.coco import evaluate_coco, format_coco_table

    kpt_sigmas = None
    if sigmas is not None:
        try:
            kpt_sigmas = [float(s) for s in sigmas.split(",")]
        except ValueError:
            raise ConfigError(f"--sigmas {sigmas!r}: expected comma-separated numbers, "
                              f"e.g. 0.026,0.025,0.025") from None
    result = evaluate_coco(gt, pred, iou_type, kpt_oks_sigmas=kpt_sigmas)  # type: ignore[arg-type]
    sys.stdout.write(format_coco_table(result))
    if json_out is not None:
        atomic_write_json(json_out, result.named())


@app.command("panoptic-eval")
def panoptic_eval(
    gt_json: Annotated[Path, typer.Option("--gt-json", help="Ground-truth COCO panoptic JSON.")],
    gt_dir: Annotated[Path, typer.Option("--gt-dir", help="Folder of the ground-truth PNGs.")],
    pred_json: Annotated[Path, typer.Option("--pred-json", help="Predicted COCO panoptic JSON.")],
    pred_dir: Annotated[Path, typer.Option("--pred-dir", help="Folder of the predicted PNGs.")],
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write the groups, per-class scores and metric names (ratios) here.")] = None,
    workers: Annotated[int, typer.Option(help="Processes sharing the images.")] = 1,
) -> None:
    """PQ, SQ and RQ (percent) of COCO panoptic predictions, as panopticapi computes them."""
    from pipeline.io import atomic_write_json
    from pipeline.metrics.panoptic_files import evaluate_panoptic_files

    result = evaluate_panoptic_files(gt_json, gt_dir, pred_json, pred_dir, workers=workers)
    sys.stdout.write(result.table())
    if json_out is not None:
        atomic_write_json(json_out, result.to_json())


@app.command("show-sample")
def show_sample(
    index: Annotated[int, typer.Option(help="Sample index in the split.")] = 0,
    split: Annotated[str, typer.Option(help="Split name.")] = "val",
    out_path: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("sample.png"),
    root: Annotated[Path | None, typer.Option(help="Dataset root (default data.root).")] = None,
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
) -> None:
    """Draw one sample with every label side by side."""
    from pipeline.data.show import show_sample as draw

    data_root = root or Path(_config(params, set_).data.root)
    path = draw(data_root, split, index, out_path)
    out.print(f"wrote {path}")


@app.command()
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Run the whole pipeline once as a Prefect flow (prepare, train, evaluate, register)."""
    from flows.pipeline import pipeline_flow  # first: flows/__init__ sets Prefect's defaults
    from flows.server import check_api

    cfg = _config(params, set_)  # fail fast on a bad config, before Prefect starts
    from prefect.settings import get_current_settings  # after flows (see above)

    if get_current_settings().api.url:  # a configured server must answer (else: temporary server)
        check_api(str(get_current_settings().api.url).rstrip("/"), timeout_s=10.0)
    metrics = pipeline_flow(params=str(params), overrides=list(set_ or []))
    out.print(_metrics_table(metrics, title=f"metrics ({cfg.evaluate.metrics_file})"))


@app.command()
def serve(
    cron: Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 3 * * *".')] = None,
    interval: Annotated[float | None, typer.Option(help="Seconds between runs.")] = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    timezone: Annotated[str | None, typer.Option(help="IANA time zone of the schedule (UTC).")] = None,
    api_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the Prefect server's health check.")] = 10.0,
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
) -> None:
    """Serve the pipeline flow on a schedule against the Prefect server at PREFECT_API_URL.

    Prefect's temporary server cannot schedule: `make serve` starts a local server when none is set.
    Runs execute here, one at a time, until Ctrl-C (which pauses the schedule).
    """
    from flows.serve import serve_pipeline, validate_schedule

    validate_schedule(cron=cron, interval=interval, timezone=timezone)
    _config(params, set_)  # fail fast on a bad config, before contacting Prefect
    serve_pipeline(cron=cron, interval=interval, name=name, timezone=timezone,
                   params=str(params), overrides=list(set_ or []), api_timeout_s=api_timeout)


@app.command("config")
def show_config(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Print the resolved configuration as YAML."""
    import yaml

    sys.stdout.write(yaml.safe_dump(_config(params, set_).model_dump(mode="json"), sort_keys=False))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app(standalone_mode=False)
    except DensepipeError as e:
        err.print(f"error: {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click usage errors carry their own formatting
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
