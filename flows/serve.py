"""Serve the pipeline flow on a schedule (``densepipe serve``) against the server at PREFECT_API_URL.

Prefect's temporary in-process server cannot schedule, so serving needs a running ``prefect server
start`` (``make serve`` starts one on loopback when none is configured). Everything a user can get
wrong is checked before Prefect is contacted, in this order: the schedule (exactly one of cron and
interval, validated as Prefect's own ``CronSchedule``/``IntervalSchedule`` validate it), the time
zone, ``PREFECT_API_URL`` (read through Prefect's settings, so profiles count), then one health
probe of the server bounded by ``api_timeout_s``.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.errors import ConfigError

DEFAULT_API_TIMEOUT_S = 10.0
CRON_EXAMPLE = "--cron '0 3 * * *' (daily at 03:00)"
INTERVAL_EXAMPLE = "--interval 3600 (hourly)"


def validate_schedule(*, cron: str | None, interval: float | None, timezone: str | None) -> str:
    """Check a schedule as Prefect will; returns a short description ("cron '0 3 * * *' (UTC)").

    Raises ``ConfigError`` naming the option and value, with an example.
    """
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, is_valid_timezone
    from pydantic import ValidationError

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
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError("PREFECT_API_URL is not set: scheduling needs a running Prefect server "
                          "(Prefect's temporary server cannot schedule); `make serve` starts one on "
                          "127.0.0.1, or set PREFECT_API_URL=http://HOST:4200/api")
    return str(url).rstrip("/")


def serve_pipeline(*, cron: str | None, interval: float | None, name: str, timezone: str | None,
                   params: str, overrides: list[str], api_timeout_s: float = DEFAULT_API_TIMEOUT_S,
                   limit: int = 1) -> None:
    """Create or update deployment ``densepipe-pipeline/<name>`` and run its scheduled runs until stopped.

    Each run is ``pipeline_flow(params=<absolute params path>, overrides=overrides)`` in a subprocess,
    in this process's working directory; at most ``limit`` run at once (1: runs never overlap on the
    same outputs). Ctrl-C or SIGTERM stops serving and pauses the schedule; serving again resumes it.
    Raises ``ConfigError`` for a bad schedule or an unset PREFECT_API_URL, and
    ``flows.server.PrefectServerError`` when the server does not answer within ``api_timeout_s``.
    """
    from flows.server import check_api

    what = validate_schedule(cron=cron, interval=interval, timezone=timezone)
    if not (api_timeout_s > 0):
        raise ConfigError(f"--api-timeout {api_timeout_s:g}: expected seconds > 0, e.g. 10")
    api_url = api_url_or_raise()
    check_api(api_url, timeout_s=api_timeout_s)

    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval
    from prefect.settings import get_current_settings

    from flows.pipeline import pipeline_flow

    schedule = (Cron(cron, timezone=timezone) if cron is not None
                else Interval(interval, timezone=timezone))  # type: ignore[arg-type]
    parameters = {"params": str(Path(params).resolve()), "overrides": list(overrides)}
    ui_url = get_current_settings().ui_url or api_url.removesuffix("/api")
    given = " ".join([f"--params {parameters['params']}", *(f"--set {o}" for o in overrides)])
    print(f"serving deployment '{pipeline_flow.name}/{name}' {what} ({given}) in {Path.cwd()} "
          f"on {api_url}; UI {ui_url}/deployments; Ctrl-C stops", flush=True)
    pipeline_flow.serve(name=name, schedule=schedule, parameters=parameters, limit=limit,
                        description=f"densepipe pipeline, {what}", tags=["densepipe"],
                        print_starting_message=False, entrypoint_type=EntrypointType.MODULE_PATH)
