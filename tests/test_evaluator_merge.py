"""``Evaluator.merge`` for distributed evaluation: every built-in evaluator, fed one shard, pickled
(as ``all_gather_object`` does) and merged, computes what one pass over all the data computes."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.data.card import DatasetCard
from pipeline.engine.loaders import eval_dataset, eval_loader
from pipeline.model import MultiTaskModel, build_model
from pipeline.registry import default_registry

TASKS = ("semantic", "instance", "keypoints", "panoptic", "depth", "normals", "colorization")
EXACT = {"semantic", "instance", "keypoints"}
"""Tasks whose metrics come from integer counts or concatenated lists (bit for bit after a merge);
the others add float sums, whose order changes."""


def _cfg(root: Path) -> Any:
    dense = {"conv_dims": 16}
    return config_from_dict({
        "data": {"root": str(root), "image_size": 64, "num_workers": 0, "augment": False},
        "model": {"backbone": "resnet18", "fpn_channels": 16, "tasks": list(TASKS),
                  "heads": {"semantic": dense, "depth": dense, "normals": dense, "colorization": dense,
                            "instance": {"score_thresh": 0.0},
                            "keypoints": {"share_detector": False, "score_thresh": 0.0}}},
    })


@pytest.fixture(scope="module")
def run(tiny_dataset: Path) -> tuple[MultiTaskModel, list[tuple[dict, dict[str, list[Any]]]]]:
    """A randomly initialised model with all seven tasks and its predictions for the 4 val images,
    one batch per image."""
    cfg = _cfg(tiny_dataset)
    torch.manual_seed(0)
    model = build_model(cfg, DatasetCard.load(tiny_dataset / "meta.json"), default_registry()).eval()
    with torch.no_grad():
        batches = [(b, model.predict(b)) for b in eval_loader(cfg, eval_dataset(cfg), batch_size=1)]
    return model, batches


def _evaluator(model: MultiTaskModel, task: str) -> Any:
    ev = model.tasks[task].evaluator(card=model.card, options=model.options[task])
    ev.reset()
    return ev


def _fed(model: MultiTaskModel, task: str, batches: list[tuple[dict, dict[str, list[Any]]]]) -> Any:
    ev = _evaluator(model, task)
    for batch, predictions in batches:
        ev.process(batch, predictions[task])
    return ev


def _assert_same(merged: dict[str, float], one_pass: dict[str, float], *, exact: bool) -> None:
    assert merged.keys() == one_pass.keys()
    for key, value in one_pass.items():
        if exact or math.isnan(value):
            assert merged[key] == value or (math.isnan(value) and math.isnan(merged[key])), key
        else:
            assert merged[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("task", TASKS)
def test_two_pickled_shards_merge_to_one_pass(run, task: str) -> None:
    model, batches = run
    assert len(batches) == 4
    one_pass = _fed(model, task, batches).compute()
    b = _fed(model, task, batches[0::2])
    c = pickle.loads(pickle.dumps(_fed(model, task, batches[1::2])))
    before_c = c.compute()
    b.merge(c)
    merged = b.compute()
    assert one_pass, f"{task}: no metric at all"
    _assert_same(merged, one_pass, exact=task in EXACT)
    _assert_same(c.compute(), before_c, exact=True)  # the merged-in shard is left as it was


@pytest.mark.parametrize("task", ["instance", "keypoints"])
def test_merged_coco_ground_truth_keeps_ids_unique_and_skips_repeated_images(run, task: str) -> None:
    """Annotation ids stay 1..N after a merge; an image both shards saw (DDP pads the last shard with
    repeats) counts once, as ``process`` counts a repeated image once."""
    model, batches = run
    one_pass = _fed(model, task, batches)
    b = _fed(model, task, batches[:3])
    c = pickle.loads(pickle.dumps(_fed(model, task, batches[2:] + batches[:1])))  # images 2, 3, 0
    b.merge(c)
    ids = [ann["id"] for ann in b.annotations]
    assert len(ids) == len(one_pass.annotations) > 0
    assert ids == list(range(1, len(ids) + 1))
    assert sorted(img["id"] for img in b.images) == sorted(img["id"] for img in one_pass.images)
    assert len(b.results) == len(one_pass.results)
    assert b.compute() == one_pass.compute()


def test_merging_an_evaluator_of_another_class_is_a_type_error(run) -> None:
    model, batches = run
    depth, normals = _fed(model, "depth", batches[:1]), _evaluator(model, "normals")
    with pytest.raises(TypeError, match=r"NormalsEvaluator.*DepthEvaluator") as info:
        depth.merge(normals)
    assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match=r"CocoEvaluator.*SemanticEvaluator"):
        _evaluator(model, "semantic").merge(_evaluator(model, "instance"))
