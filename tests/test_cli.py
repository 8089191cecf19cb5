"""The `densepipe` command: bad input gives one `error:` line and exit code 2, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, one_error_line


def densepipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in ``cwd`` (a temp folder: nothing may land in the checkout)."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, cwd=cwd)


@pytest.mark.slow
def test_bad_override_and_unknown_task(tmp_path: Path, run_main) -> None:
    params = ["--params", str(REPO_ROOT / "params.yaml")]
    # the installed script once, the rest through main() in this process (the same code)
    line = one_error_line(densepipe("config", *params, "--set", "train.lrr=1", cwd=tmp_path))
    assert "unknown key 'lrr' in train; allowed:" in line
    line = one_error_line(run_main("train", *params, "--set", "model.tasks=[semantic,sky]",
                                   "--set", f"data.root={tmp_path}", cwd=tmp_path))
    assert "unknown task 'sky'" in line and "semantic" in line
    line = one_error_line(run_main("train", *params, "--set", "model.backbone=vgg", cwd=tmp_path))
    assert "unknown backbone 'vgg'; allowed: mobilenet_v3_large, resnet18" in line
    line = one_error_line(run_main("config", *params, "--set", "train.steps=abc", cwd=tmp_path))
    assert line.startswith("error: --set train.steps=abc: train.steps: ")  # not params.yaml
    line = one_error_line(run_main("train", *params, "--set", f"data.root={tmp_path}", cwd=tmp_path))
    assert str(tmp_path) in line and "layout" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written: no runs/, no mlflow.db


def _labels(folder: Path, name: str, arr: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(folder / name)


def test_semseg_eval_prints_table_and_writes_json(tmp_path: Path) -> None:
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 1]])
    _labels(tmp_path / "gt", "a.png", gt)
    _labels(tmp_path / "pred", "a.png", pred)
    out = tmp_path / "m.json"
    proc = densepipe("semseg-eval", "--gt-dir", str(tmp_path / "gt"), "--pred-dir",
                     str(tmp_path / "pred"), "--num-classes", "3", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json

    m = json.loads(out.read_text())
    # confusion (rows gt): [[1,1,0],[0,3,0],[1,0,1]]; 5 of 7 correct
    assert m["semantic/pixel_acc"] == pytest.approx(5 / 7)
    assert m["semantic/mIoU"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert "mIoU" in proc.stdout


@pytest.mark.slow
def test_semseg_eval_bad_folders(tmp_path: Path) -> None:
    _labels(tmp_path / "gt", "a.png", np.zeros((4, 4)))
    _labels(tmp_path / "gt", "b.png", np.zeros((4, 4)))
    _labels(tmp_path / "pred", "a.png", np.full((4, 4), 7))
    line = one_error_line(densepipe("semseg-eval", "--gt-dir", str(tmp_path / "gt"), "--pred-dir",
                                     str(tmp_path / "pred"), "--num-classes", "3",
                                     "--json", str(tmp_path / "m.json"), cwd=tmp_path))
    assert "b.png" in line
    (tmp_path / "gt" / "b.png").unlink()
    line = one_error_line(densepipe("semseg-eval", "--gt-dir", str(tmp_path / "gt"), "--pred-dir",
                                     str(tmp_path / "pred"), "--num-classes", "3",
                                     "--json", str(tmp_path / "m.json"), cwd=tmp_path))
    assert "a.png" in line and "7" in line
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_show_sample_draws_every_label_and_rejects_bad_index(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "sample.png"
    proc = densepipe("show-sample", "--root", str(tiny_dataset), "--index", "1", "--split", "val",
                     "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        assert im.width > 4 * 64 and im.mode == "RGB"  # six panels and a legend side by side
    line = one_error_line(densepipe("show-sample", "--root", str(tiny_dataset), "--index", "99",
                                     "--split", "val", "--out", str(tmp_path / "x.png"), cwd=tmp_path))
    assert "99" in line and "val" in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_user_text_is_printed_literally(tmp_path: Path) -> None:
    """Paths are not rich markup: `[/x]` does not crash, `[red]` is not swallowed."""
    params = ["--params", str(REPO_ROOT / "params.yaml")]
    name = "a[/x]my[red]ck.png"
    line = one_error_line(densepipe("predict", name, *params, "--checkpoint", "c.pt", cwd=tmp_path))
    assert line == f"error: {name}: image file not found"
