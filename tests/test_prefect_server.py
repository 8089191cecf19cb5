"""Scheduling (`densepipe serve`, `make serve`, prefect.yaml) against a real `prefect server start`.

Fast tests check what a user gets wrong (schedule, PREFECT_API_URL) through the CLI. Slow tests start a
real server in a temporary PREFECT_HOME: one serves the pipeline on a short interval until a scheduled
run completes; one runs `make serve`'s wrapper around `prefect deploy` of prefect.yaml, then Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from flows.server import PrefectServerError, check_api, free_port, local_prefect_server
from tests.conftest import REPO_ROOT, descendants, http_server, still_alive, write_tiny_params

BIN = Path(sys.executable).parent
DENSEPIPE = BIN / "densepipe"
RETRAIN_FLOW = "densepipe-retrain"
# the scheduler looks at new deployments every 5 s and the runner polls every 10 s by default
FAST_SERVER = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
               "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
               "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
RUN_DEADLINE_S = 180.0


def _write_params(tmp_path: Path) -> Path:
    return write_tiny_params(tmp_path, mlflow_uri=None)  # tracking off


def _cli_env(tmp_path: Path, api_url: str | None) -> dict[str, str]:
    """The environment of a user's shell: a private PREFECT_HOME (no profile), PREFECT_API_URL or not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-client"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true"})
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def _densepipe(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 120.0
               ) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([str(DENSEPIPE), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - started


def _cli_error(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """Run ``densepipe`` in this process through main(); expect exit code 2; the stderr text."""
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["densepipe", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -- bad schedules: rejected before anything contacts Prefect ------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    (["--cron", "not a cron"], ["--cron 'not a cron'", "not a valid cron string", "0 3 * * *"]),
    (["--cron", "61 * * * *"], ["--cron '61 * * * *'", "not a valid cron string", "0 3 * * *"]),
    (["--cron", "H 3 * * *"], ["--cron 'H 3 * * *'", "0 3 * * *"]),
    (["--interval", "0"], ["--interval 0", "> 0", "--interval 3600"]),
    (["--interval", "-5"], ["--interval -5", "> 0", "--interval 3600"]),
    (["--cron", "0 3 * * *", "--interval", "60"], ["--cron '0 3 * * *' and --interval 60", "choose one"]),
    ([], ["no schedule", "--cron", "--interval"]),
    (["--cron", "0 3 * * *", "--timezone", "Mars/Olympus"], ["--timezone 'Mars/Olympus'", "Europe/Berlin"]),
])
def test_serve_rejects_a_bad_schedule(args: list[str], expected: list[str], monkeypatch, capsys) -> None:
    # a file that does not exist as --params: the schedule is checked first
    err = _cli_error(["serve", *args, "--params", "no-such-params.yaml"], monkeypatch, capsys)
    for text in expected:
        assert text in err, err


def test_schedule_validation_agrees_with_prefect() -> None:
    from prefect.client.schemas.schedules import construct_schedule

    from flows.serve import validate_schedule

    for cron in ("0 3 * * *", "*/15 * * * 1-5", "@daily"):
        assert validate_schedule(cron=cron, interval=None, timezone="Europe/Berlin") == \
            f"cron {cron!r} (Europe/Berlin)"
        construct_schedule(cron=cron, timezone="Europe/Berlin")
    assert validate_schedule(cron=None, interval=1.5, timezone=None) == "every 1.5 s"


# -- PREFECT_API_URL: unset, nothing listening, silent, not Prefect ------------------------------------------

def test_serve_without_prefect_api_url_points_to_make_serve(tmp_path: Path) -> None:
    params = _write_params(tmp_path)
    proc, _ = _densepipe(["serve", "--flow", "pipeline", "--interval", "60", "-p", str(params)],
                         cwd=tmp_path,
                         env=_cli_env(tmp_path, None))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: PREFECT_API_URL is not set"), proc.stderr
    assert "make serve" in proc.stderr and "cannot schedule" in proc.stderr


def test_serve_with_nothing_at_prefect_api_url_names_it_and_stops(tmp_path: Path) -> None:
    params = _write_params(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    proc, seconds = _densepipe(["serve", "--flow", "pipeline", "--interval", "60", "-p", str(params),
                                "--api-timeout", "3"],
                               cwd=tmp_path, env=_cli_env(tmp_path, url), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: PREFECT_API_URL {url}: cannot reach {url}/health"), proc.stderr
    print(f"timing: densepipe serve at a closed port failed after {seconds:.1f} s (process included)")
    assert seconds < 30


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (kernel backlog) but never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_health_probe_gives_up_at_its_timeout(silent_port: int) -> None:
    url = f"http://127.0.0.1:{silent_port}/api"
    started = time.monotonic()
    with pytest.raises(PrefectServerError, match=rf"PREFECT_API_URL {url}: no answer from {url}/health "
                                                 r"within 1\.5 s"):
        check_api(url, timeout_s=1.5)
    seconds = time.monotonic() - started
    print(f"timing: health probe of a silent port gave up after {seconds:.2f} s (timeout 1.5 s)")
    assert 1.4 <= seconds < 3.0


@pytest.mark.slow
def test_serve_at_a_silent_server_fails_within_the_stated_timeout(tmp_path: Path, silent_port: int) -> None:
    params = _write_params(tmp_path)
    url = f"http://127.0.0.1:{silent_port}/api"
    proc, seconds = _densepipe(["serve", "--flow", "pipeline", "--cron", "0 3 * * *", "-p", str(params),
                                "--api-timeout", "2"],
                               cwd=tmp_path, env=_cli_env(tmp_path, url), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"no answer from {url}/health within 2 s" in proc.stderr, proc.stderr
    print(f"timing: densepipe serve at a silent port failed after {seconds:.1f} s (timeout 2 s)")
    assert 2 <= seconds < 20


def test_health_probe_names_a_url_that_is_not_the_prefect_api() -> None:
    with http_server(200, b"<html>hello</html>") as url:  # a web UI: every path answers HTML
        with pytest.raises(PrefectServerError, match=r"not as a Prefect API .* usually ends in /api"):
            check_api(url, timeout_s=5)


# -- real server ---------------------------------------------------------------------------------------------

def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _default_sigint() -> None:
    """``preexec_fn``: SIGINT back to its default in the child, as a terminal's Ctrl-C meets it. A
    shell that runs the suite as a background job (``cmd &`` without job control) starts it with
    SIGINT ignored; children inherit that, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[int, list[str]]:
    """Ctrl-C for a process started in its own session: SIGINT to its group; exit code and leftovers."""
    procs = descendants(proc.pid)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        procs.append(None)  # marks the timeout
    left = still_alive([p for p in procs if p is not None])
    if None in procs:
        left.append(f"{proc.args} ignored SIGINT for {timeout:g} s")
    return code, left


def _wait_for_completed_runs(api_url: str, deployment: str, serve: subprocess.Popen, log: Path,
                             count: int = 1):
    """The first ``count`` flow runs of ``deployment`` reaching COMPLETED (oldest first); fails with
    the states seen and the log."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + RUN_DEADLINE_S * count
    seen: dict[str, str] = {}
    with SyncPrefectClient(api_url) as client:
        while time.monotonic() < deadline:
            if serve.poll() is not None:
                pytest.fail(f"densepipe serve exited with {serve.returncode}:\n{log.read_text()[-4000:]}")
            try:
                dep = client.read_deployment_by_name(deployment)
            except Exception:  # not created yet
                time.sleep(1)
                continue
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            done = []
            for run in runs:
                seen[run.name] = run.state_name or "?"
                if run.state is not None and run.state.is_completed():
                    done.append(run)
                elif run.state is not None and run.state.is_final():
                    pytest.fail(f"flow run {run.name} ended {run.state_name}: {run.state.message}\n"
                                f"{log.read_text()[-4000:]}")
            if len(done) >= count:
                return dep, sorted(done, key=lambda r: r.start_time)[:count]
            time.sleep(1)
    pytest.fail(f"{count} runs of {deployment} did not complete within {RUN_DEADLINE_S * count:g} s; "
                f"states seen: {seen}\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_served_deployment_retrains_on_its_schedule_then_skips(tmp_path: Path) -> None:
    """`densepipe serve` (the retrain flow) on a 10 s interval: the first scheduled run trains and
    promotes a champion, the second finds nothing changed and skips."""
    import mlflow
    from prefect.client.orchestration import SyncPrefectClient

    started = time.monotonic()
    port = free_port()
    before = {p.pid for p in descendants(os.getpid())}  # pytest's own helpers (forkserver): not ours
    with local_prefect_server(port=port, home=tmp_path / "prefect-server", ui=False, env=FAST_SERVER) as url:
        server_up = time.monotonic() - started
        server_procs = [p for p in descendants(os.getpid()) if p.pid not in before]
        mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        params = write_tiny_params(tmp_path, mlflow_uri=mlflow_uri)
        env = {**_cli_env(tmp_path, url), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
               "PREFECT_LOGGING_LEVEL": "INFO", "XDG_CACHE_HOME": str(tmp_path / "cache")}
        log = tmp_path / "serve.log"
        serve_started = time.monotonic()
        with open(log, "wb") as out:
            serve = subprocess.Popen([str(DENSEPIPE), "serve", "--interval", "10", "--name", "test-schedule",
                                      "-p", str(params)], cwd=tmp_path, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_default_sigint)
        try:
            dep, (run, again) = _wait_for_completed_runs(url, f"{RETRAIN_FLOW}/test-schedule", serve,
                                                          log, count=2)
            first_run = time.monotonic() - serve_started
        finally:
            code, left = _interrupt(serve)
        assert left == [], f"processes left after Ctrl-C of densepipe serve: {left}"
        assert code == 0, log.read_text()[-4000:]

        text = log.read_text()
        assert f"serving deployment '{RETRAIN_FLOW}/test-schedule' every 10 s" in text and url in text
        assert run.auto_scheduled and again.auto_scheduled and run.parameters["params"] == str(params)
        assert dep.schedules[0].schedule.interval == timedelta(seconds=10)
        client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
        retrains = sorted((r for r in client.search_runs([client.get_experiment_by_name("densepipe")
                                                         .experiment_id])
                           if r.data.tags.get("densepipe.stage") == "retrain"),
                          key=lambda r: r.info.start_time)
        assert [r.data.tags["densepipe.retrain.outcome"] for r in retrains] == ["promoted", "skipped"]
        assert str(client.get_model_version_by_alias("densepipe", "champion").version) == "1"
        assert "skipped: nothing changed since densepipe@champion (version 1)" in text
        with SyncPrefectClient(url) as client:  # Ctrl-C paused the schedule; serving again resumes it
            assert client.read_deployment(dep.id).paused
    assert not _port_open(port), "the prefect server still listens after the context exited"
    assert still_alive(server_procs, timeout=5) == []
    print(f"timing: prefect server up {server_up:.1f} s; first scheduled run completed "
          f"{first_run:.1f} s after `densepipe serve` started (interval 10 s); "
          f"total {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_make_serve_wrapper_deploys_prefect_yaml_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """`python -m flows.server -- CMD` (make serve): CMD sees a live server; prefect.yaml deploys."""
    project = tmp_path / "project"
    shutil.copytree(REPO_ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "prefect.yaml", project / "prefect.yaml")
    prefect = BIN / "prefect"
    script = (f"set -e; {prefect} work-pool create densepipe --type process >/dev/null; "
              f"{prefect} --no-prompt deploy --name nightly; "
              f"{prefect} deployment inspect {RETRAIN_FLOW}/nightly -o json > {tmp_path / 'nightly.json'}; "
              f"echo CHILD-READY $PREFECT_API_URL; exec sleep 600")
    port = free_port()
    env = {**_cli_env(tmp_path, None), "PWD": str(project)}
    log = tmp_path / "wrapper.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        wrapper = subprocess.Popen([sys.executable, "-m", "flows.server", "--port", str(port), "--home",
                                    str(tmp_path / "prefect-server"), "--no-ui", "--", "bash", "-c", script],
                                   cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 150
        while "CHILD-READY" not in log.read_text() and time.monotonic() < deadline:
            assert wrapper.poll() is None, log.read_text()[-4000:]
            time.sleep(0.5)
        ready = time.monotonic() - started
    finally:
        code, left = _interrupt(wrapper)
    text = log.read_text()
    assert f"CHILD-READY http://127.0.0.1:{port}/api" in text, text[-4000:]
    assert f"Deployment '{RETRAIN_FLOW}/nightly' successfully created" in text
    deployment = json.loads((tmp_path / "nightly.json").read_text())
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["work_pool_name"] == "densepipe"
    assert deployment["entrypoint"] == "flows.retrain.retrain_flow"
    assert deployment["parameters"] == {"params": "params.yaml", "overrides": []}
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}]
    assert code == 128 + signal.SIGINT, text[-4000:]
    assert left == [], f"processes left after Ctrl-C of the wrapper: {left}"
    assert not _port_open(port)
    print(f"timing: wrapper + prefect deploy ready after {ready:.1f} s; "
          f"total {time.monotonic() - started:.1f} s")
