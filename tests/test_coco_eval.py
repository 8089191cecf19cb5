"""COCO evaluation: pycocotools' answers on the conformance vectors, result conversion, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, DataError
from plugins.rcnn.coco import (
    BBOX_STAT_NAMES,
    KEYPOINT_STAT_NAMES,
    CocoEvalResult,
    check_results,
    evaluate_coco,
    format_coco_table,
    load_coco_gt,
    write_results_json,
)
from plugins.rcnn.results import detections_to_results, masks_to_rle, rle_to_masks, xyxy_to_xywh

# Known answers from the conformance README, written with the precision listed there.
KNOWN = {
    "cocoapi_fake/bbox": ("cocoapi_fake/instances_val2014_100.json",
                          "cocoapi_fake/instances_val2014_fakebbox100_results.json", "bbox",
                          ".505 .697 .573 .586 .519 .501 .387 .594 .595 .640 .566 .564"),
    "cocoapi_fake/segm": ("cocoapi_fake/instances_val2014_100.json",
                          "cocoapi_fake/instances_val2014_fakesegm100_results.json", "segm",
                          ".320 .562 .299 .387 .310 .327 .268 .415 .417 .469 .377 .381"),
    "torchmetrics/bbox": ("torchmetrics_map/tm_bbox_gt.json", "torchmetrics_map/tm_bbox_dt.json", "bbox",
                          ".706 .901 .846 .689 .800 .701 .592 .716 .716 .767 .800 .700"),
    "torchmetrics/segm": ("torchmetrics_map/tm_segm_gt.json", "torchmetrics_map/tm_segm_dt.json", "segm",
                          ".352 .752 .252 -1 -1 .352 .35 .35 .35 -1 -1 .35"),
    "detectron2/bbox": ("detectron2_case/d2_gt.json", "detectron2_case/d2_dt.json", "bbox",
                        ".7505 1 1 .7 .8 -1 .4 .75 .75 .7 .8 -1"),
    "detectron2/segm": ("detectron2_case/d2_gt.json", "detectron2_case/d2_dt.json", "segm",
                        ".7252 1 1 .8 .7 -1 .35 .75 .75 .8 .7 -1"),
    "keypoints": ("keypoints_case/gt.json", "keypoints_case/dt.json", "keypoints",
                  ".50488 .72277 .63366 .46634 .75050 .51818 .72727 .63636 .46667 .75"),
    # polygon detections with boxes: the boxes are dropped and the polygons merged to RLE
    "shapes/segm": ("shapes_case/gt_dataset.json", "shapes_case/dt_dataset.json", "segm",
                    ".69472 .69472 .69472 -1 .73680 0 .66667 .75 .75 -1 .79167 0"),
}


def _assert_stats(stats: list[float], expected: str) -> None:
    """Each stat equals its listed value to the listed number of decimals (integers exactly)."""
    texts = expected.split()
    assert len(stats) == len(texts)
    for i, (value, text) in enumerate(zip(stats, texts, strict=True)):
        decimals = len(text.split(".")[1]) if "." in text else None
        tol = 0.5 * 10.0 ** -decimals + 1e-12 if decimals else 1e-12
        assert abs(value - float(text)) <= tol, f"stat {i}: {value} != {text}"


@pytest.mark.parametrize("case", list(KNOWN))
def test_conformance_known_answers(conformance_dir: Path, case: str) -> None:
    gt, dt, iou_type, expected = KNOWN[case]
    result = evaluate_coco(conformance_dir / gt, conformance_dir / dt, iou_type)  # type: ignore[arg-type]
    _assert_stats(result.stats, expected)
    names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else BBOX_STAT_NAMES
    defined = [n for n, text in zip(names, expected.split(), strict=True) if text != "-1"]
    assert list(result.named(f"{iou_type}_")) == [f"{iou_type}_{n}" for n in defined]
    assert result.num_results == len(json.loads((conformance_dir / dt).read_text()))
    if case == "cocoapi_fake/bbox":
        assert result.stats[0] == pytest.approx(0.5045806987249628, abs=1e-12)
        assert result.num_images == 100
    table = format_coco_table(result)
    assert f"{result.num_images} images, {result.num_results} results" in table
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in table


def test_torchmetrics_undefined_stats_left_out(conformance_dir: Path) -> None:
    result = evaluate_coco(conformance_dir / "torchmetrics_map/tm_segm_gt.json",
                           conformance_dir / "torchmetrics_map/tm_segm_dt.json", "segm")
    assert [result.stats[i] for i in (3, 4, 9, 10)] == [-1.0] * 4  # no small/medium ground truth
    named = result.named()
    assert not {"APs", "APm", "ARs", "ARm"} & set(named)
    assert all(v >= 0 for v in named.values())


def test_shapes_ground_truth_fed_back_scores_one(conformance_dir: Path) -> None:
    """The GT through the project's prediction path (masks at image size, xyxy boxes) is perfect."""
    gt_path = conformance_dir / "shapes_case/gt_dataset.json"
    gt = json.loads(gt_path.read_text())
    results: list[dict[str, Any]] = []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        masks = np.stack([rle_to_masks([a["segmentation"]], img["height"], img["width"])[0] for a in anns])
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        results += detections_to_results(img["id"], boxes=boxes, scores=torch.ones(len(anns)),
                                         category_ids=torch.tensor([a["category_id"] for a in anns]),
                                         masks=torch.from_numpy(masks))
    assert len(results) == len(gt["annotations"])
    json.dumps(results)  # plain Python: serialisable as is
    for iou_type in ("segm", "bbox"):
        result = evaluate_coco(gt_path, results, iou_type)  # type: ignore[arg-type]
        assert result.stats[0] == pytest.approx(1.0), iou_type
        assert result.named()["AR100"] == pytest.approx(1.0)


# -- conversion --------------------------------------------------------------------------------
def test_masks_rle_round_trip() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((4, 7, 13)) > 0.5
    masks[1] = False  # empty
    masks[2] = True  # full
    for given in (masks, masks.astype(np.uint8), torch.from_numpy(masks)):
        rles = masks_to_rle(given)
        assert len(rles) == 4
        assert all(r["size"] == [7, 13] and isinstance(r["counts"], str) for r in rles)
        json.dumps(rles)
        np.testing.assert_array_equal(rle_to_masks(rles), masks)
    bytes_counts = [{"size": r["size"], "counts": r["counts"].encode()} for r in masks_to_rle(masks)]
    np.testing.assert_array_equal(rle_to_masks(bytes_counts), masks)
    assert masks_to_rle(np.zeros((0, 5, 3), bool)) == []
    assert rle_to_masks([], 5, 3).shape == (0, 5, 3)
    square = rle_to_masks([[[1, 1, 4, 1, 4, 3, 1, 3]]], height=6, width=5)
    assert square.shape == (1, 6, 5) and square.dtype == bool and square[0, 2, 2] and not square[0, 5, 0]
    with pytest.raises(ValueError, match="threshold"):
        masks_to_rle(np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="NxHxW"):
        masks_to_rle(np.zeros((2, 2), bool))


def test_xyxy_to_xywh() -> None:
    assert xyxy_to_xywh(torch.tensor([[1.0, 2.0, 4.5, 7.0]])) == [[1.0, 2.0, 3.5, 5.0]]
    assert xyxy_to_xywh(np.array([[0, 0, 10, 20], [5, 5, 6, 6]])) == [[0, 0, 10, 20], [5, 5, 1, 1]]
    assert xyxy_to_xywh(np.zeros((0, 4))) == []
    with pytest.raises(ValueError, match="Nx4"):
        xyxy_to_xywh(np.zeros((2, 3)))


def test_detections_to_results() -> None:
    kp = torch.tensor([[[1.0, 2.0, 0.9], [3.0, 4.0, 0.8]]])
    masks = torch.zeros(1, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    (r,) = detections_to_results(7, boxes=torch.tensor([[2.0, 1.0, 5.0, 3.0]]), scores=torch.tensor([0.5]),
                                 category_ids=torch.tensor([3]), masks=masks, keypoints=kp)
    assert r["image_id"] == 7 and r["category_id"] == 3 and type(r["category_id"]) is int
    assert r["bbox"] == [2.0, 1.0, 3.0, 2.0] and r["score"] == 0.5
    assert r["keypoints"] == pytest.approx([1.0, 2.0, 0.9, 3.0, 4.0, 0.8])
    assert r["segmentation"]["size"] == [6, 8]
    np.testing.assert_array_equal(rle_to_masks([r["segmentation"]])[0], masks[0].numpy())
    empty = detections_to_results(7, boxes=torch.zeros(0, 4), scores=torch.zeros(0),
                                  category_ids=torch.zeros(0, dtype=torch.long),
                                  masks=torch.zeros(0, 6, 8, dtype=torch.bool),
                                  keypoints=torch.zeros(0, 2, 3))
    assert empty == []
    with pytest.raises(ValueError, match="1 boxes but 2 scores"):
        detections_to_results(1, boxes=np.zeros((1, 4)), scores=np.zeros(2), category_ids=np.ones(1))


# -- bad input ---------------------------------------------------------------------------------
def _tiny_gt(first_ann_id: int = 1) -> dict[str, Any]:
    """One 20x30 image: a 3-keypoint 'walker' (with OKS sigmas) and a plain 'box'."""
    walker = {"id": 1, "name": "walker", "keypoints": ["head", "left_foot", "right_foot"],
              "oks_sigmas": [0.05, 0.08, 0.08]}
    anns = [
        {"image_id": 5, "category_id": 1, "bbox": [2.0, 2.0, 10.0, 12.0], "area": 120.0, "iscrowd": 0,
         "keypoints": [6, 3, 2, 4, 13, 2, 10, 13, 2], "num_keypoints": 3,
         "segmentation": [[2, 2, 12, 2, 12, 14, 2, 14]]},
        {"image_id": 5, "category_id": 2, "bbox": [15.0, 4.0, 10.0, 10.0], "area": 100.0, "iscrowd": 0,
         "segmentation": [[15, 4, 25, 4, 25, 14, 15, 14]]},
    ]
    return {"images": [{"id": 5, "height": 20, "width": 30}],
            "categories": [walker, {"id": 2, "name": "box"}],
            "annotations": [{"id": first_ann_id + i, **a} for i, a in enumerate(anns)]}


def _results_for(gt: dict[str, Any], iou_type: str) -> list[dict[str, Any]]:
    """The ground truth itself as results of ``iou_type``."""
    out = []
    for a in gt["annotations"]:
        r = {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": a["bbox"],
             "segmentation": a["segmentation"]}
        if iou_type == "keypoints":
            if "keypoints" not in a:
                continue
            r["keypoints"] = a["keypoints"]
        out.append(r)
    return out


def test_tiny_ground_truth_against_itself() -> None:
    gt = _tiny_gt(first_ann_id=0)  # id 0 would mean "no match" to pycocotools: renumbered
    for iou_type in ("bbox", "segm", "keypoints"):
        result = evaluate_coco(gt, _results_for(gt, iou_type), iou_type)  # type: ignore[arg-type]
        assert result.stats[0] == pytest.approx(1.0), iou_type
    assert gt == _tiny_gt(first_ann_id=0)  # the caller's dict is untouched (ids, polygons)
    assert result.num_images == 1 and result.num_results == 1


def test_pycocotools_prints_nothing_even_where_print_is_logged(monkeypatch, capsys) -> None:
    """Inside a Prefect run with ``log_prints``, ``print`` is patched to log every call aimed at
    stdout, whatever ``sys.stdout`` is: pycocotools' "creating index..." lines reached the run's
    logs and the terminal of `densepipe run`."""
    import builtins

    real, logged = builtins.print, []

    def as_log(*args: Any, **kwargs: Any) -> None:  # what Prefect's print_as_log does
        if kwargs.get("file") in (None, sys.stdout, sys.stderr):
            logged.append(" ".join(map(str, args)))
        else:
            real(*args, **kwargs)

    monkeypatch.setattr(builtins, "print", as_log)
    gt = _tiny_gt(first_ann_id=1)
    result = evaluate_coco(gt, _results_for(gt, "bbox"), "bbox")
    assert logged == [] and capsys.readouterr().out == ""
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in result.summary


@pytest.mark.parametrize(("iou_type", "change", "message"), [
    ("bbox", {"image_id": 99}, "result 0: image_id 99 is not in the ground truth (1 images)"),
    ("bbox", {"image_id": "5"}, "result 0: image_id '5' is not in the ground truth"),
    ("bbox", {"category_id": 7}, "result 0: category_id 7 is not in the ground truth (category ids 1, 2)"),
    ("bbox", {"bbox": None}, "result 0: missing 'bbox'"),
    ("bbox", {"bbox": [1, 2, 3]}, "result 0: bbox [1, 2, 3] is not [x, y, w, h] (4 finite numbers)"),
    ("bbox", {"bbox": [5, 5, 2, -1]}, "result 0: bbox [5, 5, 2, -1] has a negative width or height"),
    ("bbox", {"score": None}, "result 0: missing 'score'"),
    ("bbox", {"score": "high"}, "result 0: score 'high' is not a finite number"),
    ("segm", {"segmentation": None}, "result 0: missing 'segmentation'"),
    ("segm", {"segmentation": {"size": [10, 30], "counts": "abc"}},
     "result 0: segmentation size [10, 30] differs from image 5's [height, width] [20, 30]"),
    ("segm", {"segmentation": [[1, 2, 3, 4]]}, "lengths [4]"),
    ("keypoints", {"keypoints": None}, "result 0: missing 'keypoints'"),
    ("keypoints", {"keypoints": [1, 2, 1] * 2},
     "result 0: keypoints has 6 numbers; category_id 1 has 3 keypoints, so expected 9"),
    ("keypoints", {"category_id": 2, "keypoints": [1, 2, 1] * 3},
     "result 0: category_id 2 has no 'keypoints' names in the ground-truth categories"),
])
def test_check_results_messages(iou_type: str, change: dict[str, Any], message: str) -> None:
    gt = _tiny_gt()
    results = _results_for(gt, iou_type)
    for key, value in change.items():
        if value is None:
            del results[0][key]
        else:
            results[0][key] = value
    with pytest.raises(DataError) as info:
        check_results(load_coco_gt(gt), results, iou_type, source="preds.json")
    text = str(info.value)
    assert text.startswith("preds.json: ") and message in text and "\n" not in text
    with pytest.raises(DataError, match="preds.json"):
        evaluate_coco(gt, results, iou_type, source="preds.json")  # type: ignore[arg-type]


def test_keypoint_sigmas() -> None:
    gt = _tiny_gt()
    results = _results_for(gt, "keypoints")
    results[0]["keypoints"] = [6, 4, 1, 4, 13, 1, 10, 13, 1]  # head 1 px off: OKS 0.886 with sigma 0.05
    tight = evaluate_coco(gt, results, "keypoints", kpt_oks_sigmas=[0.001, 0.08, 0.08]).stats[0]
    assert tight < evaluate_coco(gt, results, "keypoints").stats[0] == pytest.approx(0.8)  # GT's sigmas
    with pytest.raises(ConfigError, match=r"2 OKS sigmas given but category 1 \(walker\) has 3 keypoints"):
        evaluate_coco(gt, results, "keypoints", kpt_oks_sigmas=[0.1, 0.1])
    del gt["categories"][0]["oks_sigmas"]
    with pytest.raises(ConfigError, match="has 3 keypoints and no 'oks_sigmas'.*pass 3 per-keypoint"):
        evaluate_coco(gt, results, "keypoints")
    assert evaluate_coco(gt, results, "keypoints", kpt_oks_sigmas=[0.05] * 3).stats[0] > 0
    with pytest.raises(ConfigError, match="unknown COCO evaluation type 'mask'; allowed: bbox, segm"):
        evaluate_coco(gt, results, "mask")  # type: ignore[arg-type]


def test_empty_results_score_zero(conformance_dir: Path) -> None:
    result = evaluate_coco(conformance_dir / "cocoapi_fake/instances_val2014_100.json", [], "bbox")
    assert result.stats == [0.0] * 12 and result.num_results == 0
    gt = _tiny_gt()  # no small ground truth: APs is not defined
    named = evaluate_coco(gt, [], "segm").named()
    assert named["AP"] == 0.0 and "APs" in named and "APl" not in named
    assert evaluate_coco(gt, [], "keypoints").stats[0] == 0.0


def test_ground_truth_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.json: ground-truth file not found"):
        load_coco_gt(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"images\": [")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        load_coco_gt(bad)
    gt = _tiny_gt()
    del gt["categories"]
    with pytest.raises(DataError, match="missing 'categories'"):
        load_coco_gt(gt)
    with pytest.raises(DataError, match=r"found a JSON list \(is this a results file\?\)"):
        load_coco_gt([])  # type: ignore[arg-type]
    gt = _tiny_gt()
    gt["annotations"][1]["image_id"] = 6
    with pytest.raises(DataError, match="annotations\\[1\\] \\(id 2\\): image_id 6 is not among the images"):
        load_coco_gt(gt)
    gt = _tiny_gt()
    del gt["annotations"][1]["segmentation"]
    with pytest.raises(DataError, match="annotation id 2 has no 'segmentation'"):
        evaluate_coco(gt, [], "segm")


def test_write_results_json(tmp_path: Path) -> None:
    results = detections_to_results(5, boxes=np.array([[0.0, 0.0, 2.0, 2.0]]), scores=np.array([0.3]),
                                    category_ids=np.array([2]), masks=np.ones((1, 20, 30), bool))
    path = write_results_json(tmp_path / "out" / "results.json", results)
    assert json.loads(path.read_text()) == results
    assert evaluate_coco(_tiny_gt(), path, "segm").num_results == 1
    assert CocoEvalResult("bbox", [-1.0] * 12, "", 0, 0).named() == {}


# -- CLI ---------------------------------------------------------------------------------------
def densepipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=cwd)


def test_cli_coco_eval(tmp_path: Path) -> None:
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(_tiny_gt()))
    results = _results_for(_tiny_gt(), "bbox")
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(results))
    out = tmp_path / "stats.json"
    proc = densepipe("coco-eval", "--gt", str(gt_path), "--pred", str(pred), "--type", "bbox",
                     "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "COCO bbox evaluation: 1 images, 2 results" in proc.stdout
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in proc.stdout
    stats = json.loads(out.read_text())
    assert stats["APs"] == pytest.approx(1.0) and "APm" not in stats and "APl" not in stats  # all small

    results[1]["image_id"] = 404
    pred.write_text(json.dumps(results))
    out.unlink()
    proc = densepipe("coco-eval", "--gt", str(gt_path), "--pred", str(pred), "--type", "bbox",
                     "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {pred}: result 1: image_id 404 is not in the ground truth (1 images)"]
    assert not out.exists()


# -- keep_boxes: pycocotools' convention for results carrying a box and a mask ---------------------
def _box_and_mask_case() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A 200x200 image whose detections carry a bbox and a polygon; several have a mask area in
    one COCO area range and a box area in another (a thin triangle fills half its box)."""
    def tri(x: float, y: float, w: float, h: float) -> list[list[float]]:
        return [[x, y, x + w, y, x, y + h]]

    def sq(x: float, y: float, s: float) -> list[list[float]]:
        return [[x, y, x + s, y, x + s, y + s, x, y + s]]

    gt_objs = [(1, sq(10, 10, 40), [10, 10, 40, 40], 1600.0),
               (1, tri(60, 60, 80, 80), [60, 60, 80, 80], 3200.0),
               (2, sq(150, 150, 5), [150, 150, 5, 5], 25.0),
               (2, tri(0, 160, 60, 30), [0, 160, 60, 30], 900.0)]
    gt = {"images": [{"id": 1, "height": 200, "width": 200}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "segmentation": seg,
                           "bbox": box, "area": area, "iscrowd": 0}
                          for i, (c, seg, box, area) in enumerate(gt_objs)]}
    dets = [(1, sq(11, 9, 40), [11, 9, 40, 40], 0.9),
            (1, tri(62, 58, 80, 80), [62, 58, 80, 80], 0.8),
            (1, tri(100, 0, 90, 22), [100, 0, 90, 22], 0.99),  # mask 990 (small), box 1980 (medium)
            (2, sq(151, 150, 5), [151, 150, 5, 5], 0.6),
            (2, tri(1, 161, 60, 30), [1, 161, 60, 30], 0.95),  # GT small by mask, box medium
            (1, tri(120, 100, 70, 70), [120, 100, 70, 70], 0.98),  # 2450 medium vs 4900 large
            (1, tri(0, 60, 50, 50), [0, 60, 50, 50], 0.4)]
    results = [{"image_id": 1, "category_id": c, "segmentation": seg, "bbox": box, "score": s}
               for c, seg, box, s in dets]
    return gt, results


def _pycocotools_stats(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> list[float]:
    """``COCOeval`` run directly, as a user would on the raw files."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


def test_keep_boxes_equals_pycocotools_on_box_and_mask_results(tmp_path: Path) -> None:
    gt, results = _box_and_mask_case()
    direct = _pycocotools_stats(gt, results, "segm")
    kept = evaluate_coco(gt, results, "segm", keep_boxes=True).stats
    np.testing.assert_allclose(kept, direct, rtol=0, atol=1e-12)
    dropped = evaluate_coco(gt, results, "segm").stats  # detectron2's: mask areas
    assert dropped[:3] == pytest.approx(direct[:3])  # area "all": same matching
    assert any(abs(a - b) > 1e-6 for a, b in zip(dropped[3:], direct[3:], strict=True))

    gt_path, pred = tmp_path / "gt.json", tmp_path / "pred.json"
    gt_path.write_text(json.dumps(gt))
    pred.write_text(json.dumps(results))
    out = tmp_path / "stats.json"
    proc = densepipe("coco-eval", "--gt", str(gt_path), "--pred", str(pred), "--type", "segm",
                     "--keep-boxes", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    named = json.loads(out.read_text())
    assert named["APm"] == pytest.approx(direct[4], abs=1e-12)  # 0.45; 0.6 without the option
    assert "APl" not in named and direct[5] == -1  # no large ground truth: not defined


def test_keep_boxes_needs_a_box_on_every_result() -> None:
    gt, results = _box_and_mask_case()
    del results[2]["bbox"]
    with pytest.raises(DataError, match=r"result 2: missing 'bbox' \(keep_boxes"):
        evaluate_coco(gt, results, "segm", keep_boxes=True)
    evaluate_coco(gt, results, "segm")  # dropping boxes: none needed
