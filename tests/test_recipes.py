"""The published recipes (``recipes/*.yaml``): each loads over ``params.yaml`` through its ``base``
key, passes ``check_config`` with the published schedule's values, and trains a few steps on a tiny
fixture of its dataset's official layout, with only the sizes a CPU run needs overridden."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import stages
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from tests.test_format_cityscapes import TRAIN as CITY_TRAIN
from tests.test_format_cityscapes import _write_split as write_cityscapes_split
from tests.test_format_nyuv2 import _write as write_nyuv2
from tests.test_reader import _write_coco2017 as write_coco2017

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
COCO = RECIPES / "coco_mask_rcnn_r50_fpn_1x.yaml"
CITYSCAPES = RECIPES / "cityscapes_semantic_512x1024.yaml"
NYUV2 = RECIPES / "nyuv2_semantic_depth_normals.yaml"


def tiny(recipe: Path, data_root: Path, out: Path, *extra: str) -> Config:
    """``recipe`` with only what a tiny CPU run needs overridden: sizes, steps, device, outputs."""
    return load_config(recipe, [
        f"data.root={data_root}", "data.image_size=32", "data.test_size=0",
        "data.test_max_size=null", "data.num_workers=0",
        "model.backbone=resnet18", "model.pretrained=null",
        "train.steps=2", "train.batch_size=2", "train.warmup_steps=1", "train.eval_every=0",
        "train.checkpoint_every=2", "train.device=cpu", "train.precision=fp32",
        "train.progress=false", f"train.out_dir={out / 'train'}",
        f"evaluate.out_dir={out / 'eval'}", f"evaluate.metrics_file={out / 'metrics.json'}",
        "evaluate.batch_size=2", "evaluate.num_visualizations=0",
        "tracking.enabled=false", "tracking.log_model=false", *extra])


# -- loading and validation -----------------------------------------------------------------------
def test_every_recipe_loads_over_params_and_validates() -> None:
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(
        p.name for p in (COCO, CITYSCAPES, NYUV2))
    base = load_config(ROOT / "params.yaml")
    for recipe in (COCO, CITYSCAPES, NYUV2):
        cfg = load_config(recipe)
        stages.check_config(cfg)
        assert cfg.tracking == base.tracking  # inherited from params.yaml through `base`

    coco = load_config(COCO)
    assert (coco.data.source, coco.model.tasks, coco.model.backbone) == ("coco", ["instance"], "resnet50")
    assert (coco.train.steps, coco.train.batch_size, coco.train.lr, coco.train.optimizer) == (
        90000, 16, 0.02, "sgd")
    assert (coco.train.warmup_steps, coco.train.weight_decay, coco.train.momentum) == (1000, 1e-4, 0.9)
    assert (coco.data.test_size, coco.data.test_max_size) == (800, 1333)
    assert (coco.model.pretrained, coco.model.freeze_bn, coco.model.freeze_at) == ("imagenet", True, 2)
    assert coco.model.heads["instance"]["preset"] == "gpu" and coco.model.loss_weights["instance"] == 1.0

    city = load_config(CITYSCAPES)
    assert (city.data.source, city.model.tasks, city.data.test_size) == ("cityscapes", ["semantic"], 1024)
    assert (city.train.steps, city.train.batch_size, city.train.schedule) == (80000, 8, "poly")
    assert city.data.image_size in (512, 768)

    nyu = load_config(NYUV2)
    assert (nyu.data.source, nyu.data.options) == ("nyuv2", {"classes": 13})
    assert nyu.model.tasks == ["semantic", "depth", "normals"] and nyu.model.output_stride == 8
    assert {nyu.model.heads[t]["decoder"] for t in nyu.model.tasks} == {"aspp"}
    assert nyu.model.heads["semantic"]["conv_dims"] == 128  # not params.yaml's 32 (merged over)


def test_base_is_deep_merged_under_the_file_and_overrides_win(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "model": {"tasks": ["semantic", "depth"], "heads": {"semantic": {"conv_dims": 32, "norm": "BN"}}},
        "train": {"steps": 10, "lr": 0.5}}))
    sub = tmp_path / "recipes"
    sub.mkdir()
    (sub / "r.yaml").write_text("base: ../base.yaml\nmodel:\n  heads:\n    semantic: {conv_dims: 64}\n"
                                "train: {steps: 20}\n")
    cfg = load_config(sub / "r.yaml", ["train.lr=0.1"])
    assert cfg.model.tasks == ["semantic", "depth"]  # from the base
    assert cfg.model.heads["semantic"] == {"conv_dims": 64, "norm": "BN"}  # merged key by key
    assert (cfg.train.steps, cfg.train.lr) == (20, 0.1)  # the file over the base, --set over both
    # a base may have a base
    (tmp_path / "r2.yaml").write_text("base: recipes/r.yaml\ntrain: {steps: 30}\n")
    assert load_config(tmp_path / "r2.yaml").model.heads["semantic"]["conv_dims"] == 64


def test_missing_base_and_cycles_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"r.yaml: base: nowhere.yaml not found"):
        load_config(tmp_path / "r.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(tmp_path / "self.yaml")
    (tmp_path / "bad.yaml").write_text("base: [x]\n")
    with pytest.raises(ConfigError, match="base: expected the path of a params file"):
        load_config(tmp_path / "bad.yaml")


# -- a few training steps on each recipe's dataset layout -----------------------------------------
@pytest.mark.slow
def test_coco_recipe_trains_on_a_coco2017_folder(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    write_coco2017(root)  # val2017 only: train on it too
    cfg = tiny(COCO, root, tmp_path / "out", "data.train_split=val")
    stages.check_config(cfg)
    summary = stages.train(cfg)
    assert summary["step"] == 2 and summary["skipped_nonfinite"] == 0
    assert "instance/segm_AP" in summary["metrics"]


@pytest.mark.slow
def test_cityscapes_recipe_trains_on_a_cityscapes_folder(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    write_cityscapes_split(root, "train", CITY_TRAIN)
    write_cityscapes_split(root, "val", {"frankfurt": ["frankfurt_000000_000294"]})
    cfg = tiny(CITYSCAPES, root, tmp_path / "out")
    stages.check_config(cfg)
    summary = stages.train(cfg)
    assert summary["step"] == 2 and summary["skipped_nonfinite"] == 0
    assert "semantic/mIoU" in summary["metrics"]


@pytest.mark.slow
def test_nyuv2_recipe_trains_on_mtan_arrays(tmp_path: Path) -> None:
    write_nyuv2(tmp_path / "nyu")
    cfg = tiny(NYUV2, tmp_path / "nyu", tmp_path / "out")
    stages.check_config(cfg)
    summary = stages.train(cfg)
    assert summary["step"] == 2 and summary["skipped_nonfinite"] == 0
    assert {"semantic/mIoU", "depth/abs_rel", "normals/mean_angle"} <= set(summary["metrics"])
