"""Dense label kinds from plugins: a task plugin registers ``edges`` and the reader, transforms,
collate and training handle it without any core change (``pipeline.data.label_kinds``)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.formats import LABEL_KINDS, wanted_label_kinds
from pipeline.data.reader import open_dataset, split_label_kinds
from pipeline.data.sample import DENSE_KEYS, UNKNOWN_VALUE
from pipeline.data.transforms import (
    RandomScaleCrop,
    collate,
    crop_sample,
    hflip_sample,
    resize_sample,
    scale_crop_sample,
)
from pipeline.hookspecs import hookimpl
from pipeline.registry import TaskRegistry
from tests import edges_label_plugin
from tests.conftest import tiny_overrides


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> TaskRegistry:
    """The process registry with the edges plugin added, and its kinds as the process's."""
    reg = TaskRegistry(plugins=[edges_label_plugin])
    monkeypatch.setattr("pipeline.registry._default", reg)
    monkeypatch.setattr("pipeline.data.label_kinds._process_kinds", reg.dense_label_kinds)
    return reg


def _edges_of(sem: np.ndarray) -> np.ndarray:
    """A known function of the semantic map: parity of the class index, 255 where ignored."""
    return np.where(sem == 255, 255, sem % 2).astype(np.uint8)


@pytest.fixture
def edges_dataset(tmp_path: Path, tiny_dataset: Path) -> Path:
    """The tiny dataset plus ``edges/{train,val}/*.png`` (derived from semantic), except for the
    first train image."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    for split in ("train", "val"):
        out = root / "edges" / split
        out.mkdir(parents=True)
        for i, png in enumerate(sorted((root / "semantic" / split).glob("*.png"))):
            if split == "train" and i == 0:
                continue
            Image.fromarray(_edges_of(np.asarray(Image.open(png)))).save(out / png.name)
    return root


def test_registered_kind_joins_the_label_kinds(registry: TaskRegistry) -> None:
    assert "edges" in registry.dense_label_kinds
    assert tuple(LABEL_KINDS) == ("semantic", "instances", "panoptic", "depth", "normals",
                                  "keypoints", "edges")
    assert tuple(DENSE_KEYS) == ("semantic", "depth", "normals", "edges")
    assert UNKNOWN_VALUE["edges"] == 255 and UNKNOWN_VALUE["semantic"] == 255
    assert registry.get("edges").requires == ("edges",)


def test_without_the_plugin_the_kind_is_unknown() -> None:
    assert "edges" not in LABEL_KINDS and "edges" not in TaskRegistry().dense_label_kinds
    with pytest.raises(ValueError, match="unknown label kind"):
        wanted_label_kinds(("semantic", "edges"))


class _Duplicate:
    __name__ = "dup_plugin"

    @hookimpl
    def densepipe_register_label_kinds(self) -> list:
        return [edges_label_plugin.EDGES]


class _ShadowsDepth:
    __name__ = "depth_again"

    @hookimpl
    def densepipe_register_label_kinds(self) -> list:
        from dataclasses import replace

        return [replace(edges_label_plugin.EDGES, name="depth")]


def test_duplicate_kind_name_is_an_error_naming_both_providers() -> None:
    reg = TaskRegistry(plugins=[edges_label_plugin, _Duplicate(), _ShadowsDepth()])
    errors = {e.name: e.error for e in reg.entries() if e.error}
    assert errors["dup_plugin"] == ("label kind 'edges' of dup_plugin is already provided by "
                                    f"{edges_label_plugin.__name__}")
    assert errors["depth_again"] == ("label kind 'depth' of depth_again is already provided by "
                                     "pipeline.data.label_kinds (built in)")
    assert reg.dense_label_kinds["edges"] is edges_label_plugin.EDGES  # the first keeps it
    assert reg.dense_label_kinds["depth"].dtype == torch.float32  # the built-in stays


def test_reader_reads_the_kind_from_its_folder(registry: TaskRegistry, edges_dataset: Path) -> None:
    ds = open_dataset(edges_dataset, "train")
    assert "edges" in ds.label_kinds
    assert split_label_kinds(edges_dataset, "train") == ds.label_kinds
    assert "edges" not in ds[0]  # its file is missing: a missing key, not an error
    s = ds[1]
    assert s["edges"].dtype == torch.uint8 and s["edges"].shape == s["semantic"].shape
    assert torch.equal(s["edges"], torch.from_numpy(_edges_of(s["semantic"].numpy())))
    assert "edges" not in open_dataset(edges_dataset, "train", label_kinds=("semantic",))[1]
    assert ds.sample_files(0).unlabelled == ("edges",)


def _pattern_sample(h: int = 24, w: int = 32) -> dict:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    sem = (xs * 7 + ys * 3) % 50
    return {"image": torch.zeros(3, h, w, dtype=torch.uint8), "semantic": sem,
            "edges": torch.from_numpy(_edges_of(sem.numpy()))}


def _aligned(s: dict) -> bool:
    return torch.equal(s["edges"], torch.from_numpy(_edges_of(s["semantic"].numpy())))


def test_transforms_keep_the_kind_aligned_with_semantic(registry: TaskRegistry) -> None:
    s = _pattern_sample()
    flipped = hflip_sample(s)
    assert _aligned(flipped) and torch.equal(flipped["edges"], s["edges"].flip(-1))
    assert _aligned(resize_sample(s, (17, 45)))
    cropped = crop_sample(s, -4, 20, 16, 20)  # extends past the image: padded
    assert _aligned(cropped) and bool((cropped["edges"][:4] == 255).all())
    assert _aligned(scale_crop_sample(s, (40, 50), -3, 30, 30, 30))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert _aligned(RandomScaleCrop((0.5, 1.5), (20, 20), generator=gen)(s))


def test_collate_fills_unknown_and_sets_has(registry: TaskRegistry) -> None:
    with_map, without = _pattern_sample(), _pattern_sample()
    del without["edges"]
    batch = collate([with_map, without])
    assert batch["has"]["edges"].tolist() == [True, False]
    assert batch["edges"].dtype == torch.uint8 and batch["edges"].shape == (2, 24, 32)
    assert torch.equal(batch["edges"][0], with_map["edges"])
    assert bool((batch["edges"][1] == 255).all())
    none = collate([without])
    assert "edges" not in none and "edges" not in none["has"]  # built-ins always have `has`
    assert none["has"]["depth"].tolist() == [False]


@pytest.mark.slow
def test_short_training_with_the_plugin_task(registry: TaskRegistry, edges_dataset: Path,
                                             tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.engine.trainer import train

    over = tiny_overrides(edges_dataset, tmp_path, None, train__steps=2, train__eval_every=0,
                          model__heads="{semantic: {conv_dims: 8}}", model__fpn_channels=16)
    cfg = load_config(None, [*over, "model.tasks=[semantic,edges]",
                             "train.best_metric=semantic/mIoU"])
    start = time.perf_counter()
    result = train(cfg, registry=registry)
    print(f"2 training steps of [semantic, edges]: {time.perf_counter() - start:.1f} s")
    assert result.step == 2
