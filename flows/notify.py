"""Posting the outcome of a retraining run to a webhook (``promote.notify_url``).

``notify_outcome`` is a Prefect flow-state hook of ``densepipe-retrain`` (completion, failure,
crash): it POSTs one JSON object, ``{"flow": ..., "flow_run": ..., "flow_run_id": ...,
"state": ..., "outcome": "promoted" | "kept" | "skipped" | "failed", "reason": ...,
"champion": ..., "challenger": ..., "comparison": ...}``. A webhook that is down or slow
(``TIMEOUT_S``) is logged as one warning line and never fails the run.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from pipeline.config import load_config
from pipeline.errors import error_line

TIMEOUT_S = 10.0
log = logging.getLogger(__name__)


def post_json(url: str, payload: dict[str, Any], *, timeout_s: float = TIMEOUT_S) -> int:
    """POST ``payload`` as JSON to ``url``; returns the HTTP status (raises ``OSError`` when the
    URL does not answer, ``urllib.error.HTTPError`` for a 4xx/5xx answer)."""
    request = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:  # noqa: S310 - the user's URL
        return int(answer.status)


def outcome_payload(flow: Any, flow_run: Any, state: Any) -> dict[str, Any]:
    """What ``notify_outcome`` posts for a final ``state`` of ``flow_run``."""
    payload: dict[str, Any] = {"flow": getattr(flow, "name", None), "flow_run": flow_run.name,
                               "flow_run_id": str(flow_run.id), "state": state.name}
    if state.is_completed():
        result = state.result(raise_on_failure=False)
        payload.update(result if isinstance(result, dict) else {"outcome": "completed"})
    else:
        error = state.result(raise_on_failure=False) if state.is_failed() else None
        payload.update({"outcome": "failed",
                        "reason": error_line(error) if isinstance(error, BaseException)
                        else (state.message or state.name)})
    return payload


def notify_outcome(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect hook: POST the outcome to the run's ``promote.notify_url`` (nothing when unset or
    when the run's config cannot be read)."""
    params = flow_run.parameters or {}
    try:
        url = load_config(params.get("params", "params.yaml"),
                          list(params.get("overrides") or [])).promote.notify_url
    except Exception as e:  # noqa: BLE001 - the run reports its own config error
        log.warning("retrain notification not sent: the run's config is unreadable (%s)", error_line(e))
        return
    if not url:
        return
    payload = outcome_payload(flow, flow_run, state)
    try:
        post_json(url, payload)
    except (OSError, ValueError) as e:
        log.warning("retrain notification to %s failed: %s", url, error_line(e))
