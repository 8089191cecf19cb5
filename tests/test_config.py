"""Configuration: params.yaml, --set overrides parsed as YAML, one-line errors listing what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import check_tasks, load_config
from pipeline.errors import ConfigError
from pipeline.registry import TaskRegistry

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_overrides_parse_as_yaml() -> None:
    cfg = load_config(REPO / "params.yaml", ["model.tasks=[semantic,depth]", "train.lr=0.01",
                                              "train.device=cpu", "model.heads.semantic.conv_dims=64"])
    assert cfg.model.tasks == ["semantic", "depth"]
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.train.device == "cpu"
    assert cfg.model.heads["semantic"]["conv_dims"] == 64
    assert cfg.data.synthetic.image_size == 128
    assert cfg.flat()["train.lr"] == 0.01


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", r"--set train.lrr: unknown key 'lrr' in train; allowed: steps, batch_size, lr,"),
        ("trian.lr=0.1",
         r"unknown key 'trian' in top level; allowed: data, model, train, evaluate, tracking"),
        ("train.lr=fast", r"train.lr: Input should be a valid number.*got 'fast'"),
        ("train.device=tpu", r"train.device: expected one of 'auto', 'cpu' or 'cuda', got 'tpu'"),
        ("train.steps=0", r"train.steps: Input should be greater than or equal to 1"),
        ("train.lr", r"expected KEY=VALUE"),
        ("data.scale_range=[1.25,0.75]", r"data.scale_range: .*0 < low <= high, got \[1.25, 0.75\]"),
        ("data.scale_range=[0,1]", r"data.scale_range: .*0 < low <= high, got \[0, 1\]"),
    ],
)
def test_bad_overrides_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(REPO / "params.yaml", [override])
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_names_the_key_and_allowed(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml: unknown key 'train.stepz'; allowed: steps,"):
        load_config(p)


def test_missing_explicit_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n  steps: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == (f"{bad}: not valid YAML at line 4, column 6: expected ',' or ']', "
                              "but got ':' (while parsing a flow sequence started at line 3)")


def test_unknown_task_name_lists_registered_tasks() -> None:
    cfg = load_config(REPO / "params.yaml", ["model.tasks=[semantic,segmantic]"])
    with pytest.raises(ConfigError, match=r"model.tasks: unknown task 'segmantic'; allowed: .*semantic"):
        check_tasks(cfg, TaskRegistry().names)


def test_unknown_backbone_is_a_config_error(tiny_dataset: Path) -> None:
    from pipeline.data.card import DatasetCard
    from pipeline.model import build_model

    cfg = load_config(None, ["model.backbone=resnet19"])
    with pytest.raises(ConfigError, match=r"resnet19.*resnet18"):
        build_model(cfg, DatasetCard.load(tiny_dataset / "meta.json"))


def test_head_options_are_validated_by_the_task() -> None:
    from pipeline.registry import default_registry

    task = default_registry().get("semantic")
    with pytest.raises(ConfigError,
                       match=r"model.heads.semantic.conv_dimz: .*options of semantic: conv_dims"):
        task.parse_options({"conv_dimz": 3})
