"""Crashes: what a killed run leaves behind and what the next one does with it.

Stale temporary files of our outputs are removed at start-up (only while no live training holds
the folder), ``train_log.csv`` keeps every step once across a crash and resume, loader workers
die with a ``kill -9``-ed trainer, and a checkpoint that is a pickled object is refused in one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.trainer import TrainLog, train
from pipeline.errors import CheckpointError, DensepipeError
from pipeline.hookspecs import hookimpl
from tests.conftest import REPO_ROOT, tiny_overrides


def _cfg(data: Path, out: Path, **extra: object):
    return load_config(None, tiny_overrides(data, out, None, **extra))


def _csv_steps(path: Path) -> list[int]:
    return [int(line.split(",", 1)[0]) for line in path.read_text().splitlines()[1:]]


# -- stale temporary files ------------------------------------------------------------------------
def test_start_up_removes_only_the_stale_temp_files_of_our_outputs(
        tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "train"
    out.mkdir()
    stale = {".last.pt.k2x_9abc.tmp": 3000, ".best.pt.abcdefgh.tmp": 500,
             ".config.yaml.q1w2e3r4.tmp": 7, ".train_log.csv.zzzzzzzz.tmp": 0}
    for name, size in stale.items():
        (out / name).write_bytes(b"x" * size)
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"keep")
    kept = [".other.pt.abcdefgh.tmp", "last.pt.abcdefgh.tmp", ".last.pt.abcdefgh.tmp.bak",
            ".last.pt..tmp", ".metrics.json.abcdefgh.tmp", "notes.txt"]
    for name in kept:
        (out / name).write_bytes(b"user")
    (out / ".best.pt.folder00.tmp").mkdir()  # ours by name, but a folder: not touched
    (out / ".last.pt.symlink0.tmp").symlink_to(outside)  # a link: not followed, not removed
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.checkpoint"):
        train(_cfg(tiny_dataset, tmp_path, train__steps=1))
    left = {p.name for p in out.iterdir()}
    assert not left & set(stale), left
    assert set(kept) | {".best.pt.folder00.tmp", ".last.pt.symlink0.tmp"} <= left
    assert outside.read_bytes() == b"keep"
    lines = [r.getMessage() for r in caplog.records if "temporary file" in r.getMessage()]
    assert lines == [f"{out}: removed 4 temporary files (3.5 kB) left by a killed run"], lines
    assert (out / ".lock").read_text() == ""  # released: no pid left behind


_HOLD = """
import sys
from pipeline.engine.checkpoint import hold_out_dir
with hold_out_dir(sys.argv[1]) as held:
    print(held, flush=True)
    sys.stdin.read()
"""


@pytest.mark.slow
def test_a_live_training_keeps_its_folder_and_its_temp_files(tiny_dataset: Path,
                                                               tmp_path: Path) -> None:
    """While another process holds ``train.out_dir`` its temp files may be live writes: a second
    training refuses to start and removes nothing; once the holder is killed, the next one cleans."""
    out = tmp_path / "train"
    out.mkdir()
    writing = out / ".last.pt.livewrit.tmp"
    writing.write_bytes(b"half a checkpoint")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], cwd=REPO_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        with pytest.raises(DensepipeError, match=rf"another densepipe training \(pid {holder.pid}\)"
                                                 r" is writing to this train.out_dir"):
            train(_cfg(tiny_dataset, tmp_path, train__steps=1))
        assert writing.exists() and not (out / "last.pt").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait()
    train(_cfg(tiny_dataset, tmp_path, train__steps=1))
    assert not writing.exists() and (out / "last.pt").exists()


# -- train_log.csv across a crash -----------------------------------------------------------------
class _KeepStep2:
    """Copies ``last.pt`` as it was at step 2 (just before the step-4 checkpoint replaces it)."""

    def __init__(self, copy: Path) -> None:
        self.copy = copy

    @hookimpl
    def densepipe_on_checkpoint(self, state: Any, payload: dict, path: Path) -> None:
        if path.name == "last.pt" and state.step == 4:
            shutil.copy(path, self.copy)


@pytest.mark.slow
def test_resume_keeps_the_whole_train_log_each_step_once(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    train(_cfg(tiny_dataset, tmp_path, train__steps=4, train__checkpoint_every=2),
          hooks=[("keep-step-2", _KeepStep2(tmp_path / "step2.pt"))])
    log = out / "train_log.csv"
    full = log.read_text()
    assert _csv_steps(log) == [1, 2, 3, 4]

    # killed between writing the log at step 4 and replacing last.pt: log to 4, checkpoint at 2
    shutil.copy(tmp_path / "step2.pt", out / "last.pt")
    assert load_checkpoint(out / "last.pt")["step"] == 2
    result = train(_cfg(tiny_dataset, tmp_path, train__steps=4, train__checkpoint_every=2))
    assert len(result.losses) == 2  # steps 3 and 4 again
    assert log.read_text() == full  # rows 3, 4 dropped and redone: the same run, byte for byte

    train(_cfg(tiny_dataset, tmp_path, train__steps=6, train__checkpoint_every=2))
    assert _csv_steps(log) == [1, 2, 3, 4, 5, 6]
    assert log.read_text().splitlines()[:5] == full.splitlines()


def test_a_fresh_start_replaces_an_old_train_log(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    out.mkdir()
    (out / "train_log.csv").write_text("step,loss,old\n1,9,9\n2,9,9\n3,9,9\n")
    train(_cfg(tiny_dataset, tmp_path, train__steps=2))
    lines = (out / "train_log.csv").read_text().splitlines()
    assert "old" not in lines[0] and _csv_steps(out / "train_log.csv") == [1, 2]


def test_train_log_keeps_rows_to_the_resume_step_with_the_union_of_columns(tmp_path: Path) -> None:
    path = tmp_path / "train_log.csv"
    path.write_text("step,a,loss\n1,0.5,2\n2,nan,1.5\nbroken line\n3,9,9\n")
    log = TrainLog(path, resume_step=2)
    log.add(3, {"loss": 1.25, "b": 7.0})
    log.write()
    assert path.read_text() == "step,a,b,loss\n1,0.5,nan,2\n2,nan,nan,1.5\n3,nan,7,1.25\n"


# -- loader workers die with the trainer ----------------------------------------------------------
_TRAIN = ("import sys; from pipeline.config import load_config; from pipeline.engine.trainer "
          "import train; train(load_config(None, sys.argv[1:]))")


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie (exited, not yet reaped by whoever adopted it) is gone."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
def test_kill_9_of_the_trainer_takes_its_loader_workers_and_forkserver_along(
        tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    over = tiny_overrides(tiny_dataset, tmp_path, None, train__steps=100_000,
                          train__checkpoint_every=1, data__num_workers=2)
    trainer = subprocess.Popen([sys.executable, "-c", _TRAIN, *over], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not (out / "last.pt").exists():  # batches came from the workers: they are up
            assert trainer.poll() is None, trainer.stderr.read().decode() if trainer.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.1)
        family = psutil.Process(trainer.pid).children(recursive=True)
        names = [" ".join(p.cmdline()) for p in family]
        assert sum("forkserver" in n for n in names) >= 3, names  # the server and two workers
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 10
        while _alive(family) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(family), [" ".join(p.cmdline())[:120] for p in _alive(family)]
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for p in _alive(family):
            p.kill()
    # the log was written before each checkpoint: it covers every step last.pt holds
    step = load_checkpoint(out / "last.pt")["step"]
    assert _csv_steps(out / "train_log.csv")[:step] == list(range(1, step + 1))


# -- a checkpoint that is a pickled object ---------------------------------------------------------
_PICKLE_OBJECT = """
import pickle, sys
class Payload:
    pass
with open(sys.argv[1], "wb") as f:
    pickle.dump({"model": Payload()}, f, protocol=4)
"""


@pytest.mark.slow
def test_a_pickled_object_as_checkpoint_is_one_error_line_naming_its_class(tmp_path: Path) -> None:
    """A raw pickle (protocol 4: torch warns about the protocol before it fails) via the CLI."""
    bad = tmp_path / "bad.pt"
    subprocess.run([sys.executable, "-c", _PICKLE_OBJECT, str(bad)], check=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", "img.png",
                           "--checkpoint", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {bad}: refuses to load: the file is a pickled object (Unsupported "
                     "global: GLOBAL __main__.Payload), not a densepipe checkpoint; only weights "
                     "are loaded (torch.load weights_only=True)"], proc.stderr


def test_a_saved_module_or_a_truncated_file_is_one_line_and_no_warning(tmp_path: Path) -> None:
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(module.read_bytes()[:300])
    legacy = tmp_path / "legacy.pt"  # torch's pre-zip format: pickles in a row
    torch.save(torch.nn.Linear(2, 2), legacy, _use_new_zipfile_serialization=False)
    expected = {module: "refuses to load: the file is a pickled object (Unsupported global: "
                        "GLOBAL torch.nn.modules.linear.Linear), not a densepipe checkpoint",
                legacy: "refuses to load: the file is a pickled object (Unsupported global: "
                        "GLOBAL torch.nn.modules.linear.Linear), not a densepipe checkpoint",
                truncated: "not a readable checkpoint (truncated or corrupt?): "}
    for path, message in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning would fail here
            with pytest.raises(CheckpointError) as caught:
                load_checkpoint(path)
        text = str(caught.value)
        assert text.startswith(f"{path}: {message}") and "\n" not in text and "\x1b" not in text
        assert len(text) - len(str(path)) < 250, text
