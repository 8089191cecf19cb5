"""The Prefect flows under Prefect's test harness: the pipeline end to end with its MLflow parent
run, nested stage runs, registered model and markdown artifact; prepare's cache; retry policy."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from prefect.states import Failed

from pipeline.errors import ConfigError, DataError, TrackingError, TrackingUnreachableError
from tests.conftest import write_tiny_params


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)  # cached task results live here: one per session
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    if old is None:
        os.environ.pop("PREFECT_HOME", None)
    else:
        os.environ["PREFECT_HOME"] = old


def _task_states(flow_state) -> dict[str, str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


@pytest.mark.slow
def test_pipeline_flow_tracks_registers_and_reports(prefect_harness, tmp_path: Path, mlflow_uri: str,
                                                    monkeypatch) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import REPORT_KEY, pipeline_flow

    monkeypatch.chdir(tmp_path)
    params = write_tiny_params(tmp_path, mlflow_uri=mlflow_uri)
    state = pipeline_flow(params=str(params), overrides=["train.steps=2", "tracking.log_model=true"],
                          return_state=True)
    assert state.is_completed(), state.message
    metrics = state.result()
    assert 0.0 <= metrics["semantic/mIoU"] <= 1.0
    assert (tmp_path / "runs" / "train" / "best.pt").exists()
    assert set(_task_states(state)) == {"prepare", "train", "evaluate", "register"}

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("densepipe").experiment_id])
    parents = [r for r in runs if r.data.tags.get("densepipe.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.metrics["semantic/mIoU"] == pytest.approx(metrics["semantic/mIoU"])
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    children = {r.data.tags["densepipe.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"prepare", "train", "evaluate", "register"}
    assert children["train"].data.params["train.steps"] == "2"
    assert client.get_metric_history(children["train"].info.run_id, "train/loss")[-1].step == 2
    assert "metrics.json" in {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    version = client.get_model_version("densepipe", "1")
    assert version.tags["metric.semantic/mIoU"] == f"{metrics['semantic/mIoU']:.6g}"

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[REPORT_KEY])))
    assert len(artifacts) == 1 and artifacts[0].type == "markdown"
    report = artifacts[0].data
    assert f"| semantic/mIoU | {metrics['semantic/mIoU']:.4f} |" in report
    assert f"/runs/{parent.info.run_id})" in report and "models:/densepipe/1" in report


@pytest.mark.slow
def test_prepare_is_cached_until_its_data_or_params_change(prefect_harness, tmp_path: Path,
                                                           monkeypatch) -> None:
    from flows.pipeline import prepare_flow

    monkeypatch.chdir(tmp_path)
    params = str(write_tiny_params(tmp_path, mlflow_uri=None))
    first = prepare_flow(params=params, return_state=True)
    assert first.result()["rendered"] is True and _task_states(first) == {"prepare": "Completed"}
    again = prepare_flow(params=params, return_state=True)
    assert _task_states(again) == {"prepare": "Cached"}

    shutil.rmtree(tmp_path / "data")  # a cache entry whose data is gone is refreshed, not trusted
    gone = prepare_flow(params=params, return_state=True)
    assert _task_states(gone) == {"prepare": "Completed"} and (tmp_path / "data" / "meta.json").exists()
    other = prepare_flow(params=params, overrides=["data.synthetic.seed=1"], return_state=True)
    assert _task_states(other) == {"prepare": "Completed"} and other.result()["seed"] == 1


def test_retries_only_what_a_retry_can_fix() -> None:
    from flows.tasks import evaluate_task, prepare_task, register_task, retry_transient, train_task

    def retried(error: BaseException) -> bool:
        return retry_transient(None, None, Failed(data=error))

    assert retried(OSError("NFS hiccup")) and retried(TimeoutError())
    assert retried(TrackingUnreachableError("tracking.uri http://x: MLflow server not reachable"))
    assert not retried(TrackingError("--model models:/x/1: cannot load it"))
    assert not retried(FileNotFoundError("runs/train/best.pt"))
    assert not retried(ConfigError("train.lr: expected a number"))
    assert not retried(DataError("data/x.png", "not a PNG")) and not retried(KeyError("bug"))
    assert prepare_task.retries == evaluate_task.retries == register_task.retries == 2
    assert prepare_task.retry_delay_seconds == 10 and train_task.retries == 0


@pytest.mark.slow
def test_sweep_runs_trials_on_a_dask_cluster(prefect_harness, tmp_path: Path, mlflow_uri: str,
                                             monkeypatch) -> None:
    pytest.importorskip("prefect_dask", reason="the dask runner needs prefect-dask (densepipe[dask])")
    from flows.sweep import sweep_flow, task_runner

    monkeypatch.chdir(tmp_path)
    params = str(write_tiny_params(tmp_path, mlflow_uri=mlflow_uri))
    trials = sweep_flow.with_options(task_runner=task_runner("dask", workers=2))(
        grid={"train.lr": [0.05, 0.1]}, params=params, out_dir=str(tmp_path / "sweep"))
    assert sorted(t["overrides"][0] for t in trials) == ["train.lr=0.05", "train.lr=0.1"]
    assert trials[0]["metrics"]["semantic/mIoU"] >= trials[1]["metrics"]["semantic/mIoU"]
    for t in trials:
        assert (tmp_path / "sweep" / t["trial"] / "train" / "best.pt").exists()
    import json

    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == trials
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    trained = {t["run_id"]: client.get_run(t["run_id"]) for t in trials}
    assert {r.data.params["train.lr"] for r in trained.values()} == {"0.05", "0.1"}
    parents = {r.data.tags["mlflow.parentRunId"] for r in trained.values()}
    assert len(parents) == 1 and client.get_run(parents.pop()).info.run_name == "sweep"


def test_sweep_grid_and_runner_errors() -> None:
    from flows.sweep import grid_points, task_runner

    assert grid_points({"train.lr": [0.1, 0.2], "train.batch_size": [4]}) == [
        ["train.lr=0.1", "train.batch_size=4"], ["train.lr=0.2", "train.batch_size=4"]]
    with pytest.raises(ConfigError, match=r"grid train.lr: expected a non-empty list of values, got 0.1"):
        grid_points({"train.lr": 0.1})
    with pytest.raises(ConfigError, match=r"runner 'spark': expected one of thread, dask"):
        task_runner("spark")


@pytest.mark.slow
def test_train_flow_runs_torchrun_on_two_processes(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    from flows.pipeline import prepare_flow, train_flow
    from pipeline.engine.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    params = str(write_tiny_params(tmp_path, mlflow_uri=None))
    prepare_flow(params=params)
    summary = train_flow(params=params, overrides=["train.steps=2"], nproc_per_node=2)
    assert summary["step"] == 2
    assert load_checkpoint(tmp_path / "runs" / "train" / "last.pt")["world_size"] == 2


def test_flows_package_gives_the_temporary_server_two_minutes_unless_set() -> None:
    """Prefect's own 20 s start-up wait for its temporary server is about what start-up takes on a
    fresh PREFECT_HOME on 2 cores; importing ``flows`` (as ``densepipe run`` does before Prefect)
    raises it to 120 s, and a value the user set stays. Fresh interpreters (run side by side):
    Prefect reads its settings once, when first imported."""
    import subprocess
    import sys

    key = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    base = {k: v for k, v in os.environ.items() if k != key}
    code = ("import flows\n"
            "from prefect.settings import get_current_settings\n"
            "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
             for env in (base, {**base, key: "7"})]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [o[-1] for o in outs] == ["120", "7"]


def _runs_by_id(client: mlflow.MlflowClient) -> dict[str, mlflow.entities.Run]:
    experiment = client.get_experiment_by_name("densepipe").experiment_id
    return {r.info.run_id: r for r in client.search_runs([experiment])}


def _parents(runs: dict[str, mlflow.entities.Run]) -> dict[str, str | None]:
    return {run_id: r.data.tags.get("mlflow.parentRunId") for run_id, r in runs.items()}


@pytest.mark.slow
def test_a_run_keeps_its_parent_and_skipped_stages_say_so(prefect_harness, tmp_path: Path, mlflow_uri: str,
                                                         monkeypatch, capfd, caplog) -> None:
    """`dvc repro` trains (a top-level run); a `densepipe run` that trains nothing, one that resumes,
    and another that trains nothing: no run ever changes parent, and each pipeline run says which
    stage it skipped or resumed, and from which run."""
    from flows.pipeline import pipeline_flow
    from pipeline import stages
    from pipeline.config import load_config

    monkeypatch.chdir(tmp_path)
    params = str(write_tiny_params(tmp_path, mlflow_uri=mlflow_uri))
    stages.prepare(load_config(params, []))
    trained = stages.train(load_config(params, []))  # as `dvc repro` runs it: no parent
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)

    def pipeline(*overrides: str) -> tuple[mlflow.entities.Run, dict[str, str | None]]:
        before = _parents(_runs_by_id(client))
        state = pipeline_flow(params=params, overrides=list(overrides), return_state=True)
        assert state.is_completed(), state.message
        runs = _runs_by_id(client)
        assert {k: v for k, v in _parents(runs).items() if k in before} == before, "a run changed parent"
        (new_parent,) = [r for k, r in runs.items() if k not in before
                         and r.data.tags.get("densepipe.stage") == "pipeline"]
        return new_parent, {r.data.tags["densepipe.stage"]: k for k, r in runs.items()
                            if r.data.tags.get("mlflow.parentRunId") == new_parent.info.run_id}

    capfd.readouterr()
    first, children = pipeline()
    assert set(children) == {"prepare", "evaluate"}  # nothing trained, nothing registered
    note = first.data.tags["densepipe.skipped.train"]
    assert note.startswith("nothing trained: ") and "at step 2 of train.steps=2" in note
    assert note.endswith(f"trained in MLflow run {trained['run_id']}")
    # on the terminal too (where it lands under pytest depends on when Prefect set up its logging)
    assert note in capfd.readouterr().err + caplog.text
    assert client.get_run(trained["run_id"]).data.tags.get("mlflow.parentRunId") is None

    second, children = pipeline("train.steps=4")  # resumes the dvc run: it stays top-level
    assert set(children) == {"evaluate", "register"}
    assert second.data.tags["densepipe.resumed.train"] == (
        f"resumed MLflow run {trained['run_id']} (a top-level run) at step 2, trained 2 steps to step 4")
    resumed = client.get_run(trained["run_id"])
    assert resumed.data.tags.get("mlflow.parentRunId") is None and resumed.info.status == "FINISHED"
    assert client.get_metric_history(trained["run_id"], "train/loss")[-1].step == 4
    # the cache answered with the first pipeline's prepare, the only prepare run there is
    (prepare_run,) = [k for k, r in _runs_by_id(client).items()
                      if r.data.tags["densepipe.stage"] == "prepare"]
    assert second.data.tags["densepipe.skipped.prepare"].startswith("cached: Prefect's prepare cache")
    assert second.data.tags["densepipe.skipped.prepare"].endswith(f"prepared in MLflow run {prepare_run}")

    third, children = pipeline("train.steps=4")  # nothing to train: the second's runs stay its own
    assert "densepipe.skipped.train" in third.data.tags and set(children) == {"evaluate"}


@pytest.mark.slow
def test_a_failed_stage_leaves_its_error_on_the_runs_and_the_flow_state(prefect_harness, tmp_path: Path,
                                                                       mlflow_uri: str, monkeypatch) -> None:
    from flows.pipeline import pipeline_flow
    from pipeline.errors import OutputError

    monkeypatch.chdir(tmp_path)
    params = str(write_tiny_params(tmp_path, mlflow_uri=mlflow_uri))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")  # prepare refuses to replace it
    state = pipeline_flow(params=params, return_state=True)
    assert state.is_failed()
    with pytest.raises(OutputError) as raised:
        state.result()
    line = str(raised.value)
    assert "\n" not in line and str(tmp_path / "data") in line
    assert state.message == f"Flow run encountered an exception: OutputError: {line}"
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    runs = {r.data.tags["densepipe.stage"]: r for r in _runs_by_id(client).values()}
    assert set(runs) == {"pipeline", "prepare"}
    for run in runs.values():
        assert run.info.status == "FAILED" and run.data.tags["densepipe.error"] == line
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


@contextlib.contextmanager
def _webhook() -> Iterator[tuple[str, list[dict]]]:
    """A loopback HTTP listener recording the JSON body of every POST (answers 204)."""
    import http.server
    import threading

    received: list[dict] = []

    class Listener(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def _champion(client: mlflow.MlflowClient) -> str:
    return str(client.get_model_version_by_alias("densepipe", "champion").version)


@pytest.mark.slow
def test_retrain_trains_skips_promotes_keeps_and_rolls_back(prefect_harness, tmp_path: Path,
                                                            mlflow_uri: str, tiny_dataset: Path,
                                                            monkeypatch) -> None:
    """The retraining loop on a folder dataset: first run promotes, an unchanged one skips; new
    data trains a challenger promoted or kept by the rule; `densepipe promote` rolls back."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from typer.testing import CliRunner

    from flows.retrain import OUTCOME_TAG, REPORT_KEY, retrain_flow
    from pipeline.cli import app
    from pipeline.data.synthetic import write_synthetic_dataset

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "users-data"
    shutil.copytree(tiny_dataset, data)
    params = str(write_tiny_params(tmp_path, mlflow_uri=mlflow_uri))
    base = [f"data.root={data}", "data.source=folder", "train.steps=2", "tracking.log_model=true"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    always = ["promote.min_gain=-100", "promote.tolerance=100"]  # any challenger wins
    never = ["promote.min_gain=100"]  # no challenger wins

    with _webhook() as (url, posted):
        hook = [f"promote.notify_url={url}"]
        first = retrain_flow(params=params, overrides=base + hook)
        assert first["outcome"] == "promoted" and first["challenger"] == "1" and first["champion"] is None
        assert _champion(client) == "1"

        second = retrain_flow(params=params, overrides=base + hook + never)  # the rule is no input
        assert second["outcome"] == "skipped" and second["champion"] == "1"
        assert second["reason"].startswith("skipped: nothing changed since densepipe@champion (version 1)")
        assert len(client.search_model_versions("name='densepipe'")) == 1  # nothing trained

        shutil.rmtree(data)  # new data arrives: more training images
        write_synthetic_dataset(data, num_train=10, num_val=4, image_size=64, seed=1, workers=1)
        third = retrain_flow(params=params, overrides=base + hook + always)
        assert (third["outcome"], third["challenger"], third["champion"]) == ("promoted", "2", "1")
        assert _champion(client) == "2"
        v1 = client.get_model_version("densepipe", "1").tags
        v2 = client.get_model_version("densepipe", "2").tags
        # the champion was trained on the old data and re-evaluated on the new
        assert v1["densepipe.inputs.data"] != v2["densepipe.inputs.data"]
        assert v1["densepipe.eval.data"] == v2["densepipe.eval.data"] == v2["densepipe.inputs.data"]
        assert v2["densepipe.decision"] == "promoted" and v2["densepipe.compared_with"] == "1"

        fourth = retrain_flow(params=params, overrides=base + hook + never, force=True)
        assert (fourth["outcome"], fourth["challenger"], fourth["champion"]) == ("kept", "3", "2")
        assert _champion(client) == "2"
        v3 = client.get_model_version("densepipe", "3").tags
        assert v3["densepipe.decision"] == "kept" and v3["densepipe.compared_with"] == "2"
        assert "ok=" in v3["densepipe.compare.semantic/mIoU"]

    assert [p["outcome"] for p in posted] == ["promoted", "skipped", "promoted", "kept"]
    assert posted[3]["challenger"] == "3" and posted[3]["comparison"]["champion"] == "2"

    runs = client.search_runs([client.get_experiment_by_name("densepipe").experiment_id])
    retrains = sorted((r for r in runs if r.data.tags.get("densepipe.stage") == "retrain"),
                      key=lambda r: r.info.start_time)
    assert [r.data.tags[OUTCOME_TAG] for r in retrains] == ["promoted", "skipped", "promoted", "kept"]
    assert {a.path for a in client.list_artifacts(retrains[2].info.run_id, "comparison")} == {
        "comparison/comparison.md", "comparison/comparison.png", "comparison/comparison.json"}
    with get_client(sync_client=True) as prefect:
        reports = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[REPORT_KEY])))
    assert any("**kept** `@champion` on v2; challenger v3 stays registered" in a.data for a in reports)

    cli = CliRunner()
    sets = [arg for o in base for arg in ("--set", o)]
    rolled = cli.invoke(app, ["promote", "--rollback", "-p", params, *sets])
    assert rolled.exit_code == 0, rolled.output
    assert "densepipe@champion: version 2 -> 1" in rolled.output
    assert _champion(client) == "1"
    moved = cli.invoke(app, ["promote", "--version", "3", "-p", params, *sets])
    assert moved.exit_code == 0 and _champion(client) == "3"
    promotes = [r for r in client.search_runs([retrains[0].info.experiment_id])
                if r.data.tags.get("densepipe.stage") == "promote"]
    assert sorted((r.data.params["promote.from"], r.data.params["promote.to"]) for r in promotes) == [
        ("1", "2"), ("1", "3"), ("2", "1"), ("none", "1")]
    bad = cli.invoke(app, ["promote", "--version", "9", "-p", params, *sets])
    assert bad.exit_code != 0 and _champion(client) == "3"
