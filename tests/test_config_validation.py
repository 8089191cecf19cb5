"""The whole config, plugins included, is checked before any data is read: ``train.best_metric``
(``auto`` and explicit), ``train.early_stopping.metric``, task options and task names, by
``stages.check_config`` and by ``densepipe config``."""

from __future__ import annotations

import json
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from pipeline import stages
from pipeline.config import Config, load_config, resolve_best_metric
from pipeline.errors import ConfigError
from pipeline.registry import TaskRegistry, default_registry
from tests.conftest import REPO_ROOT, one_error_line, tiny_overrides
from tests.example_plugin_loader import brightness_module

PARAMS = REPO_ROOT / "params.yaml"
DEMO_MAINS = ("semantic/mIoU, instance/segm_AP, keypoints/AP, panoptic/PQ, depth/rmse, "
              "normals/mean_angle, colorization/auc")


def densepipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, cwd=cwd)


def _resolved(cfg: Config, registry: TaskRegistry | None = None) -> str | None:
    registry = registry or default_registry()
    return resolve_best_metric(cfg.train.best_metric, cfg.model.tasks,
                               registry.resolve(cfg.model.tasks))


# -- train.best_metric: auto ---------------------------------------------------------------------
def test_auto_is_the_default_in_code_and_params_and_keeps_the_demo_metric() -> None:
    demo = load_config(PARAMS)
    assert Config().train.best_metric == demo.train.best_metric == "auto"
    assert _resolved(demo) == "semantic/mIoU"  # what params.yaml named before `auto`


@pytest.mark.parametrize(("tasks", "expected"), [
    ("[semantic]", "semantic/mIoU"),
    ("[depth]", "depth/rmse"),
    ("[depth,semantic]", "depth/rmse"),  # model.tasks order, not the registry's
    ("[panoptic]", "panoptic/PQ"),  # the named task first, not the semantic it enables
    ("[normals,colorization]", "normals/mean_angle"),
])
def test_auto_resolves_per_task_list(tasks: str, expected: str) -> None:
    assert _resolved(load_config(None, [f"model.tasks={tasks}"])) == expected
    assert _resolved(load_config(None, [f"model.tasks={tasks}",
                                        "train.best_metric=depth/delta1"])) == "depth/delta1"


def test_auto_without_a_main_metric_trains_with_best_as_the_last(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example plugin's task has no main_metric: ``auto`` resolves to nothing and ``best.pt``
    is the last checkpoint (decision: allowed, not refused; early stopping then needs a metric)."""
    from pipeline.engine.checkpoint import load_checkpoint
    from pipeline.engine.trainer import train

    registry = TaskRegistry(plugins=[brightness_module()])
    monkeypatch.setattr("pipeline.registry._default", registry)  # the loaders read it too
    over = tiny_overrides(tiny_dataset, tmp_path, None, train__steps=2, train__eval_every=1,
                          model__heads="{brightness: {conv_dims: 8}}", model__fpn_channels=16)
    cfg = load_config(None, [*over, "model.tasks=[brightness]"])
    assert _resolved(cfg, registry) is None
    result = train(cfg, registry=registry)
    best = load_checkpoint(result.best)
    assert best["step"] == result.step == 2 and best["best_value"] is None
    assert "brightness/mae" in best["metrics"]


def test_early_stopping_without_any_metric_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = TaskRegistry(plugins=[brightness_module()])
    monkeypatch.setattr("pipeline.registry._default", registry)
    cfg = load_config(None, ["model.tasks=[brightness]", "train.early_stopping.patience=2"])
    with pytest.raises(ConfigError, match=r"^train.early_stopping.patience=2: no metric to watch"):
        stages.check_config(cfg)
    stages.check_config(load_config(None, ["model.tasks=[brightness]"]))  # no early stop: fine
    # an undeclared task's metric names are not checked, only its prefix
    stages.check_config(load_config(None, ["model.tasks=[brightness]",
                                           "train.best_metric=brightness/mae"]))


# -- train.best_metric / early_stopping.metric: explicit -----------------------------------------
@pytest.mark.slow
def test_bad_best_metric_is_refused_before_the_data_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data"
    over = ["train.best_metric=edges/F1", f"data.root={missing}",
            f"train.out_dir={tmp_path / 'runs'}", "tracking.enabled=false"]
    cfg = load_config(PARAMS, over)
    expected = f"train.best_metric 'edges/F1': no enabled task reports it; enabled tasks' main " \
               f"metrics: {DEMO_MAINS}"
    for stage in (stages.train, stages.evaluate):
        with pytest.raises(ConfigError) as e:
            stage(cfg)
        assert str(e.value) == expected
    line = one_error_line(densepipe("train", "--params", str(PARAMS),
                                    *(f"--set={o}" for o in over), cwd=tmp_path))
    assert line == f"error: {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data, runs or mlflow.db touched


def test_metric_names_are_checked_where_the_task_declares_them() -> None:
    def check(*over: str) -> None:
        stages.check_config(load_config(None, ["model.tasks=[semantic,depth]", *over]))

    check("train.best_metric=depth/abs_rel")
    check("train.best_metric=semantic/IoU/wall")  # a per-class family (IoU/*)
    check("train.early_stopping.metric=semantic/pixel_acc", "train.early_stopping.patience=3")
    with pytest.raises(ConfigError) as e:
        check("train.best_metric=semantic/F1")
    assert str(e.value) == ("train.best_metric 'semantic/F1': no enabled task reports it; "
                            "semantic reports: mIoU, pixel_acc, mean_acc, fwIoU, IoU/*; enabled "
                            "tasks' main metrics: semantic/mIoU, depth/rmse")
    with pytest.raises(ConfigError, match=r"^train.early_stopping.metric 'normals/mean_angle': no "
                                          r"enabled task reports it;"):
        check("train.early_stopping.metric=normals/mean_angle")
    with pytest.raises(ConfigError, match=r"^train.best_metric 'depth': no enabled task"):
        check("train.best_metric=depth")


def test_builtin_tasks_declare_what_their_evaluators_report() -> None:
    """Every key of the demo's metrics.json matches its task's declared ``metrics``, and each
    built-in task's main metric is one of them."""
    registry = default_registry()
    for name in ("semantic", "instance", "keypoints", "panoptic", "depth", "normals", "colorization"):
        task = registry.get(name)
        assert task.metrics and task.main_metric in task.metrics, name
    keys = json.loads((REPO_ROOT / "metrics.json").read_text())
    for key in keys:
        task_name, _, metric = key.partition("/")
        patterns = registry.get(task_name).metrics
        assert any(fnmatchcase(metric, p) for p in patterns), key


# -- densepipe config ----------------------------------------------------------------------------
@pytest.mark.slow
def test_config_command_validates_task_options_and_names(tmp_path: Path, run_main) -> None:
    params = ["--params", str(PARAMS)]
    line = one_error_line(run_main("config", *params, "--set", "model.heads.semantic.bogus=1",
                                   cwd=tmp_path))
    assert line.startswith("error: model.heads.semantic.bogus: ")
    assert "options of semantic: " in line
    line = one_error_line(run_main("config", *params, "--set", "model.heads.nosuchtask.x=1",
                                   cwd=tmp_path))
    assert "unknown task 'nosuchtask'; allowed: " + ", ".join(default_registry().names) in line
    line = one_error_line(run_main("config", *params, "--set", "train.best_metric=edges/F1",
                                   cwd=tmp_path))
    assert line == f"error: train.best_metric 'edges/F1': no enabled task reports it; enabled " \
                   f"tasks' main metrics: {DEMO_MAINS}"
    ok = densepipe("config", *params, cwd=tmp_path)  # the installed script
    assert ok.returncode == 0, ok.stderr
    assert "best_metric: auto" in ok.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []
