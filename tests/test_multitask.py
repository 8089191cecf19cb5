"""Semantic + depth + normals + colorization in one model: any subset trains, missing labels are
skipped, the metric directions and the multi-task delta (Vandenhende et al.) are right."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.card import ClassInfo, DatasetCard
from pipeline.engine.trainer import build_optimizer, train_step
from pipeline.metrics.multitask import metric_goal, multitask_delta
from pipeline.model import build_model
from pipeline.registry import default_registry

DENSE = ("semantic", "depth", "normals", "colorization")
SIZE = 32


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture(scope="module")
def card() -> DatasetCard:
    classes = [ClassInfo(i + 1, f"c{i}", (40 * i, 255 - 30 * i, 90), i > 1) for i in range(4)]
    return DatasetCard("tiny", classes)


def _batch(*, missing: tuple[str, ...] = (), seed: int = 0) -> dict:
    """Two 32x32 samples with every dense label; ``missing`` kinds absent for the second sample
    (filled with their unknown value, ``has`` false), as ``collate`` does."""
    g = torch.Generator().manual_seed(seed)
    n = torch.nn.functional.normalize(torch.randn(2, 3, SIZE, SIZE, generator=g), dim=1)
    batch = {
        "image": torch.randint(0, 256, (2, 3, SIZE, SIZE), generator=g, dtype=torch.uint8),
        "semantic": torch.randint(0, 4, (2, SIZE, SIZE), generator=g),
        "depth": 1.0 + 9.0 * torch.rand(2, SIZE, SIZE, generator=g),
        "normals": n,
        "file_names": ["a.png", "b.png"], "image_ids": [1, 2],
        "has": {k: torch.ones(2, dtype=torch.bool) for k in ("semantic", "depth", "normals")},
    }
    fill = {"semantic": 255, "depth": 0.0, "normals": 0.0}
    for kind in missing:
        batch[kind][1] = fill[kind]
        batch["has"][kind][1] = False
    return batch


def _config(tmp_path: Path, tasks: tuple[str, ...]):
    heads = "{" + ", ".join(f"{t}: {{conv_dims: 8, norm: BN}}" for t in tasks) + "}"
    return load_config(None, [f"model.tasks=[{','.join(tasks)}]", "model.backbone=resnet18",
                              "model.fpn_channels=8", f"model.heads={heads}", "tracking.enabled=false",
                              "train.optimizer=adamw", "train.lr=0.001", f"train.out_dir={tmp_path}"])


SUBSETS = [("semantic",), ("depth",), ("normals",), ("colorization",), ("depth", "normals"),
           ("semantic", "colorization"), DENSE]


@pytest.mark.parametrize("tasks", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_a_training_step_runs_with_any_subset_of_the_dense_tasks(tmp_path: Path, card: DatasetCard,
                                                                  registry, tasks: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(_config(tmp_path, tasks), card, registry)
    assert set(model.heads) == set(tasks)
    assert model.views == sorted({"gray" if t == "colorization" else "rgb" for t in tasks})
    optimizer = build_optimizer(_config(tmp_path, tasks), model)
    before = [p.detach().clone() for p in model.parameters()]
    row = train_step(model, _batch(), optimizer, clip_grad_norm=5.0)
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    assert {k.split("/")[0] for k in row if k != "loss" and not k.startswith("weight/")} == set(tasks)
    assert {k.split("/", 1)[1] for k in row if k.startswith("weight/")} == set(tasks)  # weights in force
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model.eval()
    predictions = model.predict(_batch())
    assert set(predictions) == set(tasks)


def test_a_batch_where_a_task_has_no_labels_trains_the_others(tmp_path: Path, card: DatasetCard,
                                                              registry) -> None:
    """Depth and normals unknown for the whole batch: their terms are 0 (no NaN) and the
    other tasks still train."""
    torch.manual_seed(0)
    cfg = _config(tmp_path, DENSE)
    model = build_model(cfg, card, registry)
    batch = _batch(missing=("depth", "normals"))
    for kind in ("depth", "normals"):
        batch[kind][0] = 0.0
        batch["has"][kind][0] = False
    terms = model.losses(model(batch), batch)
    for name, value in terms.items():
        assert torch.isfinite(value), name
        if name.startswith(("depth/", "normals/")):
            assert value.item() == 0.0, name
    model.total_loss(terms).backward()
    depth_grads = [p.grad for p in model.heads["depth"].parameters()]
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in depth_grads)
    sem_grads = [p.grad for p in model.heads["semantic"].parameters() if p.grad is not None]
    assert sem_grads and any(float(g.abs().sum()) > 0 for g in sem_grads)


def test_a_sample_missing_one_label_counts_only_where_it_has_it(tmp_path: Path, card: DatasetCard,
                                                                registry) -> None:
    """The depth term of a batch whose second sample lacks depth equals the term of the first
    sample alone (the unknown fill value contributes nothing)."""
    torch.manual_seed(0)
    model = build_model(_config(tmp_path, ("depth",)), card, registry).eval()
    batch = _batch(missing=("depth",))
    first = {k: (v[:1] if torch.is_tensor(v) else v[:1]) for k, v in batch.items() if k != "has"}
    first["has"] = {k: v[:1] for k, v in batch["has"].items()}
    with torch.no_grad():
        both = model.losses(model(batch), batch)
        alone = model.losses(model(first), first)
    assert both.keys() == alone.keys()
    for key in both:
        assert float(both[key]) == pytest.approx(float(alone[key]), rel=1e-5), key


def test_metric_goals_come_from_the_tasks(registry) -> None:
    tasks = [registry.get(t) for t in (*DENSE, "instance", "panoptic")]
    assert metric_goal("semantic/mIoU", tasks) == "max"
    assert metric_goal("depth/rmse", tasks) == "min"
    assert metric_goal("depth/abs_rel", tasks) == "min"
    assert metric_goal("depth/delta1", tasks) == "max"
    assert metric_goal("normals/mean_angle", tasks) == "min"
    assert metric_goal("normals/within_11.25", tasks) == "max"
    assert metric_goal("colorization/psnr", tasks) == "max"
    assert metric_goal("panoptic/PQ", tasks) == "max"
    assert {t.name: t.main_metric for t in tasks} == {
        "semantic": "mIoU", "depth": "rmse", "normals": "mean_angle", "colorization": "auc",
        "instance": "segm_AP", "panoptic": "PQ"}


def test_multitask_delta_is_the_sign_corrected_mean_relative_change(registry) -> None:
    """Hand computed: mIoU 0.50 -> 0.55 (+10 %), rmse 2.0 -> 2.2 (worse: -10 %), mean angle
    20 -> 15 (better: +25 %), ab AUC 0.9 -> 0.864 (-4 %): Delta_m = (10 - 10 + 25 - 4) / 4 = 5.25 %."""
    tasks = [registry.get(t) for t in DENSE]
    multi = {"semantic/mIoU": 0.55, "depth/rmse": 2.2, "normals/mean_angle": 15.0,
             "colorization/auc": 0.864}
    singles = {"semantic": {"semantic/mIoU": 0.5}, "depth": {"depth/rmse": 2.0},
               "normals": {"normals/mean_angle": 20.0}, "colorization": {"colorization/auc": 0.9}}
    delta, rows = multitask_delta(multi, singles, tasks)
    assert delta == pytest.approx(5.25)
    assert [round(100 * r.relative, 6) for r in rows] == [10.0, -10.0, 25.0, -4.0]
    assert [r.goal for r in rows] == ["max", "min", "min", "max"]
    same, _ = multitask_delta({k: v for s in singles.values() for k, v in s.items()}, singles, tasks)
    assert same == 0.0


def test_multitask_delta_refuses_what_it_cannot_compare(registry) -> None:
    tasks = [registry.get(t) for t in DENSE]
    with pytest.raises(ValueError, match=r"depth/rmse: expected a finite value in the multi-task metrics"):
        multitask_delta({}, {"depth": {"depth/rmse": 1.0}}, tasks)
    with pytest.raises(ValueError, match=r"semantic/mIoU: the single-task baseline is 0"):
        multitask_delta({"semantic/mIoU": 0.3}, {"semantic": {"semantic/mIoU": 0.0}}, tasks)
    with pytest.raises(ValueError, match=r"task 'keypoint': expected a registered task"):
        multitask_delta({}, {"keypoint": {}}, tasks)


def test_stacked_views_give_each_view_its_own_features(tmp_path: Path, card: DatasetCard, registry) -> None:
    """Both views go through the backbone as one batch; in evaluation (batch norm frozen) each
    view's features equal those of a backbone call on that view alone."""
    from pipeline.model import image_views

    torch.manual_seed(0)
    model = build_model(_config(tmp_path, ("semantic", "colorization")), card, registry).eval()
    batch = _batch()
    views = image_views(batch["image"], {"rgb", "gray"}, model.pixel_mean, model.pixel_std)
    with torch.no_grad():
        stacked = model._backbone_per_view(views)
        for view, x in views.items():
            alone = model.backbone(x)
            assert stacked[view].keys() == alone.keys()
            for level, f in alone.items():
                assert torch.allclose(stacked[view][level], f, atol=1e-5), (view, level)
    assert not torch.allclose(stacked["rgb"]["p2"], stacked["gray"]["p2"])
