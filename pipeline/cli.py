"""``densepipe``: the command line over ``pipeline.stages`` and the standalone evaluators.

Every command reads ``params.yaml`` (``--params``) with ``--set a.b=c`` overrides. Errors a user can
fix are printed as one ``error: ...`` line with exit code 2.

Ctrl-C (SIGINT) and SIGTERM (``kill``, systemd, Kubernetes) stop a command the same way: the work is
interrupted as by Ctrl-C (``KeyboardInterrupt``, so the stages end the MLflow runs they opened
KILLED), one ``error: stopped by SIGTERM`` line is printed and the exit code is the shell's 128 + the
signal number: 130 for SIGINT, 143 for SIGTERM. A command that has not ended ``STOP_GRACE_S`` seconds
after the signal, or that gets a second one, exits at once with that code. ``densepipe serve`` is
the exception: it stops serving, pauses its schedule and exits 0 (``flows.serve``).

Every command imports what it needs inside its function: ``densepipe --help``, ``config`` and a
bad ``--set`` answer without loading torch, MLflow or Prefect (``tests/test_import_cost.py``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import yaml
from rich.console import Console
from rich.table import Table

from pipeline import stages
from pipeline.config import check_registry_tracking, load_config
from pipeline.errors import ConfigError, DensepipeError
from pipeline.stages import check_config

# Imports inside functions: every `densepipe` call and every DVC stage imports this module: it
# loads no torch (tests/test_import_cost.py) and, at import time, no module that some stage does
# not list in dvc.yaml (tests/test_layering.py).

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Multi-task dense prediction: prepare, train, evaluate, predict.")
# markup off: paths, URIs and messages are the user's text and are printed literally
# (a path with "[/x]" or "my[red]ck.pt" is not rich markup)
out = Console(markup=False)
err = Console(stderr=True, markup=False)

STOP_GRACE_S = 10.0
"""Seconds a command may take to wind down after SIGINT/SIGTERM before it exits regardless."""
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _Stop:
    """What the SIGINT/SIGTERM handler knows: the signals it handles, the first one received, and
    what to do before giving up."""

    handled: set[signal.Signals] = set()
    received: signal.Signals | None = None
    reported = False
    before_exit: list[Callable[[], None]] = []  # run (errors ignored) before a forced exit


def _on_stop_signal(signum: int, frame: object) -> None:
    """SIGINT/SIGTERM handler: the first signal raises ``KeyboardInterrupt`` (what Ctrl-C does) and
    starts a ``STOP_GRACE_S`` deadline; a second signal, or the deadline, ends the process at once."""
    if _Stop.received is not None:
        _exit_now()
    _Stop.received = signal.Signals(signum)
    _quiet_background_errors()
    deadline = threading.Timer(STOP_GRACE_S, _exit_now)
    deadline.daemon = True
    deadline.start()
    raise KeyboardInterrupt


def _quiet_background_errors() -> None:
    """After a stop: no reports from Prefect's background workers that cannot deliver logs and
    events (under systemd the same SIGTERM may have stopped the server; each undelivered event was a
    screen-long line). Flow and task run lines (``Crash detected! ...``) still show."""
    logging.raiseExceptions = False  # Prefect's API log worker prints "--- Error logging to API ---"
    for name in ("prefect._internal", "prefect.events"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.CRITICAL)
        for handler in logger.handlers:  # prefect._internal's loggers ignore logger levels
            handler.setLevel(logging.CRITICAL)


def _stop_on_signals() -> dict[signal.Signals, Any]:
    """Install ``_on_stop_signal`` for SIGINT and SIGTERM, except where the signal is ignored (a
    background job's SIGINT, ``nohup``): an ignored signal stays ignored. Returns the handlers
    it replaced (for ``signal.signal``)."""
    _Stop.received, _Stop.reported = None, False
    _Stop.before_exit.clear()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _on_stop_signal)
    _Stop.handled = set(previous)
    return previous


def _stop_code() -> int:
    """Print the one line about the stop (once) and return its exit code, 128 + the signal number."""
    sig = _Stop.received or signal.SIGINT
    if not _Stop.reported:
        _Stop.reported = True
        err.print(f"error: stopped by {sig.name}", highlight=False, soft_wrap=True)
    return 128 + sig


def _exit_now() -> None:
    """End the process with the stop's exit code, without waiting for anything else: after
    ``before_exit`` (e.g. stopping a temporary Prefect server), bypassing atexit handlers that may
    wait on a server the same signal took down."""
    for action in _Stop.before_exit:
        try:
            action()
        except Exception:  # noqa: S110 - best effort on the way out
            pass
    code = _stop_code()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def _log_to_stderr() -> None:
    """Plain WARNING logging to stderr for the commands that do not run Prefect (its own logging
    configuration leaves a root logger that already has a handler alone: see
    ``flows.local_run.prefect_console_logging``, which removes this handler, named ``densepipe``)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.set_name("densepipe")
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Config file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: KEY=VALUE (YAML value).")]


def _config(params: Path, overrides: list[str] | None):
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
    cfg = _config(params, set_)
    metrics = stages.evaluate(cfg, checkpoint, model_uri=model)
    out.print(_metrics_table(metrics))
    out.print(f"wrote {cfg.evaluate.metrics_file}")


@app.command()
def predict(
    inputs: Annotated[list[str], typer.Argument(
        help="Image files, folders (searched recursively) and glob patterns such as "
             "'photos/**/*.jpg' (quote them: densepipe expands them).", show_default=False)],
    checkpoint: Annotated[Path | None, typer.Option(
        help="Checkpoint (its own model config is used).")] = None,
    model: ModelOpt = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("predictions"),
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Images per batch; a batch holds images of one size (default: "
                    "evaluate.batch_size).")] = None,
    num_workers: Annotated[int | None, typer.Option(
        min=0, help="Image-reading processes (default: data.num_workers).")] = None,
    vis: Annotated[bool, typer.Option("--vis/--no-vis", help="Write drawings under vis/.")] = True,
    eval_files: Annotated[bool, typer.Option(
        "--eval-files",
        help="Also write eval/: what semseg-eval, coco-eval and panoptic-eval read.")] = False,
    coco_gt: Annotated[Path | None, typer.Option(
        "--coco-gt", help="COCO JSON whose images give the image ids, by file name (implies "
                          "--eval-files).")] = None,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="Progress (items/s, ETA) on a terminal and a summary line, "
                                         "on stderr.")] = True,
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
) -> None:
    """Predict every task for images: raw outputs, drawings and evaluator-ready files (docs/deploy.md)."""
    files = stages.predict(_config(params, set_), list(inputs), checkpoint=checkpoint, model_uri=model,
                           out_dir=out_dir, batch_size=batch_size, num_workers=num_workers, vis=vis,
                           eval_files=eval_files, coco_gt=coco_gt, progress=progress)
    out.print(f"wrote {len(files)} files to {out_dir}")


@app.command()
def export(
    checkpoint: Annotated[Path | None, typer.Option(
        help="Checkpoint (its own model config is used). Default: best.pt of train.out_dir.")] = None,
    model: ModelOpt = None,
    out_path: Annotated[Path, typer.Option(
        "--out", help="The .onnx file; a .json sidecar goes next to it.")] = Path("model.onnx"),
    format: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    tasks: Annotated[str | None, typer.Option(
        help="Comma-separated tasks, e.g. semantic,depth (default: all of the model's).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or later).")] = 18,
    image_size: Annotated[str | None, typer.Option(
        help="H or HxW of the traced example, multiples of the stride (default: data.image_size).")] = None,
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
) -> None:
    """Export the model's dense tasks to ONNX (dynamic batch, height and width) plus a JSON sidecar."""
    from pipeline.cli_export import export_command

    report = export_command(params=params, set_=set_, checkpoint=checkpoint, model_uri=model,
                            out=out_path, format=format, tasks=tasks, opset=opset, image_size=image_size)
    for line in report.summary():
        out.print(line)


@app.command()
def register(
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Default: best.pt of train.out_dir.")] = None,
) -> None:
    """Add the trained model to the MLflow model registry (tracking.registered_model)."""
    result = stages.register(_config(params, set_), checkpoint=checkpoint)
    out.print(f"registered {result['model_uri']} (load it with --model models:/{result['name']}/latest)")


@app.command()
def promote(
    version: Annotated[str | None, typer.Option(
        help="Registered version the alias moves to (a number).")] = None,
    rollback: Annotated[bool, typer.Option(
        "--rollback", help="Move the alias back to the version it pointed to before.")] = False,
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
) -> None:
    """Move the champion alias (promote.alias of tracking.registered_model) by hand.

    --version N points it at version N; --rollback back at the version before the current one.
    Recorded in MLflow as a run named promote; what serves models:/<name>@<alias> follows.
    """
    from pipeline import champion
    from pipeline.tracking import make_tracker

    cfg = _config(params, set_)
    if (version is None) == (not rollback):
        raise ConfigError("promote: give --version N or --rollback (one of them)")
    if version is not None and not (version.isdigit() and int(version) > 0):
        raise ConfigError(f"--version {version!r}: expected a registered version number, e.g. 3")
    check_registry_tracking(cfg, "promote")
    tracker = make_tracker(cfg.tracking)
    assert tracker is not None
    name, alias = cfg.tracking.registered_model, cfg.promote.alias
    if rollback:
        moved = champion.rollback(tracker, name, alias)
    else:
        moved = champion.move_alias(tracker, name, alias, str(int(version)),  # type: ignore[arg-type]
                                    reason=f"by hand: densepipe promote --version {version}")
    out.print(f"{name}@{alias}: version {moved['from'] or 'none'} -> {moved['to']} "
              f"(MLflow run {moved['run_id']})", highlight=False)


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


@app.command()
def formats(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False) -> None:
    """List dataset formats (``data.source``): name, options, what layout each reads."""
    from pipeline.data.formats import default_formats

    registry = default_formats()
    rows = [{"name": f.name, "options": list(f.Options.model_fields), "summary": f.summary,
             "status": "ok"} for f in (registry.formats[n] for n in registry.names)]
    rows += [{"name": n, "options": [], "summary": "", "status": f"error: {e}"}
             for n, e in sorted(registry.failed.items())]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="densepipe formats (data.source)")
    for col in ("name", "data.options", "reads", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], ", ".join(r["options"]) or "-", r["summary"], r["status"])
    out.print(table)


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


@app.command("config")
def show_config(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Print the resolved configuration as YAML, after the checks train runs before reading data
    (tasks, each enabled task's options, backbone, train.best_metric); reads no data."""
    cfg = _config(params, set_)
    check_config(cfg)
    sys.stdout.write(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def main() -> None:
    """The ``densepipe`` console script: exit codes 0, 1 (a failure), 2 (an error the user can fix,
    or a usage error), 130 / 143 (stopped by SIGINT / SIGTERM); see the module docstring. The
    process's SIGINT/SIGTERM handlers are put back on the way out (main() may run in-process)."""
    _log_to_stderr()
    if not _is_core_command(sys.argv[1:]):  # `densepipe train` imports no plugin command module
        _add_plugin_commands()
    previous = _stop_on_signals()
    try:
        code = _run_app()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _Stop.handled = set()
    if code not in (0, None):
        sys.exit(code)


def _run_app() -> int | str | None:
    """Run the Typer app; its exit code (for ``sys.exit``), with the one-line reports of errors and
    stops."""
    code: int | str | None
    try:
        # without standalone mode, click returns the code of a typer.Exit (Typer's for Ctrl-C: 130),
        # else what the command returned (nothing: ours print)
        result = app(standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except KeyboardInterrupt:  # Typer turns one inside a command into Exit(130); this is outside one
        return _stop_code()
    except DensepipeError as e:
        if _Stop.received is not None:  # the stop surfaced as an error (e.g. an interrupted write)
            return _stop_code()
        err.print(f"error: {e}", highlight=False, soft_wrap=True)
        return 2
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
    except typer.Abort:
        code = 1
    except Exception as e:  # click usage errors carry their own formatting
        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        if _Stop.received is not None:
            return _stop_code()
        raise
    if _Stop.received is not None:
        return _stop_code()
    return code


COMMANDS_ENTRY_POINT_GROUP = "densepipe.commands"
"""Entry points ``<command name> = "module:function"``: Typer command functions that plugins add
to ``densepipe`` (a task's standalone evaluator, e.g. ``coco-eval``). The module is imported by
every ``densepipe`` call, so it imports its heavy dependencies inside the function, as the
commands here do."""


def _is_core_command(args: list[str]) -> bool:
    """Whether ``args`` run one of this module's own commands (then the plugin commands need not
    be loaded: a stage run by DVC imports only the files its ``deps`` list)."""
    first = next((a for a in args if not a.startswith("-")), None)
    return first is not None and first in {c.name or c.callback.__name__.replace("_", "-")
                                            for c in app.registered_commands if c.callback}


def _add_plugin_commands() -> None:
    """Register the ``densepipe.commands`` entry points (``main`` does, once per process; a test
    driving ``app`` itself calls this first); one that fails to load is a warning naming it (the
    other commands stay usable), one whose name is taken is skipped."""
    from pipeline.hookspecs import unique_entry_points

    taken = {c.name for c in app.registered_commands}
    for ep in sorted(unique_entry_points(COMMANDS_ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in taken:
            continue
        try:
            fn = ep.load()
        except Exception as e:  # noqa: BLE001 - reported, not raised: the rest of the CLI works
            logging.getLogger(__name__).warning("command %s (%s) is unusable: %s: %s",
                                                ep.name, ep.value, type(e).__name__, e)
            continue
        app.command(ep.name)(fn)
        taken.add(ep.name)


if __name__ == "__main__":
    main()
