"""DVC over the stages: the plot data `evaluate` writes for `dvc plots`, and the whole dvc.yaml
(deps, params, outs, metrics, plots, the remote of .dvc/config) under real dvc in a temporary git
repository."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline.metrics.plot_data import (
    per_class_iou_rows,
    pr_curve_rows,
    pr_file_name,
    write_plot_files,
)
from tests.conftest import REPO_ROOT, TINY_DATA, tiny_overrides


def _tiny_params(data_root: str) -> dict:
    """params.yaml content for a 2-step run on a tiny dataset, keeping dvc.yaml's output paths."""
    from pipeline.config import load_config

    over = tiny_overrides(Path(data_root), Path("runs"), None, train__steps=2)
    over = [o for o in over if not o.startswith(("train.out_dir", "evaluate.", "tracking."))]
    over += [f"{k}={v}" for k, v in TINY_DATA.items()]
    over += ["tracking.log_model=false", "evaluate.num_visualizations=1"]
    return load_config(None, over).model_dump(mode="json")


# -- plot data --------------------------------------------------------------------------------
def test_per_class_iou_rows_from_metric_keys() -> None:
    metrics = {"semantic/IoU/wall": 0.5, "semantic/IoU/sky": 0.25, "semantic/mIoU": 0.375,
               "depth/abs_rel": 0.1, "semantic/IoU/box": float("nan"), "semantic/IoU/a/b": 1.0}
    assert per_class_iou_rows(metrics) == [{"class": "wall", "IoU": 0.5}, {"class": "sky", "IoU": 0.25},
                                           {"class": "a/b", "IoU": 1.0}]
    two = {"semantic/IoU/wall": 0.5, "parts/IoU/leg": 0.125}
    assert per_class_iou_rows(two) == [{"class": "semantic/wall", "IoU": 0.5},
                                       {"class": "parts/leg", "IoU": 0.125}]
    assert per_class_iou_rows({"depth/rmse": 1.0}) == []


def test_pr_curve_rows_average_categories_with_ground_truth() -> None:
    """T=2 IoU thresholds x R=3 recall levels x K=3 categories (the last without ground truth)
    x A=1 x M=2; the curve is at IoU 0.5 and the last maxDets."""
    precision = -np.ones((2, 3, 3, 1, 2))
    precision[0, :, 0, 0, 1] = [1.0, 0.5, 0.0]
    precision[0, :, 1, 0, 1] = [1.0, 1.0, 0.5]
    precision[0, :, :2, 0, 0] = 0.25  # maxDets 1: not used
    precision[1, :, :2, 0, 1] = 0.125  # IoU 0.55: not used
    recall, ious = np.array([0.0, 0.5, 1.0]), np.array([0.5, 0.55])
    rows = pr_curve_rows(precision, recall, ious)
    assert rows == [{"recall": 0.0, "precision": 1.0}, {"recall": 0.5, "precision": 0.75},
                    {"recall": 1.0, "precision": 0.25}]
    assert pr_curve_rows(precision, recall, ious, iou=0.55) == [
        {"recall": r, "precision": 0.125} for r in (0.0, 0.5, 1.0)]
    assert pr_curve_rows(-np.ones((2, 3, 3, 1, 2)), recall, ious) == []  # no ground truth at all
    with pytest.raises(ValueError, match="IoU threshold 0.75 is not among"):
        pr_curve_rows(precision, recall, ious, iou=0.75)
    with pytest.raises(ValueError, match=r"shape \(3, 3, 3, 1, 2\)"):
        pr_curve_rows(-np.ones((3, 3, 3, 1, 2)), recall, ious)


def test_write_plot_files_writes_json_records(tmp_path: Path) -> None:
    assert pr_file_name("instance", "bbox") == "pr_instance_bbox.json"
    assert pr_file_name("keypoints", "keypoints") == "pr_keypoints.json"
    curve = [{"recall": 0.0, "precision": 1.0}, {"recall": 1.0, "precision": 0.5}]
    written = write_plot_files(tmp_path, metrics={"semantic/IoU/wall": 0.5},
                               pr_curves={"pr_instance_bbox.json": curve, "pr_keypoints.json": []})
    assert written == [tmp_path / "per_class_iou.json", tmp_path / "pr_instance_bbox.json"]
    assert json.loads((tmp_path / "per_class_iou.json").read_text()) == [{"IoU": 0.5, "class": "wall"}]
    assert json.loads((tmp_path / "pr_instance_bbox.json").read_text()) == curve
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_class_iou.json", "pr_instance_bbox.json"]


def _box_batch(image_id: int, gt_box: list[float]) -> dict[str, Any]:
    return {"image": torch.zeros(1, 3, 40, 40, dtype=torch.uint8), "image_ids": [image_id],
            "file_names": [f"{image_id}.png"], "meta": [{}], "has": {"instances": torch.tensor([True])},
            "instances": [{"boxes": torch.tensor([gt_box]), "labels": torch.tensor([0]),
                           "iscrowd": torch.tensor([False])}]}


def _dets(boxes: list[list[float]], scores: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor(boxes), "scores": torch.tensor(scores),
             "labels": torch.zeros(len(boxes), dtype=torch.int64)}]


def test_coco_precision_recall_curve_is_ap50s(tmp_path: Path) -> None:
    """Two images with one box each; detections TP (0.9), FP (0.8), TP (0.7): precision 1 up to
    recall 0.5, then 2/3 up to recall 1. The curve's mean is pycocotools' bbox AP50."""
    from pipeline.data.card import ClassInfo, DatasetCard
    from pipeline.engine.evaluation import write_plots
    from plugins.rcnn.evaluator import CocoEvaluator

    card = DatasetCard("boxes", [ClassInfo(id=1, name="box", color=(255, 0, 0), isthing=True)])
    ev = CocoEvaluator(card, iou_types=("bbox",))
    assert ev.precision_recall() == {}
    ev.process(_box_batch(1, [5.0, 5.0, 25.0, 25.0]),
               _dets([[5.0, 5.0, 25.0, 25.0], [30.0, 30.0, 39.0, 39.0]], [0.9, 0.8]))
    ev.process(_box_batch(2, [10.0, 10.0, 30.0, 30.0]), _dets([[10.0, 10.0, 30.0, 30.0]], [0.7]))
    metrics = {f"instance/{k}": v for k, v in ev.compute().items()}
    assert metrics["instance/bbox_AP50"] == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)

    folder = write_plots(tmp_path / "plots", metrics=metrics, evaluators={"instance": ev})
    assert sorted(p.name for p in folder.iterdir()) == ["pr_instance_bbox.json"]  # no per-class IoU
    rows = json.loads((folder / "pr_instance_bbox.json").read_text())
    assert len(rows) == 101 and rows[0]["recall"] == 0.0 and rows[-1]["recall"] == 1.0
    assert {r["precision"] for r in rows if r["recall"] <= 0.5} == {1.0}
    assert {r["precision"] for r in rows if r["recall"] > 0.5} == {round(2 / 3, 6)}
    mean = sum(r["precision"] for r in rows) / len(rows)
    assert mean == pytest.approx(metrics["instance/bbox_AP50"], abs=1e-6)


# -- dvc end to end ---------------------------------------------------------------------------
def _dvc_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def _code_deps(spec: dict[str, Any]) -> list[str]:
    """The deps dvc.yaml names that no stage produces: the files a checkout must have."""
    outs = {next(iter(o)) if isinstance(o, dict) else o
            for stage in spec["stages"].values() for key in ("outs", "metrics", "plots")
            for o in stage.get(key, [])}
    deps = {d for stage in spec["stages"].values() for d in stage.get("deps", [])}
    return sorted(deps - outs)


# Loaded by every Python process of the test (PYTHONPATH): a `densepipe <stage>` process writes the
# project modules it imported to <DENSEPIPE_TEST_TRACE>/<stage>.txt when it exits, and the config
# keys it read (pipeline.config.READS, DENSEPIPE_RECORD_CONFIG_READS) to <stage>.params.txt.
_IMPORT_TRACE = """
import atexit, os, sys


def _dump():
    if os.path.basename(sys.argv[0]) != "densepipe" or len(sys.argv) < 2:
        return
    root = os.environ["DENSEPIPE_TEST_ROOT"] + os.sep
    files = sorted({m.__file__[len(root):] for m in list(sys.modules.values())
                    if (getattr(m, "__file__", None) or "").startswith(root)})
    with open(os.path.join(os.environ["DENSEPIPE_TEST_TRACE"], sys.argv[1] + ".txt"), "w") as f:
        f.write("\\n".join(files))
    reads = sorted(getattr(sys.modules.get("pipeline.config"), "READS", None) or ())
    with open(os.path.join(os.environ["DENSEPIPE_TEST_TRACE"], sys.argv[1] + ".params.txt"), "w") as f:
        f.write("\\n".join(reads))


atexit.register(_dump)
"""


def _python_files(root: Path, deps: list[str]) -> set[str]:
    """The .py files among ``deps`` (files, and the files inside folders)."""
    found = set()
    for dep in deps:
        path = root / dep
        if path.is_dir():
            found |= {str(p.relative_to(root)) for p in path.rglob("*.py") if "__pycache__" not in p.parts}
        elif path.suffix == ".py":
            found.add(dep)
    return found


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _stages_run(output: str) -> set[str]:
    return {s for s in ("prepare", "train", "evaluate") if f"Running stage '{s}'" in output}


def _digests(root: Path, *folders: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted((root / folder).rglob("*")) if p.is_file()}


def _experiments(exp_show: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The experiment revisions' ``data`` (params, metrics) in ``dvc exp show --json`` output."""
    return [rev["data"] for base in exp_show for exp in base.get("experiments") or []
            for rev in exp["revs"]]


@pytest.mark.slow
def test_dvc_pipeline_repro_experiments_metrics_plots_and_remote(tmp_path: Path) -> None:
    """A checkout holding only what dvc.yaml names (the stages import their code from there, and
    what they import is traced), the project's .dvc/config and .gitignore, tiny params with the
    semantic and instance tasks (2 steps at 64 px). About 70 s on 2 busy cores."""
    spec = _dvc_yaml()
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in [*_code_deps(spec), "dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config",
                 ".dvc/.gitignore"]:
        src, dst = REPO_ROOT / item, repo / item
        assert src.exists(), f"dvc.yaml or the test names {item}, which the checkout lacks"
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    params = _tiny_params("data/synthetic")
    params["model"]["tasks"] = ["semantic", "instance"]
    params["model"]["heads"]["instance"] = {"preset": "cpu"}
    params["train"]["lr"] = 0.002
    params["tracking"]["enabled"] = False  # tracking.* is no stage param; MLflow costs seconds here
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    hooks, trace = tmp_path / "hooks", tmp_path / "trace"
    hooks.mkdir()
    trace.mkdir()
    (hooks / "sitecustomize.py").write_text(_IMPORT_TRACE)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
           "PYTHONPATH": os.pathsep.join([str(repo), str(hooks)]),
           "DENSEPIPE_TEST_ROOT": str(repo), "DENSEPIPE_TEST_TRACE": str(trace),
           "DENSEPIPE_RECORD_CONFIG_READS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    git, dvc = ["git"], [bin_dir + "/dvc"]
    _run(git + ["init", "-q"], repo, env)
    config = dict(line.split("=", 1) for line in _run(dvc + ["config", "--list", "--project"], repo,
                                                      env).splitlines() if "=" in line)
    assert config["core.analytics"] == "false" and config["core.check_update"] == "false"
    remote = config["core.remote"]
    assert config[f"remote.{remote}.url"] == str(tmp_path / "densepipe-dvc-storage")  # beside the repo
    _run(dvc + ["remote", "modify", "--local", remote, "url", str(tmp_path / "remote")], repo, env)

    # the first repro runs every stage; each imports exactly the code dvc.yaml names as its deps
    assert _stages_run(_run(dvc + ["repro"], repo, env)) == {"prepare", "train", "evaluate"}
    for name, stage in spec["stages"].items():
        imported = set((trace / f"{name}.txt").read_text().split())
        listed = _python_files(repo, stage["deps"])
        assert imported == listed, (f"dvc.yaml stage {name}: imported, no dep: {sorted(imported - listed)}; "
                                    f"a dep, not imported: {sorted(listed - imported)}")
        # every config key the stage read is one of its params (tracking.* by design is none)
        read = set((trace / f"{name}.params.txt").read_text().split())
        params_listed = [p if isinstance(p, str) else next(iter(p)) for p in stage["params"]]
        untracked = sorted(k for k in read if not k.startswith("tracking.") and not any(
            k == p or k.startswith(p + ".") for p in params_listed))
        assert untracked == [], f"dvc.yaml stage {name} reads params it does not list: {untracked}"
    # outputs, metrics and plot data are there
    metrics = json.loads((repo / "metrics.json").read_text())
    assert 0.0 <= metrics["semantic/mIoU"] <= 1.0 and "instance/bbox_AP50" in metrics
    plots = repo / "runs/eval/plots"
    iou = {r["class"]: r["IoU"] for r in json.loads((plots / "per_class_iou.json").read_text())}
    assert iou == {k.split("/", 2)[2]: round(v, 6) for k, v in metrics.items()
                   if k.startswith("semantic/IoU/")}
    assert set(iou) >= {"wall", "floor", "sky"}
    for iou_type in ("bbox", "segm"):
        curve = json.loads((plots / f"pr_instance_{iou_type}.json").read_text())
        assert len(curve) == 101 and curve[-1]["recall"] == 1.0
        mean = sum(r["precision"] for r in curve) / len(curve)
        assert mean == pytest.approx(metrics[f"instance/{iou_type}_AP50"], abs=1e-5)
    header = (repo / "runs/train/train_log.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "step" and "loss" in header  # dvc.yaml's x and y
    assert (repo / "runs/eval/vis_grid.png").stat().st_size > 0

    # nothing changed: nothing runs (the __pycache__ the stages left in deps is .dvcignored)
    again = _run(dvc + ["repro"], repo, env)
    assert _stages_run(again) == set() and "Data and pipelines are up to date" in again
    _run(git + ["add", "-A"], repo, env)
    _run(git + ["commit", "-q", "-m", "pipeline run"], repo, env)

    # training again from scratch writes the same bytes: dvc.lock stays, evaluate need not rerun
    forced = _run(dvc + ["repro", "--force", "--single-item", "train"], repo, env)
    assert _stages_run(forced) == {"train"}
    assert _run(git + ["status", "--porcelain", "dvc.lock"], repo, env) == "", \
        _run(git + ["diff", "dvc.lock"], repo, env)
    assert "Data and pipelines are up to date" in _run(dvc + ["status"], repo, env)
    committed = _run(git + ["ls-files"], repo, env).split()
    assert {"dvc.lock", "metrics.json"} <= set(committed)
    assert not any(f.startswith(("data/", "runs/")) for f in committed)

    # push; a clean clone pulls the same bytes and has nothing to rerun
    _run(dvc + ["push"], repo, env)
    clone = tmp_path / "clone"
    _run(git + ["clone", "-q", str(repo), str(clone)], tmp_path, env)
    _run(dvc + ["remote", "modify", "--local", remote, "url", str(tmp_path / "remote")], clone, env)
    _run(dvc + ["pull"], clone, env)
    from pipeline.engine.checkpoint import LOCK_NAME, RUN_RECORD
    from pipeline.stages import TRAIN_SUMMARY

    untracked = {f"runs/train/{name}" for name in (LOCK_NAME, RUN_RECORD, TRAIN_SUMMARY)}
    pushed = {k: v for k, v in _digests(repo, "data", "runs").items() if k not in untracked}
    assert _digests(clone, "data", "runs") == pushed
    assert _stages_run(_run(dvc + ["repro"], clone, env)) == set()

    # train.lr changes: train and evaluate rerun, prepare does not
    params["train"]["lr"] = 0.001
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert _stages_run(_run(dvc + ["repro"], repo, env)) == {"train", "evaluate"}
    new_metrics = json.loads((repo / "metrics.json").read_text())
    rows = [line.split() for line in _run(dvc + ["metrics", "diff", "--all", "--precision", "8"], repo,
                                          env).splitlines()]
    row = next(r for r in rows if r[:2] == ["metrics.json", "semantic/mIoU"])  # path metric HEAD workspace
    assert float(row[2]) == pytest.approx(metrics["semantic/mIoU"], abs=1e-7)
    assert float(row[3]) == pytest.approx(new_metrics["semantic/mIoU"], abs=1e-7)

    # plots: the HTML embeds the per-class IoU, both PR curves, the loss curve and the image
    _run(dvc + ["plots", "show", "-o", str(tmp_path / "plots")], repo, env)
    html = (tmp_path / "plots/index.html").read_text()
    for needle in ("per_class_iou", '"class": "wall"', "pr_instance_bbox.json", "pr_instance_segm.json",
                   '"recall": 0.5', "training loss", '"loss"', "vis_grid"):
        assert needle in html, needle
    assert list((tmp_path / "plots/static").glob("*vis_grid*.png"))

    # an experiment back at the committed train.lr: DVC's run cache restores train's and evaluate's
    # outputs from the first run instead of training again; the experiment is listed
    assert params["train"]["lr"] != 0.002 and yaml.safe_load(
        _run(git + ["show", "HEAD:params.yaml"], repo, env))["train"]["lr"] == 0.002
    out = _run(dvc + ["exp", "run", "-S", "train.lr=0.002"], repo, env)
    assert _stages_run(out) == set() and "Stage 'train' is cached" in out
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 0.002
    assert json.loads((repo / "metrics.json").read_text()) == metrics
    [exp] = _experiments(json.loads(_run(dvc + ["exp", "show", "--json"], repo, env)))
    assert exp["params"]["params.yaml"]["data"]["train"]["lr"] == 0.002
    assert exp["metrics"]["metrics.json"]["data"]["semantic/mIoU"] == metrics["semantic/mIoU"]
