"""What a training stores: ``best.pt`` is weights only (no optimizer or other resume state),
``last.pt`` keeps everything resuming needs, and the files DVC tracks are the same bytes for the
same params and seed although every training is a new MLflow run (the run id lives in
``mlflow_run.json`` beside them, tied to each checkpoint by its sha256)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import stages, trained_model
from pipeline.config import load_config
from pipeline.engine.checkpoint import (
    RESUME_KEYS,
    RUN_RECORD,
    RunRecord,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.engine.trainer import TRACKED_OUTPUTS, load_trained_model, train
from pipeline.errors import CheckpointError
from pipeline.tracking import load_registered_model_info
from tests.conftest import REPO_ROOT, one_error_line, tiny_overrides

EXTRA = {"train__steps": 2, "train__eval_every": 1, "train__ema__decay": 0.9,
         "model__backbone": "mobilenet_v3_large"}
"""2 steps, best.pt picked at the evaluations of steps 1 and 2, with averaged weights; the
smallest backbone (files of 10-50 MB)."""


def _cfg(data: Path, out: Path, uri: str | None, **extra: object):
    return load_config(None, tiny_overrides(data, out, uri, **{**EXTRA, **extra}))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def untracked_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train.out_dir`` of one tiny training without MLflow (read only: copy what you change)."""
    out = tmp_path_factory.mktemp("untracked")
    train(_cfg(tiny_dataset, out, None))
    return out / "train"


# -- what each checkpoint holds -----------------------------------------------------------------
def test_best_pt_holds_weights_for_inference_and_no_resume_state(untracked_run: Path) -> None:
    best, last = load_checkpoint(untracked_run / "best.pt"), load_checkpoint(untracked_run / "last.pt")
    assert {"model", "model_ema", "config", "card", "step", "metrics", "best_value"} <= set(best)
    assert not set(RESUME_KEYS) & set(best), "best.pt carries resume state"
    assert "optimizer" not in best and "rng" not in best
    assert set(RESUME_KEYS) <= set(last)  # last.pt: everything resuming reads
    assert load_checkpoint(untracked_run / "last.pt", resume=True)["step"] == 2
    with pytest.raises(CheckpointError, match=r"best.pt: cannot resume from it: .* \(optimizer, "):
        load_checkpoint(untracked_run / "best.pt", resume=True)
    assert best["mlflow_run_id"] is None and last["mlflow_run_id"] is None  # tracking was off
    # best.pt is the two sets of weights and little else; last.pt adds AdamW's two moments
    weights = sum(t.numel() * t.element_size() for key in ("model", "model_ema")
                  for t in best[key].values())
    assert (untracked_run / "best.pt").stat().st_size < 1.02 * weights + 100_000
    assert (untracked_run / "last.pt").stat().st_size > 1.9 * weights
    # what evaluate / predict / register build from it: the averaged weights, config, card
    model, ckpt = load_trained_model(None, untracked_run / "best.pt")
    key = next(iter(ckpt["model_ema"]))
    assert torch.equal(model.state_dict()[key], ckpt["model_ema"][key])
    assert list(model.tasks) == ["semantic"] and ckpt["step"] == 2


def test_save_checkpoint_bytes_depend_on_the_payload_only(tmp_path: Path) -> None:
    """torch names the zip's folder after the file it writes to; the checkpoint's is always
    ``archive`` (not the random temporary name), and entries carry no dates. Equal strings give
    equal bytes whether or not they are one object (a value from params.yaml or a default)."""
    split = "train"
    payload = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3,
               "config": {"train": {"a": [1, 2]}, "data": {"split": split}}}
    one = tmp_path / "one" / "best.pt"
    digest = save_checkpoint(one, payload)
    copied = {**payload, "config": {**payload["config"], "data": {"split": "".join(["tr", "ain"])}}}
    assert copied["config"]["data"]["split"] is not split and copied == payload
    two = save_checkpoint(tmp_path / "two.pt", copied)
    assert digest == two == _sha256(one)
    assert load_checkpoint(one)["config"] == payload["config"]
    names = zipfile.ZipFile(one).namelist()
    assert names and all(n.startswith("archive/") for n in names), names
    assert sorted(p.name for p in one.parent.iterdir()) == ["best.pt"]  # no temporary file left


# -- resume -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resuming_from_a_weights_only_checkpoint_is_one_error_line(
        tiny_dataset: Path, untracked_run: Path, tmp_path: Path) -> None:
    """``best.pt`` copied over ``last.pt`` (say, to go on from the best weights): ``densepipe
    train`` names the file and what it lacks, and trains nothing."""
    out = tmp_path / "train"
    out.mkdir()
    shutil.copy(untracked_run / "best.pt", out / "last.pt")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_cfg(tiny_dataset, tmp_path, None).model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--params", str(params)],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    line = one_error_line(proc)
    assert line.startswith(f"error: {out / 'last.pt'}: cannot resume from it: it holds weights only")
    assert "(optimizer, scheduler, rng)" in line and "best.pt" in line
    assert _sha256(out / "last.pt") == _sha256(untracked_run / "best.pt")  # untouched
    assert not (out / "train_log.csv").exists() and not (out / RUN_RECORD).exists()


@pytest.mark.slow
def test_resume_continues_the_mlflow_run_its_record_names_and_no_other(
        tiny_dataset: Path, tmp_path: Path, mlflow_uri: str, untracked_run: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "train"
    first = stages.train(_cfg(tiny_dataset, tmp_path, mlflow_uri, train__steps=1))
    run_id = first["run_id"]
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["mlflow_run_id"] == run_id
    assert record["checkpoints"]["last.pt"] == [_sha256(out / "last.pt")]
    for name in TRACKED_OUTPUTS:  # the run id is in no file DVC tracks
        assert run_id.encode() not in (out / name).read_bytes(), name
    # evaluate and register find the training run through the record
    assert load_checkpoint(out / "best.pt")["mlflow_run_id"] == run_id
    cfg = _cfg(tiny_dataset, tmp_path, mlflow_uri)
    assert trained_model.load_model_to_evaluate(cfg, checkpoint=out / "best.pt")[2] == run_id
    registered = stages.register(cfg, metrics={"semantic/mIoU": 0.5})  # logs best.pt in its run
    info = load_registered_model_info(registered["model_uri"], tracking_uri=mlflow_uri)
    assert info["train_run_id"] == run_id and info["step"] == 1
    elsewhere = tmp_path / "copied" / "best.pt"  # a copy away from its record: no run
    elsewhere.parent.mkdir()
    shutil.copy(out / "best.pt", elsewhere)
    assert load_checkpoint(elsewhere)["mlflow_run_id"] is None

    resumed = stages.train(cfg)  # 2 steps: resumes from step 1 in the same MLflow run
    assert resumed["step"] == 2 and resumed["steps_run"] == 1 and resumed["run_id"] == run_id

    # another training's last.pt in its place: trained on, but as a new MLflow run
    shutil.copy(untracked_run / "last.pt", out / "last.pt")
    stranger = stages.train(_cfg(tiny_dataset, tmp_path, mlflow_uri, train__steps=3))
    assert stranger["steps_run"] == 1 and stranger["run_id"] not in (None, run_id)
    assert RunRecord.read(out).run_id == stranger["run_id"]
    assert load_checkpoint(out / "last.pt")["mlflow_run_id"] == stranger["run_id"]


# -- byte-stable outputs for DVC ----------------------------------------------------------------
@pytest.mark.slow
def test_two_trainings_in_two_mlflow_runs_write_identical_tracked_files(
        tiny_dataset: Path, tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``dvc repro --force`` does: delete the outs, train again with the same params. The
    second training is ``densepipe train`` in a new process with another hash seed: nothing may
    depend on process state (an unseeded generator, set order)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "train"
    cfg = _cfg(tiny_dataset, tmp_path, mlflow_uri)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    runs = [stages.train(cfg)["run_id"]]
    first = {name: _sha256(out / name) for name in TRACKED_OUTPUTS}
    for name in TRACKED_OUTPUTS:
        (out / name).unlink()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--params", str(params)],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "12345",
                               # this process's thread count: CPU kernels round differently with another
                               "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs.append(json.loads((out / stages.TRAIN_SUMMARY).read_text())["run_id"])  # untracked
    assert None not in runs and runs[0] != runs[1]
    assert {name: _sha256(out / name) for name in TRACKED_OUTPUTS} == first
    assert json.loads((out / RUN_RECORD).read_text())["mlflow_run_id"] == runs[1]  # untracked


def test_dvc_tracks_exactly_the_byte_stable_outputs() -> None:
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    folder = load_config(REPO_ROOT / "params.yaml", []).train.out_dir
    assert sorted(spec["stages"]["train"]["outs"]) == sorted(f"{folder}/{n}" for n in TRACKED_OUTPUTS)
    deps = spec["stages"]["evaluate"]["deps"]
    assert f"{folder}/best.pt" in deps and folder not in deps  # not the folder: it holds the record


def test_an_unreadable_run_record_is_ignored_with_a_warning(
        untracked_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copy(untracked_run / "best.pt", tmp_path / "best.pt")
    (tmp_path / RUN_RECORD).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.checkpoint"):
        assert load_checkpoint(tmp_path / "best.pt")["mlflow_run_id"] is None
    assert f"{tmp_path / RUN_RECORD}: ignored, not a densepipe run record" in caplog.text
