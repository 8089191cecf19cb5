"""Stopping ``densepipe serve`` and ``densepipe run`` with signals, and what ``run`` prints on failure.

Real parts only: a real ``prefect server start`` on loopback (one per module), ``densepipe`` in
subprocesses in their own sessions, real signals, MLflow in a real SQLite store. Each test checks
what an operator checks: the exit code, the seconds from the signal to the exit, no traceback in the
output, the deployment paused, the MLflow runs ended KILLED, no processes left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.server import free_port, local_prefect_server
from tests.conftest import descendants, still_alive, write_tiny_params

DENSEPIPE = Path(sys.executable).parent / "densepipe"
FLOW_NAME = "densepipe-pipeline"
FAST_SERVER = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
               "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
               "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
ENDLESS_TRAINING = ["--set", "train.steps=1000000", "--set", "train.checkpoint_every=1000000"]
"""Training that is still running when the signal comes (no checkpoint write to interrupt)."""
SERVE_EXIT_S = 10.0
RUN_EXIT_S = 15.0
WAIT_S = 150.0


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API URL of a ``prefect server start`` on loopback, shared by this module's tests."""
    home = tmp_path_factory.mktemp("prefect-server")
    with local_prefect_server(port=free_port(), home=home, ui=False, env=FAST_SERVER) as url:
        yield url


def _env(tmp_path: Path, api_url: str | None) -> dict[str, str]:
    """A user's shell: a private PREFECT_HOME, Prefect's INFO progress lines, PREFECT_API_URL or not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_LOGGING_LEVEL": "INFO",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true"})
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def _default_sigint() -> None:
    """``preexec_fn``: SIGINT at its default, as a terminal's Ctrl-C meets it (a shell starts a
    background job with SIGINT ignored, and Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``densepipe ARGS`` in its own session (its pid is its process group), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen([str(DENSEPIPE), *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sigint)


def _wait_for(what: str, ready: Callable[[], Any], proc: subprocess.Popen, log: Path) -> Any:
    """Poll ``ready()`` until it returns something truthy; fail if ``proc`` exits or WAIT_S pass."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"densepipe exited with {proc.returncode} before {what}:\n{log.read_text()[-4000:]}")
        if result := ready():
            return result
        time.sleep(0.5)
    pytest.fail(f"no {what} within {WAIT_S:g} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen, sig: signal.Signals, *, group: bool) -> tuple[int, float, list[str]]:
    """Send ``sig`` to ``proc`` (or its process group, as systemd and a terminal do); its exit code,
    the seconds it took to exit, and the descendants still alive 10 s after it exited (killed)."""
    family = descendants(proc.pid)
    started = time.monotonic()
    (os.killpg if group else os.kill)(proc.pid, sig)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    seconds = time.monotonic() - started
    return code, seconds, still_alive(family)


def _clean(text: str) -> None:
    assert "Traceback" not in text, text[-6000:]
    assert "never awaited" not in text, text[-6000:]


def _deployment_runs(api_url: str, deployment: str) -> list:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with SyncPrefectClient(api_url) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except Exception:  # not created yet
            return []
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def _paused(api_url: str, deployment: str) -> bool:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        return bool(client.read_deployment_by_name(deployment).paused)


def _nothing_piles_up(runs: list) -> None:
    """Pausing deleted the scheduled runs, so none waits (or turns Late) while nobody serves. One may
    remain: the server's scheduler can insert a run it planned just before the pause committed."""
    states = {r.name: r.state_name for r in runs}
    waiting = [name for name, state in states.items() if state in ("Scheduled", "Late")]
    assert len(waiting) <= 1, states
    assert not {"Running", "Pending"} & set(states.values()), states


# -- densepipe serve -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_stops_serving_cancels_the_run_in_flight_and_pauses_the_schedule(
        prefect_api: str, tmp_path: Path) -> None:
    params = write_tiny_params(tmp_path, mlflow_uri=None)
    log = tmp_path / "serve.log"
    serve = _start(["serve", "--flow", "pipeline", "--interval", "5", "--name", "sigterm", "-p", str(params),
                    *ENDLESS_TRAINING],
                   cwd=tmp_path, env=_env(tmp_path, prefect_api), log=log)
    deployment = f"{FLOW_NAME}/sigterm"

    def running() -> list:
        return [r for r in _deployment_runs(prefect_api, deployment) if r.state_name == "Running"]

    try:
        (in_flight,) = _wait_for("running flow run", running, serve, log)
    finally:
        code, seconds, left = _stop(serve, signal.SIGTERM, group=False)  # `kill PID`, as systemd's main PID
    text = log.read_text()
    print(f"timing: densepipe serve exited {seconds:.1f} s after SIGTERM (a run in flight)")
    assert code == 0, text[-6000:]
    assert seconds < SERVE_EXIT_S, text[-6000:]
    _clean(text)
    assert left == [], f"processes left after SIGTERM: {left}"
    assert f"stopped serving on SIGTERM: deployment '{deployment}' paused" in text
    assert _paused(prefect_api, deployment)
    runs = {r.id: r for r in _deployment_runs(prefect_api, deployment)}
    assert runs[in_flight.id].state_name == "Cancelled", runs[in_flight.id].state
    assert runs[in_flight.id].state.message == "Runner is shutting down."
    _nothing_piles_up(list(runs.values()))


@pytest.mark.slow
def test_ctrl_c_stops_serving_the_same_way(prefect_api: str, tmp_path: Path) -> None:
    params = write_tiny_params(tmp_path, mlflow_uri=None)
    log = tmp_path / "serve.log"
    serve = _start(["serve", "--flow", "pipeline", "--cron", "0 3 * * *", "--name", "ctrl-c", "-p",
                    str(params)],
                   cwd=tmp_path, env=_env(tmp_path, prefect_api), log=log)
    deployment = f"{FLOW_NAME}/ctrl-c"
    try:
        _wait_for("scheduled run", lambda: _deployment_runs(prefect_api, deployment), serve, log)
        time.sleep(1)  # the runner is polling
    finally:
        code, seconds, left = _stop(serve, signal.SIGINT, group=True)  # a terminal's Ctrl-C
    text = log.read_text()
    print(f"timing: densepipe serve exited {seconds:.1f} s after Ctrl-C")
    assert code == 0, text[-6000:]
    assert seconds < SERVE_EXIT_S
    _clean(text)
    assert left == []
    assert f"stopped serving on SIGINT: deployment '{deployment}' paused" in text
    assert _paused(prefect_api, deployment)
    _nothing_piles_up(_deployment_runs(prefect_api, deployment))


# -- densepipe run -------------------------------------------------------------------------------------------

def _mlflow_runs(uri: str) -> dict[str, str]:
    """``{run name: status}`` of every run in the store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_name: r.info.status for r in client.search_runs(ids)} if ids else {}


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_run_and_ends_its_mlflow_runs_killed(
        tmp_path: Path, mlflow_uri: str) -> None:
    """As systemd stops a service: SIGTERM to the whole process group, with no PREFECT_API_URL (the
    command's own temporary Prefect server)."""
    params = write_tiny_params(tmp_path, mlflow_uri=mlflow_uri)
    log = tmp_path / "run.log"
    run = _start(["run", "-p", str(params), *ENDLESS_TRAINING], cwd=tmp_path, env=_env(tmp_path, None),
                 log=log)

    def training() -> bool:
        runs = _mlflow_runs(mlflow_uri)
        return any(name.startswith("train") and status == "RUNNING" for name, status in runs.items())

    try:
        _wait_for("training", training, run, log)
        time.sleep(1)  # inside the training loop
    finally:
        code, seconds, left = _stop(run, signal.SIGTERM, group=True)
    text = log.read_text()
    print(f"timing: densepipe run exited {seconds:.1f} s after SIGTERM to its process group")
    assert code == 128 + signal.SIGTERM, text[-6000:]
    assert seconds < RUN_EXIT_S, text[-6000:]
    _clean(text)
    assert left == [], f"processes left after SIGTERM (the temporary server?): {left}"
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == ["error: stopped by SIGTERM"], text[-6000:]
    assert text.rstrip().endswith("error: stopped by SIGTERM")
    runs = _mlflow_runs(mlflow_uri)
    opened = {name: status for name, status in runs.items() if name != "prepare"}
    assert set(opened.values()) == {"KILLED"} and len(opened) == 2, runs  # the pipeline run and train
    assert "Task run 'train-" in text  # Prefect's own line format, with the task run's name


@pytest.mark.slow
def test_a_failing_stage_ends_run_with_one_error_line_and_keeps_the_traceback_in_prefect(
        prefect_api: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    params = write_tiny_params(tmp_path, mlflow_uri=None)
    (tmp_path / "mine").mkdir()  # a user's dataset folder that holds no dataset: prepare fails
    started = time.monotonic()
    proc = subprocess.run([str(DENSEPIPE), "run", "-p", str(params), "--set", "data.source=folder",
                           "--set", f"data.root={tmp_path / 'mine'}"], cwd=tmp_path,
                          env=_env(tmp_path, prefect_api), capture_output=True, text=True, timeout=WAIT_S)
    print(f"timing: failing densepipe run took {time.monotonic() - started:.1f} s")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    _clean(text)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {tmp_path / 'mine'}: "), text
    assert proc.stderr.rstrip().endswith(errors[0])
    assert "Task run 'prepare-" in text and "Finished in state Failed" in text, text
    assert "ERROR prefect.task_runs:" not in text  # not the CLI's own plain format

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with SyncPrefectClient(prefect_api) as client:
        failed = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.FAILED]))))
            if r.parameters.get("params") == str(params)]
        assert len(failed) == 1, failed
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[failed[0].id])))
    server_text = "\n".join(entry.message for entry in logs)
    assert "Traceback (most recent call last)" in server_text and "DataError" in server_text, server_text
