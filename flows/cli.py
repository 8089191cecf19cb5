"""``densepipe run``, ``retrain`` and ``serve``: the commands that drive the Prefect flows.

They live with the orchestration, not in the library's CLI (``pipeline`` imports no ``flows``), and
reach ``densepipe`` through the ``densepipe.commands`` entry-point group. They share the CLI's
signal handling, console and config loading (``pipeline.cli``).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli import (
    ParamsOpt,
    SetOpt,
    _config,
    _metrics_table,
    _on_stop_signal,
    _Stop,
    err,
    out,
)
from pipeline.config import check_registry_tracking
from pipeline.errors import ConfigError, DensepipeError

# Imports inside functions: `densepipe` imports this command module on every call; Prefect loads
# when a flow command runs.


def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Run the whole pipeline once as a Prefect flow (prepare, train, evaluate, register).

    The terminal shows Prefect's progress lines; a failure ends with one error line (its traceback is
    in the flow run's logs on the Prefect server). Ctrl-C or SIGTERM: exit code 130 or 143.
    """
    cfg = _config(params, set_)  # fail fast on a bad config, before Prefect starts
    metrics = _run_flow("pipeline", params=str(params), overrides=list(set_ or []))
    out.print(_metrics_table(metrics, title=f"metrics ({cfg.evaluate.metrics_file})"))


def retrain(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
            force: Annotated[bool, typer.Option(
                "--force", help="Train a challenger even when nothing changed.")] = False) -> None:
    """Retrain once as a Prefect flow: skip when nothing changed since the champion was trained,
    else train a challenger, compare it with the champion and promote it if the rule says so.

    `densepipe serve` runs the same flow on a schedule. Ctrl-C or SIGTERM: exit code 130 or 143.
    """
    check_registry_tracking(_config(params, set_), "retrain")  # before Prefect starts
    result = _run_flow("retrain", params=str(params), overrides=list(set_ or []), force=force)
    if result.get("metrics") and result["outcome"] != "skipped":
        out.print(_metrics_table(result["metrics"], title=f"challenger version {result['challenger']}"))
    out.print(f"{result['outcome']}: {result['reason']}", highlight=False, soft_wrap=True)


def _run_flow(which: str, **parameters: Any) -> Any:
    """Run flow ``which`` (``pipeline`` or ``retrain``) in this process on the configured Prefect
    server, else a temporary one; returns its result. A failed run ends in one error line."""
    from flows.local_run import TemporaryServer, console_without_tracebacks, prefect_console_logging

    prefect_console_logging()  # first: before Prefect is imported (flows/__init__ sets its defaults)
    from prefect.settings import get_current_settings

    from flows.server import check_api

    settings = get_current_settings()
    keeper = None
    if settings.api.url:  # a configured server must answer (else: a temporary server)
        check_api(str(settings.api.url).rstrip("/"), timeout_s=10.0)
    elif settings.server.ephemeral.enabled:
        keeper = TemporaryServer(log=Path(settings.home) / "temporary-server.log")
        _Stop.before_exit.append(lambda: keeper.stop(timeout_s=2.0))
    from flows.serve import FLOWS

    console_without_tracebacks()
    if keeper is not None:
        keeper.use()
    flow = FLOWS[which]
    flow = flow.with_options(on_running=[*flow.on_running_hooks, sigterm_as_ctrl_c])
    state = flow(**parameters, return_state=True)
    if not state.is_completed():
        if _Stop.received is not None:  # stopped: main() prints the one line
            raise typer.Exit(1)
        error = state.result(raise_on_failure=False)
        if isinstance(error, DensepipeError):
            raise error
        what = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else state.message
        err.print(f"error: the {which} flow run ended {state.name}: {what} (traceback: `prefect "
                  f"flow-run logs {state.state_details.flow_run_id}`)", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    return state.result()


def sigterm_as_ctrl_c(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_running`` hook of ``densepipe run``: SIGTERM interrupts the run as Ctrl-C does.

    Prefect's flow engine swaps its own SIGTERM handler in for the run (it raises
    ``TerminationSignal``, which the stages would record as FAILED, not KILLED); this puts
    densepipe's back once the run is Running. Only in the main thread, and only where main() had
    installed it.
    """
    if signal.SIGTERM in _Stop.handled and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_stop_signal)


def serve(
    cron: Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 3 * * *".')] = None,
    interval: Annotated[float | None, typer.Option(help="Seconds between runs.")] = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    timezone: Annotated[str | None, typer.Option(help="IANA time zone of the schedule (UTC).")] = None,
    api_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the Prefect server's health check.")] = 10.0,
    flow: Annotated[str, typer.Option(
        help="retrain: train only when the data, params or code changed and promote only a better "
             "model; pipeline: prepare, train, evaluate and register every run.")] = "retrain",
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
) -> None:
    """Serve the retraining (or pipeline) flow on a schedule against the Prefect server at
    PREFECT_API_URL.

    Prefect's temporary server cannot schedule: `make serve` starts a local server when none is set.
    Runs execute here, one at a time, until Ctrl-C or SIGTERM, which cancel the run in flight, pause
    the schedule and exit 0.
    """
    from flows.local_run import prefect_console_logging

    prefect_console_logging()  # first: before Prefect is imported
    from flows.serve import serve_pipeline, validate_schedule

    validate_schedule(cron=cron, interval=interval, timezone=timezone)
    if flow not in ("retrain", "pipeline"):
        raise ConfigError(f"--flow {flow!r}: expected retrain or pipeline")
    cfg = _config(params, set_)  # fail fast on a bad config, before contacting Prefect
    if flow == "retrain":
        check_registry_tracking(cfg, "serve --flow retrain")
    serve_pipeline(cron=cron, interval=interval, name=name, timezone=timezone,
                   params=str(params), overrides=list(set_ or []), api_timeout_s=api_timeout,
                   flow=flow)
