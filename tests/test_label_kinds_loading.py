"""Datasets decode only the label kinds the enabled tasks need; ``data.num_workers: auto``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import auto_num_workers, load_config
from pipeline.data import collate
from pipeline.data.reader import open_dataset
from pipeline.engine.loaders import eval_dataset, required_label_kinds, train_dataset
from tests.conftest import tiny_overrides

LABEL_KEYS = ("semantic", "instances", "panoptic", "depth", "normals")

# A real audit hook (sys.addaudithook cannot be removed): records the paths `open` is called with
# while `_OPENED` is a list.
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], str | bytes | Path):
        _OPENED.append(str(args[0] if not isinstance(args[0], bytes) else args[0].decode()))


sys.addaudithook(_audit)


def _opened_during(fn):  # type: ignore[no-untyped-def]
    global _OPENED
    _OPENED = []
    try:
        result = fn()
        return result, list(_OPENED)
    finally:
        _OPENED = None


def _cfg(root: Path, tmp_path: Path, tasks: str):  # type: ignore[no-untyped-def]
    return load_config("params.yaml", tiny_overrides(root, tmp_path, None, model__tasks=tasks,
                                                     data__augment=False))


def test_semantic_only_sample_has_no_other_labels_and_same_semantic(tiny_dataset: Path,
                                                                    tmp_path: Path) -> None:
    sem_ds = train_dataset(_cfg(tiny_dataset, tmp_path, "[semantic]"))
    all_ds = train_dataset(_cfg(tiny_dataset, tmp_path,
                                "[semantic,panoptic,depth,normals,keypoints]"))
    assert {"depth", "normals", "instances", "panoptic"} <= set(all_ds[0])  # the data has them
    for i in range(2):
        s, a = sem_ds[i], all_ds[i]
        assert [k for k in LABEL_KEYS if k in s] == ["semantic"]
        assert torch.equal(s["semantic"], a["semantic"])
        assert torch.equal(s["image"], a["image"])
    assert sem_ds.loaded_kinds == ("semantic",)  # type: ignore[attr-defined]
    assert set(sem_ds.label_kinds) == set(all_ds.label_kinds)  # what the split has: unchanged
    batch = collate([sem_ds[0], sem_ds[1]])
    assert batch["semantic"].shape[0] == 2 and "depth" not in batch
    assert all(i is None for i in batch.get("instances", [None]))


def test_semantic_only_reads_no_depth_or_normals_png(tiny_dataset: Path,
                                                              tmp_path: Path) -> None:
    sem_ds = train_dataset(_cfg(tiny_dataset, tmp_path, "[semantic]"))
    all_ds = train_dataset(_cfg(tiny_dataset, tmp_path, "[semantic,depth,normals]"))
    _, sem_files = _opened_during(lambda: sem_ds[0])
    _, all_files = _opened_during(lambda: all_ds[0])
    depth_dir = str(tiny_dataset / "depth" / "train")
    normals_dir = str(tiny_dataset / "normals" / "train")
    assert any(f.startswith(depth_dir) for f in all_files)  # the audit sees label reads
    assert any(f.startswith(normals_dir) for f in all_files)
    assert not any(f.startswith((depth_dir, normals_dir)) for f in sem_files), sem_files


def test_depth_only_reads_only_image_and_depth(tiny_dataset: Path) -> None:
    ds = open_dataset(tiny_dataset, "train", label_kinds=("depth",))
    sample, files = _opened_during(lambda: ds.load(0))
    assert [k for k in LABEL_KEYS if k in sample] == ["depth"]
    label_files = [f for f in files if f.startswith(str(tiny_dataset))
                   and not f.startswith(str(tiny_dataset / "images"))]
    assert label_files and all(f.startswith(str(tiny_dataset / "depth")) for f in label_files)
    full = open_dataset(tiny_dataset, "train").load(0)
    assert torch.equal(sample["depth"], full["depth"])


def test_instances_without_keypoints_when_only_instances_asked(tiny_dataset: Path) -> None:
    full = open_dataset(tiny_dataset, "train")
    if "keypoints" not in full.label_kinds:
        pytest.skip("the tiny dataset has no keypoints")
    inst = open_dataset(tiny_dataset, "train", label_kinds=("instances",)).load(0)
    both = full.load(0)
    assert "keypoints" not in inst["instances"] and "keypoints" in both["instances"]
    assert torch.equal(inst["instances"]["masks"], both["instances"]["masks"])
    assert [k for k in LABEL_KEYS if k in inst] == ["instances"]


def test_required_label_kinds_follow_task_dependencies() -> None:
    assert required_label_kinds(["semantic"]) == ("semantic",)
    # panoptic enables semantic and instance
    assert set(required_label_kinds(["panoptic"])) == {"semantic", "instances", "panoptic"}
    assert required_label_kinds(["colorization"]) == ()


def test_eval_dataset_decodes_everything_by_default(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_dataset, tmp_path, "[semantic]")
    assert "depth" in eval_dataset(cfg)[0]
    assert "depth" not in eval_dataset(cfg, tasks=["semantic"])[0]


def test_unknown_label_kind_is_one_line_error(tiny_dataset: Path) -> None:
    with pytest.raises(ValueError, match="unknown label kind.*'detph'"):
        open_dataset(tiny_dataset, "train", label_kinds=("detph",))


def test_num_workers_auto_and_explicit(tmp_path: Path) -> None:
    assert load_config("params.yaml", ["data.num_workers=auto"]).data.num_workers \
        == auto_num_workers()
    assert load_config("params.yaml", ["data.num_workers=3"]).data.num_workers == 3
    assert [auto_num_workers(n) for n in (1, 2, 3, 8, 64)] == [0, 1, 2, 4, 4]
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="data.num_workers.*'auto'"):
        load_config("params.yaml", ["data.num_workers=many"])
