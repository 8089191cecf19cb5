"""Serve the pipeline flow on a schedule (``densepipe serve``) against the server at PREFECT_API_URL.

Prefect's temporary in-process server cannot schedule, so serving needs a running ``prefect server
start`` (``make serve`` starts one on loopback when none is configured). Everything a user can get
wrong is checked before Prefect is contacted, in this order: the schedule (exactly one of cron and
interval, validated as Prefect's own ``CronSchedule``/``IntervalSchedule`` validate it), the time
zone, ``PREFECT_API_URL`` (read through Prefect's settings, so profiles count), then one health
probe of the server bounded by ``api_timeout_s``.

Stopping: Ctrl-C (SIGINT) and SIGTERM (what ``kill``, systemd and Kubernetes send) both stop serving
the same way: runs in flight are cancelled (state Cancelled, "Runner is shutting down."), the
deployment's schedule is paused, and the process exits 0. Prefect 3.8.8's own SIGTERM handler
(``Runner.handle_sigterm``) calls the dispatching ``Runner.stop()`` from inside the running event loop,
gets the coroutine ``astop()`` back unawaited ("coroutine 'Runner.astop' was never awaited") and then
``sys.exit(0)`` unwinds the loop before the pause is sent: the schedule stayed active. Here the signal
only wakes the loop, which pauses the deployment, awaits ``astop()`` and lets the runner exit.
"""

from __future__ import annotations

import asyncio
import math
import signal
from pathlib import Path
from typing import Any

from prefect import get_client
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, is_valid_timezone
from prefect.deployments.runner import EntrypointType
from prefect.runner import Runner
from prefect.schedules import Cron, Interval
from prefect.settings import get_current_settings
from pydantic import ValidationError

from flows.pipeline import pipeline_flow
from flows.retrain import retrain_flow
from flows.server import check_api
from pipeline.errors import ConfigError

DEFAULT_API_TIMEOUT_S = 10.0
CRON_EXAMPLE = "--cron '0 3 * * *' (daily at 03:00)"
INTERVAL_EXAMPLE = "--interval 3600 (hourly)"


def validate_schedule(*, cron: str | None, interval: float | None, timezone: str | None) -> str:
    """Check a schedule as Prefect will; returns a short description ("cron '0 3 * * *' (UTC)").

    Raises ``ConfigError`` naming the option and value, with an example.
    """
    if cron is not None and interval is not None:
        raise ConfigError(f"--cron {cron!r} and --interval {interval:g} both given: choose one, "
                          f"e.g. {CRON_EXAMPLE} or {INTERVAL_EXAMPLE}")
    if cron is None and interval is None:
        raise ConfigError(f"no schedule given: use --cron or --interval, e.g. {CRON_EXAMPLE} "
                          f"or {INTERVAL_EXAMPLE}")
    if timezone is not None and not is_valid_timezone(timezone):
        raise ConfigError(f"--timezone {timezone!r}: not an IANA time zone name, e.g. UTC or Europe/Berlin")
    zone = timezone or "UTC"
    if cron is not None:
        try:
            CronSchedule(cron=cron, timezone=timezone)
        except ValidationError as e:
            reason = e.errors()[0]["msg"].removeprefix("Value error, ")
            if reason.startswith("Invalid cron string"):
                reason = "not a valid cron string"
            raise ConfigError(f"--cron {cron!r}: {reason}; expected 5 fields (minute hour day month "
                              f"weekday), e.g. {CRON_EXAMPLE}") from None
        return f"cron {cron!r} ({zone})"
    assert interval is not None
    if not math.isfinite(interval) or interval <= 0:
        raise ConfigError(f"--interval {interval:g}: expected seconds > 0, e.g. {INTERVAL_EXAMPLE}")
    try:
        IntervalSchedule(interval=interval, timezone=timezone)
    except ValidationError as e:
        reason = e.errors()[0]["msg"]
        raise ConfigError(f"--interval {interval:g}: {reason}; e.g. {INTERVAL_EXAMPLE}") from None
    return f"every {interval:g} s"


def api_url_or_raise() -> str:
    """``PREFECT_API_URL`` as Prefect sees it (environment or active profile); ConfigError if unset."""
    url = get_current_settings().api.url
    if not url:
        raise ConfigError("PREFECT_API_URL is not set: scheduling needs a running Prefect server "
                          "(Prefect's temporary server cannot schedule); `make serve` starts one on "
                          "127.0.0.1, or set PREFECT_API_URL=http://HOST:4200/api")
    return str(url).rstrip("/")


FLOWS = {"retrain": retrain_flow, "pipeline": pipeline_flow}
"""What ``densepipe serve --flow`` schedules: ``retrain`` (train only when the inputs changed,
promote only a better model) or ``pipeline`` (prepare, train, evaluate, register every time)."""


def serve_pipeline(*, cron: str | None, interval: float | None, name: str, timezone: str | None,
                   params: str, overrides: list[str], api_timeout_s: float = DEFAULT_API_TIMEOUT_S,
                   limit: int = 1, flow: str = "retrain") -> None:
    """Create or update deployment ``<flow's name>/<name>`` (``densepipe-retrain`` or
    ``densepipe-pipeline``) and run its scheduled runs until stopped.

    Each run is the flow (``FLOWS[flow]``) with ``params=<absolute params path>,
    overrides=overrides`` in a subprocess, in this process's working directory; at most ``limit``
    run at once (1: runs never overlap on the same outputs). Ctrl-C or SIGTERM stops serving: runs
    in flight are cancelled, the schedule is paused and this returns normally (serving again resumes
    the schedule); a second signal stops without waiting for that. Raises ``ConfigError`` for a bad
    schedule or an unset PREFECT_API_URL, and ``flows.server.PrefectServerError`` when the server
    does not answer within ``api_timeout_s``.
    """
    what = validate_schedule(cron=cron, interval=interval, timezone=timezone)
    if flow not in FLOWS:
        raise ConfigError(f"--flow {flow!r}: expected one of {', '.join(FLOWS)}")
    served = FLOWS[flow]
    if not (api_timeout_s > 0):
        raise ConfigError(f"--api-timeout {api_timeout_s:g}: expected seconds > 0, e.g. 10")
    api_url = api_url_or_raise()
    check_api(api_url, timeout_s=api_timeout_s)

    schedule = (Cron(cron, timezone=timezone) if cron is not None
                else Interval(interval, timezone=timezone))  # type: ignore[arg-type]
    parameters = {"params": str(Path(params).resolve()), "overrides": list(overrides)}
    ui_url = get_current_settings().ui_url or api_url.removesuffix("/api")
    given = " ".join([f"--params {parameters['params']}", *(f"--set {o}" for o in overrides)])
    deployment = f"{served.name}/{name}"
    print(f"serving deployment '{deployment}' {what} ({given}) in {Path.cwd()} "
          f"on {api_url}; UI {ui_url}/deployments; Ctrl-C or SIGTERM stops and pauses the schedule",
          flush=True)
    runner = _LoopSignalRunner(name=name, pause_on_shutdown=True, limit=limit)
    stopped_by = asyncio.run(_serve_until_signalled(
        runner, served, name=name, schedule=schedule, parameters=parameters,
        description=f"densepipe {flow}, {what}", tags=["densepipe"],
        entrypoint_type=EntrypointType.MODULE_PATH))
    why = f"on {stopped_by.name}" if stopped_by is not None else "(the runner ended)"
    print(f"stopped serving {why}: deployment '{deployment}' paused; run `densepipe serve` again "
          f"to resume its schedule", flush=True)


class _LoopSignalRunner(Runner):
    """Prefect's ``Runner`` without its own SIGTERM handling: the event loop handles SIGTERM.

    ``Runner.start()`` installs ``handle_sigterm`` as the process's SIGTERM handler; Prefect's version
    stops nothing (see the module docstring). This one does nothing: SIGTERM is registered with the
    loop (``loop.add_signal_handler``), and the loop still learns of every SIGTERM through its wakeup
    file descriptor, which Python writes for any signal that has a Python-level handler.
    """

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        pass


async def _serve_until_signalled(runner: _LoopSignalRunner, flow: Any, **deployment: Any
                                 ) -> signal.Signals | None:
    """Register ``flow`` with ``runner`` (``Runner.aadd_flow(flow, **deployment)``) and run the runner
    until SIGINT or SIGTERM; then stop it gracefully and return that signal (``None`` if the runner
    ended by itself).

    A graceful stop pauses the deployment (the server deletes its scheduled runs), then awaits
    ``Runner.astop()``: no new submissions, the runs in flight cancelled (Cancelled, "Runner is
    shutting down."), polling ended; ``Runner.start()`` then returns and pauses again
    (``pause_on_shutdown``), which also deletes a run the scheduler may have created meanwhile. A
    second signal cancels the runner instead of waiting. The process's SIGINT/SIGTERM handlers are
    restored.
    """
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []
    wake = asyncio.Event()
    jobs: list[asyncio.Future[None]] = []  # serving, then stopping: what a second signal cancels

    def on_signal(sig: signal.Signals) -> None:  # on the loop
        if received:  # a second signal: do not wait for the graceful stop
            for job in jobs:
                job.cancel()
        received.append(sig)
        wake.set()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        deployment_id = await runner.aadd_flow(flow, **deployment)  # created or updated, unpaused
        serving = asyncio.ensure_future(runner.start())
        jobs.append(serving)
        await asyncio.wait({serving, asyncio.ensure_future(wake.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
        if not received:
            await serving  # the runner ended by itself (or raised)
            return None
        while not runner.started and not serving.done():  # a signal while the runner was starting
            await asyncio.sleep(0.05)
        if runner.started:
            async with get_client() as client:  # first: the server drops the scheduled runs now
                await client.pause_deployment(deployment_id)
            stopping = asyncio.ensure_future(runner.astop())
            jobs.append(stopping)
            await asyncio.wait({stopping})
        await asyncio.wait({serving})
        for job in jobs:
            error = None if job.cancelled() else job.exception()
            if error is not None:
                raise error
        return received[0]
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)
