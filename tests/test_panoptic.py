"""Panoptic segmentation: the combine heuristic, PQ as panopticapi computes it, COCO panoptic files,
the ``panoptic`` task and ``densepipe panoptic-eval``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.card import DatasetCard
from pipeline.errors import DataError
from plugins.panoptic.files import (
    evaluate_panoptic_files,
    ids_to_rgb,
    load_panoptic_json,
    match_annotations,
    read_panoptic_png,
    rgb_to_ids,
    write_panoptic_png,
)
from plugins.panoptic.fusion import combine_semantic_and_instances
from plugins.panoptic.metrics import PanopticCategories, PQStats, pq_image_stats
from plugins.panoptic.reference import reference_image_stats

# ------------------------------------------------------------------------------------------------
# the combine step
# ------------------------------------------------------------------------------------------------
STUFF = (0, 1)  # class indices 0, 1 are stuff; 2, 3 things


def _box_mask(y0: int, y1: int, x0: int, x1: int, size: int = 10) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _combine(semantic: torch.Tensor, masks: list[torch.Tensor], scores: list[float], labels: list[int],
             **kw: float) -> tuple[torch.Tensor, list[dict]]:
    stacked = torch.stack(masks) if masks else torch.zeros(0, *semantic.shape, dtype=torch.bool)
    return combine_semantic_and_instances(semantic, stacked, torch.tensor(scores), torch.tensor(labels),
                                          stuff_classes=STUFF, **kw)


def test_combine_places_instances_by_score_and_keeps_only_free_pixels() -> None:
    semantic = torch.zeros(10, 10, dtype=torch.int64)
    low = _box_mask(0, 4, 0, 4)  # 16 px, given first but scores lower
    high = _box_mask(2, 6, 2, 6)  # 16 px, overlaps low on 4 px
    ids, segs = _combine(semantic, [low, high], [0.6, 0.9], [2, 3], stuff_area_limit=0)
    assert [(s["label"], s["instance"], s["area"]) for s in segs[:2]] == [(3, 1, 16), (2, 0, 12)]
    assert (ids[high] == 1).all()  # the higher score owns the overlap
    assert int((ids == 2).sum()) == 12
    assert segs[2] == {"id": 3, "label": 0, "isthing": False, "area": 100 - 28}


def test_combine_drops_an_instance_above_the_overlap_threshold() -> None:
    semantic = torch.zeros(10, 10, dtype=torch.int64)
    big = _box_mask(0, 4, 0, 4)  # 16 px
    inside = _box_mask(0, 4, 0, 2)  # 8 px, all on big
    half = _box_mask(0, 4, 2, 6)  # 16 px, 8 on big: share 0.5, not above 0.5
    ids, segs = _combine(semantic, [big, inside, half], [0.9, 0.8, 0.7], [2, 2, 3], stuff_area_limit=0)
    assert [s["instance"] for s in segs if s["isthing"]] == [0, 2]
    assert int((ids == 2).sum()) == 8
    _, segs = _combine(semantic, [big, inside, half], [0.9, 0.8, 0.7], [2, 2, 3],
                       stuff_area_limit=0, overlap_threshold=0.4)
    assert [s["instance"] for s in segs if s["isthing"]] == [0]
    _, segs = _combine(semantic, [big, inside, half], [0.9, 0.8, 0.7], [2, 2, 3],
                       stuff_area_limit=0, overlap_threshold=1.0)
    assert [s["instance"] for s in segs if s["isthing"]] == [0, 2]  # 1 has no free pixel left


def test_combine_stuff_area_limit_and_thing_pixels_become_void() -> None:
    semantic = torch.zeros(10, 10, dtype=torch.int64)
    semantic[:, 7:] = 1  # 30 px of stuff class 1
    semantic[0, 0] = 2  # a thing-class pixel with no instance
    ids, segs = _combine(semantic, [], [], [], stuff_area_limit=31)
    assert [(s["label"], s["area"]) for s in segs] == [(0, 69)]
    assert (ids[:, 7:] == 0).all() and ids[0, 0] == 0  # too small / thing without instance: VOID
    ids, segs = _combine(semantic, [], [], [], stuff_area_limit=30)
    assert [(s["id"], s["label"], s["area"]) for s in segs] == [(1, 0, 69), (2, 1, 30)]


def test_combine_score_threshold_and_empty_masks() -> None:
    semantic = torch.zeros(10, 10, dtype=torch.int64)
    masks = [_box_mask(0, 2, 0, 2), torch.zeros(10, 10, dtype=torch.bool), _box_mask(5, 7, 5, 7)]
    ids, segs = _combine(semantic, masks, [0.9, 0.95, 0.3], [2, 2, 3], score_threshold=0.5,
                         stuff_area_limit=0)
    assert [s["instance"] for s in segs if s["isthing"]] == [0]
    assert segs[0]["score"] == pytest.approx(0.9)
    assert set(torch.unique(ids).tolist()) == {1, 2}


# ------------------------------------------------------------------------------------------------
# PQ on hand-built images
# ------------------------------------------------------------------------------------------------
CATS = PanopticCategories((1, 2, 10), ("person", "dog", "wall"), (True, True, False))


def _stats(gt: np.ndarray, gt_segs: list[dict], pred: np.ndarray, pred_segs: list[dict]) -> PQStats:
    fast = pq_image_stats(gt, gt_segs, pred, pred_segs, CATS)
    ref = reference_image_stats(gt, gt_segs, pred, pred_segs, CATS)
    for field in ("tp", "fp", "fn"):
        assert np.array_equal(getattr(fast, field), getattr(ref, field)), field
    np.testing.assert_allclose(fast.iou, ref.iou, rtol=0, atol=1e-15)
    return fast


def test_iou_must_be_above_one_half_to_match() -> None:
    gt = np.zeros((4, 4), np.uint32)
    gt[:, :2] = 1
    pred = np.zeros((4, 4), np.uint32)
    pred[:, 1:3] = 5  # IoU 4 / 12
    s = _stats(gt, [{"id": 1, "category_id": 1}], pred, [{"id": 5, "category_id": 1}])
    assert (s.tp[0], s.fp[0], s.fn[0]) == (0, 1, 1)
    gt[:, 2] = 1  # gt 12 px, pred 8 px, overlap 8: IoU 8 / 12 > 0.5
    s = _stats(gt, [{"id": 1, "category_id": 1}], pred, [{"id": 5, "category_id": 1}])
    assert (s.tp[0], s.fp[0], s.fn[0]) == (1, 0, 0) and s.iou[0] == pytest.approx(8 / 12)
    r = s.summarize(CATS)
    assert r.all.n == 1 and r.all.pq == pytest.approx(8 / 12) and r.per_class == {1: (8 / 12, 8 / 12, 1.0)}


def test_void_pixels_leave_the_union_and_excuse_false_positives() -> None:
    gt = np.zeros((4, 8), np.uint32)
    gt[:, :2] = 1  # 8 px person; columns 2..7 VOID
    pred = np.zeros((4, 8), np.uint32)
    pred[:, :5] = 7  # 20 px: 8 on the person, 12 on VOID -> IoU 8 / (20 + 8 - 8 - 12) = 1
    s = _stats(gt, [{"id": 1, "category_id": 1}], pred, [{"id": 7, "category_id": 1}])
    assert (s.tp[0], s.fp[0], s.iou[0]) == (1, 0, pytest.approx(1.0))
    # an unmatched prediction more than half on VOID is no false positive; exactly half is one
    gt2 = np.zeros((4, 4), np.uint32)
    gt2[:2] = 3  # wall
    pred2 = np.zeros((4, 4), np.uint32)
    pred2[1:, :1] = 9  # 3 px dog: 1 on wall, 2 on VOID (2/3 > 0.5)
    wall = [{"id": 3, "category_id": 10}]
    s = _stats(gt2, wall, pred2, [{"id": 9, "category_id": 2}])
    assert (s.fp[1], s.fn[2]) == (0, 1)
    pred2[0, 0] = 9  # 4 px: 2 on VOID (exactly one half)
    s = _stats(gt2, wall, pred2, [{"id": 9, "category_id": 2}])
    assert s.fp[1] == 1


def test_crowd_regions_never_match_and_excuse_predictions_of_their_category() -> None:
    gt = np.zeros((4, 4), np.uint32)
    gt[:, :3] = 2  # crowd of persons, 12 px
    gt[:, 3] = 4  # wall
    segs = [{"id": 2, "category_id": 1, "iscrowd": 1}, {"id": 4, "category_id": 10}]
    pred = np.full((4, 4), 4, np.uint32)
    pred[:, :3] = 8
    person = _stats(gt, segs, pred, [{"id": 8, "category_id": 1}, {"id": 4, "category_id": 10}])
    assert (person.tp[0], person.fp[0], person.fn[0]) == (0, 0, 0)  # crowd: no TP, no FN, excused FP
    dog = _stats(gt, segs, pred, [{"id": 8, "category_id": 2}, {"id": 4, "category_id": 10}])
    assert dog.fp[1] == 1  # a crowd of another category excuses nothing
    r = dog.summarize(CATS)
    assert (r.things.n, r.stuff.n, r.stuff.pq) == (1, 1, 1.0)
    assert r.all.pq == pytest.approx(0.5)


def test_ground_truth_area_comes_from_its_json_when_given() -> None:
    gt = np.ones((2, 5), np.uint32)
    pred = np.ones((2, 5), np.uint32)
    pred[:, 4] = 0
    plain = _stats(gt, [{"id": 1, "category_id": 1}], pred, [{"id": 1, "category_id": 1}])
    listed = _stats(gt, [{"id": 1, "category_id": 1, "area": 15}], pred, [{"id": 1, "category_id": 1}])
    assert plain.iou[0] == pytest.approx(8 / 10) and listed.iou[0] == pytest.approx(8 / 15)


@pytest.mark.parametrize(("pred_segs", "pred_fill", "message"), [
    ([{"id": 5, "category_id": 1}], 6, r"image 3: predicted segment id\(s\) \[6\] are in the PNG but not"),
    ([{"id": 5, "category_id": 1}, {"id": 9, "category_id": 1}], 5,
     r"predicted segment id\(s\) \[9\] are in segments_info but not in the PNG"),
    ([{"id": 5, "category_id": 1}, {"id": 5, "category_id": 2}], 5,
     r"predicted segment id 5 is listed more than once"),
    ([{"id": 5, "category_id": 77}], 5,
     r"predicted segment 5 has category_id 77, which is not a ground-truth"),
])
def test_bad_predictions_name_the_image_and_segment(pred_segs: list[dict], pred_fill: int,
                                                    message: str) -> None:
    gt = np.ones((3, 3), np.uint32)
    pred = np.full((3, 3), pred_fill, np.uint32)
    with pytest.raises(DataError, match=message):
        pq_image_stats(gt, [{"id": 1, "category_id": 1}], pred, pred_segs, CATS, where="image 3")


def test_rgb_encoding_round_trip(tmp_path: Path) -> None:
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 2035955, (1 << 24) - 1]], np.int64)
    assert np.array_equal(rgb_to_ids(ids_to_rgb(ids)), ids)
    assert ids_to_rgb(np.array([[256 + 2 + 65536 * 3]]))[0, 0].tolist() == [2, 1, 3]
    path = write_panoptic_png(tmp_path / "x.png", ids)
    assert np.array_equal(read_panoptic_png(path), ids)
    with pytest.raises(ValueError, match="0..16777215"):
        ids_to_rgb(np.array([[1 << 24]]))


# ------------------------------------------------------------------------------------------------
# conformance (../shared/testdata/conformance)
# ------------------------------------------------------------------------------------------------
def _sample(conformance_dir: Path) -> tuple[Path, Path]:
    return conformance_dir / "panoptic_sample", conformance_dir / "panoptic_mmdet_case"


def test_mmdetection_case_gives_the_listed_numbers(conformance_dir: Path) -> None:
    case = conformance_dir / "panoptic_mmdet_case"
    r = evaluate_panoptic_files(case / "gt.json", case / "gt", case / "pred.json", case / "pred")
    assert r.all.pq * 100 == pytest.approx(67.86874803219071, abs=1e-10)
    assert r.all.sq * 100 == pytest.approx(80.89770126158936, abs=1e-10)
    assert r.all.rq * 100 == pytest.approx(250 / 3, abs=1e-10)
    assert r.things.pq * 100 == pytest.approx(60.45252075318891, abs=1e-10) and r.things.rq == 0.75
    assert r.stuff.pq * 100 == pytest.approx(82.70120259019427, abs=1e-10) and r.stuff.rq == 1.0
    assert (r.all.n, r.things.n, r.stuff.n) == (3, 2, 1)
    named = r.named()
    assert named["PQ"] == r.all.pq and named["RQ_st"] == 1.0 and named["PQ/wall"] == r.stuff.pq
    assert "PQ/cat" not in named  # no TP, FP or FN: not averaged, not reported


def test_panopticapi_sample_against_itself_is_perfect(conformance_dir: Path) -> None:
    s = conformance_dir / "panoptic_sample"
    r = evaluate_panoptic_files(s / "panoptic_examples.json", s / "panoptic_examples",
                                s / "panoptic_examples.json", s / "panoptic_examples")
    for g in (r.all, r.things, r.stuff):
        assert (g.pq, g.sq, g.rq) == (1.0, 1.0, 1.0)
    assert (r.all.n, r.things.n, r.stuff.n) == (8, 4, 4)


def test_perturbed_prediction_matches_the_reference_in_one_and_two_processes(conformance_dir: Path) -> None:
    s = conformance_dir / "panoptic_sample"
    args = (s / "panoptic_examples.json", s / "panoptic_examples",
            s / "perturbed_pred.json", s / "perturbed_pred")
    one = evaluate_panoptic_files(*args)
    two = evaluate_panoptic_files(*args, workers=2)
    gt = load_panoptic_json(args[0], need_categories=True)
    pred = load_panoptic_json(args[2], need_categories=False)
    cats = PanopticCategories.from_json(gt["categories"])
    ref = PQStats(len(cats))
    for g, p in match_annotations(gt, pred, pred_json=args[2]):
        reference_image_stats(read_panoptic_png(args[1] / g["file_name"]), g["segments_info"],
                              read_panoptic_png(args[3] / p["file_name"]), p["segments_info"], cats, ref)
    expected = ref.summarize(cats)
    for got in (one, two):
        for name in ("all", "things", "stuff"):
            e, g = getattr(expected, name), getattr(got, name)
            assert (g.pq, g.sq, g.rq, g.n) == pytest.approx((e.pq, e.sq, e.rq, e.n), abs=1e-12)
        assert got.per_class.keys() == expected.per_class.keys()
    assert 0.0 < one.all.pq < 1.0 and one.all.n == 10  # the perturbation costs something


def _broken_case(tmp_path: Path, conformance_dir: Path) -> tuple[Path, Path]:
    case = tmp_path / "case"
    shutil.copytree(conformance_dir / "panoptic_mmdet_case", case)
    return case, case / "pred.json"


def _edit_pred(path: Path, edit: callable) -> None:  # type: ignore[valid-type]
    obj = json.loads(path.read_text())
    edit(obj["annotations"][0]["segments_info"])
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda segs: segs.pop(0),
     r"fake_name1.png \(image_id 1\): predicted segment id\(s\) \[\d+\] are in the PNG"),
    (lambda segs: segs.append({"id": 4242, "category_id": 1}), r"\[4242\] are in segments_info but not"),
    (lambda segs: segs.append(dict(segs[0])), r"predicted segment id \d+ is listed more than once"),
    (lambda segs: segs[0].update(category_id=99), r"predicted segment \d+ has category_id 99"),
])
def test_bad_prediction_files_name_the_image_and_segment(tmp_path: Path, conformance_dir: Path,
                                                          edit: callable, message: str) -> None:  # type: ignore[valid-type]
    case, pred_json = _broken_case(tmp_path, conformance_dir)
    _edit_pred(pred_json, edit)
    with pytest.raises(DataError, match=message):
        evaluate_panoptic_files(case / "gt.json", case / "gt", pred_json, case / "pred")


def test_missing_png_and_missing_prediction_are_named(tmp_path: Path, conformance_dir: Path) -> None:
    case, pred_json = _broken_case(tmp_path, conformance_dir)
    for kind in ("gt", "pred"):  # a second image, so that two workers each get one
        obj = json.loads((case / f"{kind}.json").read_text())
        obj["annotations"].append(dict(obj["annotations"][0], image_id=2, file_name="fake_name2.png"))
        (case / f"{kind}.json").write_text(json.dumps(obj))
        shutil.copy(case / kind / "fake_name1.png", case / kind / "fake_name2.png")
    (case / "pred" / "fake_name2.png").unlink()
    for workers in (1, 2):  # the error crosses the process pool intact
        with pytest.raises(DataError, match=r"pred/fake_name2.png: panoptic PNG not found"):
            evaluate_panoptic_files(case / "gt.json", case / "gt", pred_json, case / "pred", workers=workers)
    obj = json.loads(pred_json.read_text())
    obj["annotations"][0]["image_id"] = 7
    obj["annotations"][1]["image_id"] = 2
    pred_json.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=r"pred.json: no prediction for image_id 1 \(fake_name1.png\)"):
        evaluate_panoptic_files(case / "gt.json", case / "gt", pred_json, case / "pred")


def test_cli_prints_the_table_and_writes_json(tmp_path: Path, conformance_dir: Path) -> None:
    case = conformance_dir / "panoptic_mmdet_case"
    out = tmp_path / "pq.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "panoptic-eval", "--gt-json", str(case / "gt.json"),
         "--gt-dir", str(case / "gt"), "--pred-json", str(case / "pred.json"), "--pred-dir",
         str(case / "pred"), "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["|", "PQ", "SQ", "RQ", "N"]
    assert lines[2].split() == ["All", "|", "67.9", "80.9", "83.3", "3"]
    assert lines[3].split() == ["Things", "|", "60.5", "80.0", "75.0", "2"]
    assert lines[4].split() == ["Stuff", "|", "82.7", "82.7", "100.0", "1"]
    saved = json.loads(out.read_text())
    assert saved["metrics"]["PQ_th"] == pytest.approx(0.6045252075318891)
    assert saved["per_class"]["4"]["name"] == "wall"
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "panoptic-eval", "--gt-json", str(case / "gt.json"),
         "--gt-dir", str(case / "gt"), "--pred-json", str(tmp_path / "none.json"), "--pred-dir",
         str(case / "pred")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'none.json'}: panoptic JSON not found"


# ------------------------------------------------------------------------------------------------
# the task
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def card(tiny_dataset: Path) -> DatasetCard:
    return DatasetCard.load(tiny_dataset / "meta.json")


def _cfg(root: Path, **panoptic: object) -> object:
    from pipeline.config import config_from_dict

    return config_from_dict({
        "data": {"root": str(root), "image_size": 64, "num_workers": 0, "augment": False},
        "model": {"backbone": "resnet18", "fpn_channels": 32, "tasks": ["panoptic"],
                  "heads": {"semantic": {"conv_dims": 32}, "panoptic": panoptic}},
    })


def _gt_as_predictions(batch: dict) -> tuple[list[torch.Tensor], list[dict]]:
    """The batch's own labels as semantic and instance predictions."""
    semantic = [torch.where(s == 255, 0, s) for s in batch["semantic"]]
    instances = []
    for inst in batch["instances"]:
        keep = ~inst["iscrowd"]
        n = int(keep.sum())
        instances.append({"masks": inst["masks"][keep], "labels": inst["labels"][keep],
                          "scores": torch.linspace(1.0, 0.9, n) if n else torch.zeros(0),
                          "boxes": inst["boxes"][keep]})
    return semantic, instances


def test_enabling_panoptic_enables_its_inputs_and_adds_no_head(tiny_dataset: Path, card: DatasetCard) -> None:
    from pipeline.model import build_model

    model = build_model(_cfg(tiny_dataset), card)  # type: ignore[arg-type]
    assert list(model.tasks) == ["semantic", "instance", "panoptic"]
    assert list(model.heads) == ["semantic", "instance"] and model.views == ["rgb"]
    assert model.options["panoptic"].stuff_area_limit == 4096  # detectron2's default


def test_ground_truth_through_the_task_scores_one_and_exports_files(
        tiny_dataset: Path, card: DatasetCard, tmp_path: Path) -> None:
    """Labels as predictions -> combine -> PQ 1.0 in memory; the exported COCO panoptic files read
    back score 1.0 against the dataset's own ground truth files and against themselves."""
    from pipeline.engine.loaders import eval_dataset, eval_loader
    from pipeline.registry import default_registry

    task = default_registry().get("panoptic")
    cfg = _cfg(tiny_dataset, stuff_area_limit=0)
    opts = task.resolve_options(task.parse_options({"stuff_area_limit": 0}), card=card)
    ev = task.evaluator(card=card, options=opts)
    ev.reset()
    ev.export_to(tmp_path, "panoptic")
    for batch in eval_loader(cfg, eval_dataset(cfg), batch_size=2):  # type: ignore[arg-type]
        semantic, instances = _gt_as_predictions(batch)
        preds = task.postprocess(None, batch=batch, predictions={"semantic": semantic, "instance": instances},
                                 options=opts)
        ev.process(batch, preds)
    metrics = ev.compute()
    assert metrics["PQ"] == metrics["PQ_th"] == metrics["PQ_st"] == 1.0
    paths = ev.save(tmp_path, "panoptic")
    assert [p.name for p in paths] == ["panoptic_pred.json", "panoptic_pred"]
    assert len(list((tmp_path / "panoptic_pred").glob("*.png"))) == 4
    gt_json = tiny_dataset / "annotations" / "panoptic_val.json"
    vs_dataset = evaluate_panoptic_files(gt_json, tiny_dataset / "panoptic" / "val", paths[0], paths[1])
    assert (vs_dataset.all.pq, vs_dataset.all.n) == (1.0, len(json.loads(gt_json.read_text())["categories"]))
    exported = json.loads(paths[0].read_text())
    assert {c["id"] for c in exported["categories"]} == {c.id for c in card.classes}
    itself = evaluate_panoptic_files(paths[0], paths[1], paths[0], paths[1])
    assert itself.all.pq == 1.0


def test_visualisation_names_each_segment(card: DatasetCard) -> None:
    from plugins.panoptic.draw import draw_panoptic

    image = np.full((64, 64, 3), 128, np.uint8)
    ids = torch.zeros(64, 64, dtype=torch.int64)
    ids[:, :32] = 1
    ids[:, 32:] = 2
    stuff, thing = card.stuff_indices[0], card.thing_indices[0]
    segments = [{"id": 1, "label": stuff, "category_id": card.classes[stuff].id, "isthing": False},
                {"id": 2, "label": thing, "category_id": card.classes[thing].id, "isthing": True}]
    drawn = draw_panoptic(image, ids, segments, card)
    assert drawn.shape == image.shape
    left, right = drawn[40:, :20].reshape(-1, 3), drawn[40:, 44:].reshape(-1, 3)
    assert not np.array_equal(np.median(left, 0), np.median(right, 0))  # one colour per segment
    text = (drawn == 255).all(-1) | (drawn == 0).all(-1)
    assert text[:, :32].any() and text[:, 32:].any()  # a name on each segment
    assert not text[ids.numpy() == 0].any()


@pytest.mark.slow
def test_train_evaluate_export_and_standalone_eval_agree(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline import stages
    from pipeline.config import load_config
    from tests.conftest import tiny_overrides

    monkeypatch.chdir(tmp_path)
    over = tiny_overrides(tiny_dataset, tmp_path, mlflow_uri, train__steps=2, model__tasks="[panoptic]",
                          model__heads="{semantic: {conv_dims: 32}, instance: {score_thresh: 0.0}, "
                                       "panoptic: {score_threshold: 0.0, stuff_area_limit: 16}}")
    cfg = load_config(None, over)
    stages.train(cfg)
    metrics = stages.evaluate(cfg)
    names = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
    for name in names:
        assert 0.0 <= metrics[f"panoptic/{name}"] <= 1.0, name
    eval_dir = tmp_path / "eval"
    result = evaluate_panoptic_files(tiny_dataset / "annotations" / "panoptic_val.json",
                                     tiny_dataset / "panoptic" / "val", eval_dir / "panoptic_pred.json",
                                     eval_dir / "panoptic_pred")
    assert result.all.pq == pytest.approx(metrics["panoptic/PQ"], abs=1e-12)
    assert result.things.rq == pytest.approx(metrics["panoptic/RQ_th"], abs=1e-12)
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("densepipe").experiment_id])[0]
    assert run.data.metrics["panoptic/PQ"] == pytest.approx(metrics["panoptic/PQ"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "panoptic_pred")}
    assert len(logged) == 4 and all(p.endswith(".png") for p in logged)
    image = next((tiny_dataset / "images" / "val").iterdir())
    files = stages.predict(cfg, [image], checkpoint=tmp_path / "train" / "best.pt", out_dir=tmp_path / "pred")
    png = tmp_path / "pred" / "panoptic" / f"{image.stem}_panoptic.png"
    assert str(png) in files and str(tmp_path / "pred" / "vis" / "panoptic" / f"{image.stem}.png") in files
    info = json.loads((tmp_path / "pred" / "panoptic" / f"{image.stem}_panoptic.json").read_text())
    ids = read_panoptic_png(png)
    assert sorted(s["id"] for s in info["segments_info"]) == sorted(set(np.unique(ids).tolist()) - {0})
