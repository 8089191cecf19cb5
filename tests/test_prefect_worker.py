"""prefect.yaml's worker path as an operator runs it: a real `prefect server`, `prefect deploy`, a process
worker, one run to Completed with its MLflow parent and nested runs.

The project folder holds only params.yaml and prefect.yaml (no copy of the code), so the run proves
the flow loads from the installed package, whatever the working folder holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.server import free_port, local_prefect_server
from tests.conftest import REPO_ROOT, write_tiny_params

BIN = Path(sys.executable).parent
FLOW_NAME = "densepipe-retrain"
FAST_SERVER = {"PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}


def _env(tmp_path: Path, api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-client"), "PREFECT_API_URL": api_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                "XDG_CACHE_HOME": str(tmp_path / "cache"),  # the data fingerprints' cache
                "PWD": str(tmp_path / "project")})  # prefect.yaml pulls into {{ $PWD }}: the shell's folder
    return env


def _prefect(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 240.0) -> str:
    """Run ``prefect ARGS``; its output (stdout and stderr, through a file: a flow run started by a
    worker inherits them). Fails with the output's tail on a non-zero exit or a timeout."""
    log = cwd.parent / f"prefect-{args[0]}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"prefect {' '.join(args)} still running after {timeout:g} s:\n"
                        f"{log.read_text()[-4000:]}")
    text = log.read_text()
    assert code == 0, f"prefect {' '.join(args)} exited {code}:\n{text[-4000:]}"
    return text


@pytest.mark.slow
def test_worker_runs_the_prefect_yaml_deployment_to_completed(tmp_path: Path) -> None:
    import mlflow
    from prefect.client.orchestration import SyncPrefectClient

    project = tmp_path / "project"
    project.mkdir()
    store = f"sqlite:///{project / 'mlflow.db'}"
    write_tiny_params(project, mlflow_uri=store)
    shutil.copy(REPO_ROOT / "prefect.yaml", project / "prefect.yaml")
    # a folder named like the package's modules, as a user's project may have: it must not matter
    (project / "pipeline").mkdir()
    (project / "flows").mkdir()

    started = time.monotonic()
    with local_prefect_server(port=free_port(), home=tmp_path / "prefect-server", ui=False,
                              env=FAST_SERVER) as url:
        env = _env(tmp_path, url)
        _prefect(["work-pool", "create", "densepipe", "--type", "process"], cwd=project, env=env)
        _prefect(["--no-prompt", "deploy", "--name", "nightly"], cwd=project, env=env)
        _prefect(["deployment", "run", f"{FLOW_NAME}/nightly"], cwd=project, env=env)
        worker = _prefect(["worker", "start", "--pool", "densepipe", "--run-once"], cwd=project, env=env)
        with SyncPrefectClient(url) as client:
            deployment = client.read_deployment_by_name(f"{FLOW_NAME}/nightly")
            runs = [r for r in client.read_flow_runs() if r.deployment_id == deployment.id
                    and not r.state_name == "Scheduled"]
    log = worker
    assert deployment.entrypoint == "flows.retrain.retrain_flow"
    assert [r.state_name for r in runs] == ["Completed"], log[-4000:]
    (run,) = runs
    assert "Traceback" not in log, log[-4000:]

    client = mlflow.MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "densepipe"]
    all_runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in all_runs if r.data.tags.get("prefect.flow_run_id") == str(run.id)]
    assert parent.info.run_name == f"retrain-{run.name}" and parent.info.status == "FINISHED"
    assert parent.data.tags["densepipe.retrain.outcome"] == "promoted"  # the first model
    children = {r.data.tags["densepipe.stage"]: r for r in all_runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"prepare", "train", "evaluate", "register", "promote"}
    assert {r.info.status for r in children.values()} == {"FINISHED"}
    assert 0.0 <= parent.data.metrics["semantic/mIoU"] <= 1.0
    assert children["evaluate"].data.metrics["semantic/mIoU"] == parent.data.metrics["semantic/mIoU"]
    (version,) = client.search_model_versions("name='densepipe'")
    assert version.run_id == children["train"].info.run_id
    assert str(client.get_model_version_by_alias("densepipe", "champion").version) == str(version.version)
    print(f"timing: server, deploy and one worker run Completed in {time.monotonic() - started:.1f} s")


def test_the_pipeline_file_loaded_by_path_says_to_use_the_module_entrypoint(tmp_path: Path) -> None:
    """A file entrypoint (``flows/pipeline.py:pipeline_flow``) used to fail deep inside the run with
    ``No module named 'pipeline.data.card'``; it now fails at load with what to write instead."""
    code = ("from prefect.flows import load_flow_from_entrypoint\n"
            f"load_flow_from_entrypoint({str(REPO_ROOT / 'flows' / 'pipeline.py')!r} + ':pipeline_flow', "
            "use_placeholder_flow=False)\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "shadows densepipe's pipeline package; use the module entrypoint flows.pipeline.pipeline_flow" \
        in proc.stderr, proc.stderr[-2000:]
