"""Batch prediction (``pipeline.predict``): inputs, layout, batching, all or nothing, and the round
trip ``predict`` -> standalone evaluators == ``evaluate``.

One small model (panoptic + keypoints, so semantic and instance too) is trained once for the module
on the session's tiny synthetic dataset (4 val images, 64x64)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline import stages
from pipeline.config import load_config
from pipeline.data.card import DatasetCard
from pipeline.errors import DataError, OutputError
from pipeline.predict import MANIFEST, SizeBatches, expand_inputs, image_ids
from plugins.panoptic.files import evaluate_panoptic_files
from plugins.rcnn.coco import evaluate_coco
from plugins.semantic.files import evaluate_label_folders
from tests.conftest import REPO_ROOT, tiny_overrides

# output_init small: the 16-step training this module relies on for detections with AP above 0
# was found with the earlier semantic init (any init change moves the shared backbone's path)
HEADS = ("{semantic: {conv_dims: 32, output_init: small}, instance: {score_thresh: 0.0}, "
         "panoptic: {score_threshold: 0.0, stuff_area_limit: 16}}")


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """16 steps at a high learning rate: enough for a detector with AP above 0 (a round trip of
    all-zero APs would prove little), about 10 s on 2 cores. Evaluated once, at test size 48: the
    64x64 images are resized to 48x48 and padded to 64x64, every prediction pasted back at 64x64
    (the test-size rule), so predict and evaluate agree through the whole path."""
    out = tmp_path_factory.mktemp("batch-predict")
    cfg = load_config(None, tiny_overrides(tiny_dataset, out, None, train__steps=16, train__lr=0.03,
                                           train__checkpoint_every=16, data__test_size=48,
                                           model__tasks="[panoptic,keypoints]", model__heads=HEADS))
    stages.train(cfg)
    metrics = stages.evaluate(cfg)
    return {"cfg": cfg, "out": out, "checkpoint": out / "train" / "best.pt", "metrics": metrics,
            "card": DatasetCard.load(tiny_dataset / "meta.json")}


def _predict(trained: dict[str, Any], inputs: list[Any], out: Path, **kwargs: Any) -> list[str]:
    kwargs.setdefault("num_workers", 0)
    return stages.predict(trained["cfg"], inputs, checkpoint=trained["checkpoint"], out_dir=out, **kwargs)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _difference(a: Any, b: Any, tol: float, where: str = "") -> str | None:
    """Where two JSON values differ (``None``: equal, numbers within ``tol``); of an RLE mask
    (``counts``), only its size counts: a box that moves by rounding can move a mask edge."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a)} != {sorted(b)}"
        found = (_difference(a[k], b[k], tol, f"{where}.{k}") for k in a if k != "counts")
        return next((d for d in found if d), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items != {len(b)}"
        found = (_difference(x, y, tol, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
        return next((d for d in found if d), None)
    if isinstance(a, float) or isinstance(b, float):
        return None if abs(a - b) <= tol else f"{where}: {a} != {b}"
    return None if a == b else f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_predict_then_the_standalone_evaluators_reproduce_evaluate(trained: dict[str, Any],
                                                                     tiny_dataset: Path,
                                                                     tmp_path: Path) -> None:
    """Exact: the same model, the same images at their own size, the same batches (batch size
    ``evaluate.batch_size``); the result files are byte-identical to ``evaluate``'s."""
    cfg, metrics, card = trained["cfg"], trained["metrics"], trained["card"]
    assert max(metrics["instance/bbox_AP50"], metrics["instance/segm_AP50"]) > 0
    gt_json = tiny_dataset / "annotations" / "instances_val.json"
    out = tmp_path / "pred"
    _predict(trained, [tiny_dataset / "images" / "val"], out, coco_gt=gt_json,
             batch_size=cfg.evaluate.batch_size, vis=False)
    ev = out / "eval"

    semantic = evaluate_label_folders(tiny_dataset / "semantic" / "val", ev / "semantic_pred",
                                      num_classes=card.num_classes, class_names=card.class_names)
    assert semantic == {k: v for k, v in metrics.items() if k.startswith("semantic/")}

    for iou_type in ("bbox", "segm"):
        named = evaluate_coco(gt_json, ev / "instance_coco_results.json", iou_type).named()
        assert {f"instance/{iou_type}_{k}": v for k, v in named.items()} == \
            {k: v for k, v in metrics.items() if k.startswith(f"instance/{iou_type}_")}
    for name in ("instance", "keypoints"):
        assert (ev / f"{name}_coco_results.json").read_bytes() == \
            (Path(cfg.evaluate.out_dir) / f"{name}_coco_results.json").read_bytes()

    sigmas = ",".join(str(s) for s in card.keypoints[0].oks_sigmas)
    stats = tmp_path / "keypoints.json"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "coco-eval", "--gt", str(gt_json),
                           "--pred", str(ev / "keypoints_coco_results.json"), "--type", "keypoints",
                           "--sigmas", sigmas, "--json", str(stats)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert {f"keypoints/{k}": v for k, v in json.loads(stats.read_text()).items()} == \
        {k: v for k, v in metrics.items() if k.startswith("keypoints/")}

    pq = evaluate_panoptic_files(tiny_dataset / "annotations" / "panoptic_val.json",
                                 tiny_dataset / "panoptic" / "val", ev / "panoptic_pred.json",
                                 ev / "panoptic_pred").named()
    assert {f"panoptic/{k}": v for k, v in pq.items()} == \
        {k: v for k, v in metrics.items() if k.startswith("panoptic/")}


@pytest.mark.slow
def test_folders_globs_layout_and_batch_sizes(trained: dict[str, Any], tiny_dataset: Path,
                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    val = sorted((tiny_dataset / "images" / "val").iterdir())
    src = tmp_path / "in"
    for sub, image in (("a", val[0]), ("b", val[0]), ("b/deeper", val[1])):
        (src / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, src / sub / image.name)  # a/000001.png and b/000001.png: no collision
    Image.open(val[2]).resize((48, 40)).save(src / "b" / "small.jpg", quality=95)  # another size
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden").mkdir()
    shutil.copy(val[3], src / ".hidden" / "skipped.png")
    pattern = str(tiny_dataset / "images" / "val" / "*.png")  # expanded by densepipe, not a shell
    inputs = [src, pattern, src / "a" / val[0].name]  # the last one again: predicted once

    found = expand_inputs(inputs)
    names = [i.name for i in found]
    assert names == ["a/000001.png", "b/000001.png", "b/deeper/000002.png", "b/small.jpg",
                     *[p.name for p in val]]
    assert SizeBatches([(64, 64), (40, 48), (64, 64), (64, 64)], batch_size=2).batches == \
        [[0, 2], [3], [1]]

    one = _predict(trained, inputs, tmp_path / "bs1", batch_size=1)
    summary = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict")]
    assert len(summary) == 1 and summary[0].startswith("predict: 8 images in ")  # not a terminal
    three = _predict(trained, inputs, tmp_path / "bs3", batch_size=3, num_workers=1, vis=False)
    tree1, tree3 = _tree(tmp_path / "bs1"), _tree(tmp_path / "bs3")
    assert {Path(f).relative_to(tmp_path / "bs1").as_posix() for f in one} == set(tree1)
    assert len(three) == len(tree3)
    # the layout: raw files per task, drawings per task, keyed by the relative path
    for task in ("semantic", "instance", "keypoints", "panoptic"):
        assert f"vis/{task}/b/deeper/000002.png" in tree1 and f"vis/{task}/b/small.png" in tree1
    assert {"semantic/a/000001_semantic.png", "semantic/b/000001_semantic.png",
            "instance/b/small_instance.json", "keypoints/000004_keypoints.json",
            "panoptic/b/deeper/000002_panoptic.png", "panoptic/b/deeper/000002_panoptic.json",
            MANIFEST} <= set(tree1)
    assert not any(f.startswith(("vis/", "eval/")) for f in tree3)  # vis=False, no eval files
    with Image.open(tmp_path / "bs1" / "semantic" / "b" / "small_semantic.png") as im:
        assert im.size == (48, 40)  # the original resolution
    manifest = json.loads(tree1[MANIFEST])
    assert [(i["name"], i["image_id"]) for i in manifest["images"]] == \
        [(n, k) for k, n in enumerate(names, start=1)]
    assert set(manifest["files"]) == set(tree1)
    # batch size 1 vs 3 (and a loader worker): the same files. PNGs are byte-identical; JSON
    # numbers agree to float32 rounding, not bit for bit: CPU convolutions (oneDNN) and the box
    # head's matrix products round differently for different batch sizes (features differ by
    # ~1e-7; box regression amplifies it to 1e-4..1e-3 px, measured with 2 and 1 threads: 0.01 px)
    for rel, data in tree3.items():
        if rel == MANIFEST:
            continue
        if rel.endswith(".json"):
            difference = _difference(json.loads(data), json.loads(tree1[rel]), 1e-2)
            assert difference is None, f"{rel}{difference}"
        else:
            assert data == tree1[rel], rel


def test_input_errors_name_the_input(trained: dict[str, Any], tiny_dataset: Path,
                                     tmp_path: Path) -> None:
    nothing = str(tmp_path / "*.png")
    with pytest.raises(DataError, match=r"\*\.png: the pattern matched no image files"):
        _predict(trained, [nothing], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no image files in this folder"):
        expand_inputs([tmp_path / "empty"])
    val = next((tiny_dataset / "images" / "val").iterdir())
    (tmp_path / "two").mkdir()
    shutil.copy(val, tmp_path / "two" / "x.png")
    Image.open(val).save(tmp_path / "two" / "x.jpg")
    with pytest.raises(DataError, match=r"x\.png: its outputs would be named 'x', as those of .*x\.jpg"):
        expand_inputs([tmp_path / "two"])
    with pytest.raises(DataError, match=r"x\.jpg: not in .*instances_val\.json: no image with "
                                        r"file_name 'x\.jpg'"):
        image_ids(expand_inputs([tmp_path / "two" / "x.jpg"]),
                  tiny_dataset / "annotations" / "instances_val.json")
    assert not (tmp_path / "out").exists()


def test_all_or_nothing_and_ownership(trained: dict[str, Any], tiny_dataset: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    val = sorted((tiny_dataset / "images" / "val").iterdir())[:2]
    src = tmp_path / "in"
    src.mkdir()
    for image in val:
        shutil.copy(image, src / image.name)
    data = (src / val[1].name).read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    for out in (tmp_path / "fresh", mine):  # a bad image among good ones: nothing written
        with pytest.raises(DataError, match=r"truncated\.png: truncated or corrupt image"):
            _predict(trained, [src], out)
    assert not (tmp_path / "fresh").exists()
    assert _tree(mine) == {"keep.txt": b"mine"}
    (src / "truncated.png").unlink()

    # a failing dataset writer (in its thread) fails the run: nothing written, no staging left
    from plugins.semantic.task import SemanticTask

    def broken(self: Any, items: Any, out_dir: str, *, card: Any) -> list[str]:
        next(iter(items))
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(SemanticTask, "write_dataset_predictions", broken)
        with pytest.raises(OSError, match="disk full"):
            _predict(trained, [src], mine, eval_files=True, vis=False)
    assert _tree(mine) == {"keep.txt": b"mine"}

    # a user's file where an output goes is never replaced; our own outputs are
    theirs = mine / "semantic" / f"{val[0].stem}_semantic.png"
    theirs.parent.mkdir()
    theirs.write_bytes(b"theirs")
    with pytest.raises(OutputError, match=r"_semantic\.png: exists and was not written by densepipe"):
        _predict(trained, [src], mine, vis=False)
    assert _tree(mine) == {"keep.txt": b"mine", f"semantic/{val[0].stem}_semantic.png": b"theirs"}
    theirs.unlink()
    _predict(trained, [src], mine, vis=False, eval_files=True)
    first = _tree(mine)
    _predict(trained, [src / val[0].name], mine, vis=False, eval_files=True)  # again, one image
    again = _tree(mine)
    assert again["keep.txt"] == b"mine"
    assert {f for f in first if not f.startswith("eval/")} <= set(again)  # raw files accumulate
    assert sorted(f for f in again if f.startswith("eval/semantic_pred/")) == \
        [f"eval/semantic_pred/{val[0].stem}.png"]  # eval/ is the last run's, as a whole
    assert set(json.loads(again[MANIFEST])["files"]) == set(again) - {"keep.txt"}
