"""COCO-style detection, mask and keypoint AP through pycocotools, with checked inputs.

Backs ``densepipe coco-eval``. The numbers are pycocotools' ``COCOeval.stats``; this module adds
what pycocotools leaves to the caller:

- inputs are checked first, so a result naming an unknown image or category, a box that is not 4
  numbers or a keypoint list of the wrong length is a one-line :class:`DataError`, not a traceback
  or a silently wrong score;
- an empty result list scores 0 (pycocotools' ``loadRes`` fails on ``[]``): AP/AR are 0 for every
  area range that has ground truth, -1 ("not defined") for those that have none;
- results keep only the fields of the evaluated type (``keep_boxes=True`` keeps the box too, as
  pycocotools does; see :func:`evaluate_coco`). For ``segm`` the box is dropped, so the area
  ranges use the mask area (a box would make ``loadRes`` use the box area, as detectron2 notes), and
  polygon or uncompressed-RLE segmentations are merged to compressed RLE at the image's size. For
  ``keypoints`` the box is dropped too, so a detection's area is that of its keypoints' extent, as
  for the official results format (``image_id, category_id, keypoints, score``);
- ground-truth annotation ids that pycocotools cannot use (missing, 0, duplicated: it treats id 0 as
  "no match") are renumbered from 1 in a copy; they only serve matching inside ``COCOeval``;
- keypoint evaluation covers the categories that declare ``keypoints`` names, with per-keypoint
  OKS sigmas from the caller, else from the category's ``oks_sigmas``, else COCO's 17 person sigmas.

pycocotools prints progress to stdout; it is captured, and ``summarize()``'s table is kept in
:attr:`CocoEvalResult.summary`.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import logging
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pycocotools.coco
import pycocotools.cocoeval
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.data.card import COCO_PERSON_SIGMAS
from pipeline.errors import ConfigError, DataError
from pipeline.io import atomic_write_json
from plugins.rcnn.results import to_compressed_rle


@contextlib.contextmanager
def _pycocotools_prints(into: io.StringIO | None = None) -> Iterator[None]:
    """pycocotools' progress and summary prints go to ``into`` (or nowhere) for the block, also
    inside a Prefect run with ``log_prints``, whose patched ``print`` logs a call whatever
    ``sys.stdout`` is: a module-level ``print`` in pycocotools' modules shadows the builtin."""
    target = into if into is not None else io.StringIO()

    def to_target(*args: Any, **kwargs: Any) -> None:
        kwargs["file"] = target  # a file other than stdout: Prefect's print passes it through
        builtins.print(*args, **kwargs)

    modules = (pycocotools.coco, pycocotools.cocoeval)
    for module in modules:
        module.print = to_target  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in modules:
            module.__dict__.pop("print", None)

log = logging.getLogger(__name__)

IouType = Literal["bbox", "segm", "keypoints"]
IOU_TYPES: tuple[str, ...] = ("bbox", "segm", "keypoints")
BBOX_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
SEGM_STAT_NAMES = BBOX_STAT_NAMES
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
GT_SOURCE = "ground truth"  # how an in-memory ground truth is named in messages


def stat_names(iou_type: str) -> tuple[str, ...]:
    """Names of ``COCOeval.stats`` entries, in order, for ``iou_type``."""
    _check_iou_type(iou_type)
    return KEYPOINT_STAT_NAMES if iou_type == "keypoints" else BBOX_STAT_NAMES


@dataclass
class CocoEvalResult:
    """One COCOeval run: raw ``stats`` (-1 = not defined: no ground truth in that area range) and
    the accumulated ``precision`` table (T x R x K x A x M, ``COCOeval.eval["precision"]``, -1 =
    a category without ground truth) at ``recall_thresholds`` (R) and ``iou_thresholds`` (T)."""

    iou_type: str
    stats: list[float]
    summary: str
    num_images: int
    num_results: int
    precision: np.ndarray | None = field(default=None, repr=False)
    recall_thresholds: np.ndarray | None = field(default=None, repr=False)
    iou_thresholds: np.ndarray | None = field(default=None, repr=False)

    def named(self, prefix: str = "") -> dict[str, float]:
        """``{prefix + name: value}`` in stats order, leaving out stats equal to -1."""
        return {f"{prefix}{name}": float(value)
                for name, value in zip(stat_names(self.iou_type), self.stats, strict=True)
                if value != -1}


# -- ground truth ------------------------------------------------------------------------------
def load_coco_gt(gt: str | Path | dict[str, Any] | COCO) -> COCO:
    """A quiet ``COCO`` object from a ground-truth JSON path, its parsed dict, or a ``COCO``.

    The dataset needs ``images``, ``annotations`` and ``categories`` lists; every image and category
    an ``id``; every annotation an ``image_id`` and ``category_id`` that exist. A dict is not
    modified (the annotations are copied). Annotation ids that are missing, not positive integers or
    repeated are renumbered 1..N in the copy, with a warning. A ``COCO`` object is used as it is.

    Raises:
        DataError: missing or unreadable file, invalid JSON, missing lists or ids, dangling ids.
    """
    if isinstance(gt, COCO):
        if _ann_ids_usable(gt.dataset.get("annotations", [])):
            return gt
        return load_coco_gt(gt.dataset)
    if isinstance(gt, str | Path):
        source: object = gt
        data = _read_json(gt, "ground-truth")
    else:
        source, data = GT_SOURCE, gt
    data = _checked_gt_dataset(data, source)
    coco = COCO()
    coco.dataset = data
    with _pycocotools_prints():
        coco.createIndex()
    return coco


def _checked_gt_dataset(data: Any, source: object) -> dict[str, Any]:
    if not isinstance(data, dict):
        hint = " (is this a results file?)" if isinstance(data, list) else ""
        raise DataError(source, f"expected a COCO ground-truth object with images, annotations and "
                                f"categories, found a JSON {type(data).__name__}{hint}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(source, f"missing '{key}' (a COCO ground truth has images, annotations "
                                    f"and categories)")
        if not isinstance(data[key], list):
            raise DataError(source, f"'{key}' must be a list, found {type(data[key]).__name__}")
    image_ids = _ids(data["images"], "images", source)
    cat_ids = _ids(data["categories"], "categories", source)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(source, f"annotations[{i}] must be an object, found {type(ann).__name__}")
        for key, known, what in (("image_id", image_ids, "images"), ("category_id", cat_ids, "categories")):
            if key not in ann:
                raise DataError(source, f"annotations[{i}] has no '{key}'")
            if not _contains(known, ann[key]):
                raise DataError(source, f"annotations[{i}] (id {ann.get('id')!r}): {key} {ann[key]!r} "
                                        f"is not among the {what}")
    # COCOeval writes into the annotations ('ignore'; polygons become RLE): give it copies
    anns = [dict(ann) for ann in data["annotations"]]
    if not _ann_ids_usable(anns):
        log.warning("%s: annotation ids are missing, not positive integers or repeated; renumbered "
                    "from 1 for evaluation (pycocotools treats id 0 as 'no match')", source)
        for i, ann in enumerate(anns):
            ann["id"] = i + 1
    return {**data, "annotations": anns}


def _ids(items: list[Any], key: str, source: object) -> set[Any]:
    ids = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise DataError(source, f"{key}[{i}] has no 'id'")
        if isinstance(item["id"], list | dict):
            raise DataError(source, f"{key}[{i}]: id {item['id']!r} is not a number or string")
        if item["id"] in ids:
            raise DataError(source, f"{key}[{i}]: id {item['id']!r} appears more than once")
        ids.add(item["id"])
    return ids


def _ann_ids_usable(anns: list[dict[str, Any]]) -> bool:
    ids = [a.get("id") for a in anns]
    ok = all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids)
    return ok and len(set(ids)) == len(ids)


def _contains(known: Iterable[Any] | dict[Any, Any], value: Any) -> bool:
    try:
        return value in known  # type: ignore[operator]
    except TypeError:  # unhashable (a list or dict where an id belongs)
        return False


def _check_gt_for_type(gt: COCO, iou_type: str, cat_ids: Sequence[Any], img_ids: Sequence[Any],
                       source: object) -> None:
    """The fields ``COCOeval`` reads for ``iou_type`` on the evaluated annotations."""
    need = {"bbox": ("bbox",), "segm": ("segmentation",), "keypoints": ("keypoints", "num_keypoints")}
    fields = ("area", "iscrowd", *need[iou_type])
    cats, imgs = set(cat_ids), set(img_ids)
    for ann in gt.dataset["annotations"]:
        if ann["category_id"] not in cats or ann["image_id"] not in imgs:
            continue
        for key in fields:
            if key not in ann:
                raise DataError(source, f"annotation id {ann['id']!r} has no '{key}' "
                                        f"({iou_type} evaluation needs {', '.join(fields)})")
        if iou_type == "segm" and isinstance(ann["segmentation"], list):
            img = gt.imgs[ann["image_id"]]
            if "height" not in img or "width" not in img:
                raise DataError(source, f"image id {ann['image_id']!r} has no 'height'/'width' "
                                        f"(needed to rasterise its polygons)")


# -- results -----------------------------------------------------------------------------------
def check_results(gt: COCO, results: list[dict[str, Any]], iou_type: str, *, source: str = "results") -> None:
    """Raise :class:`DataError` naming ``source``, the result index and the bad value, if a result

    names an image or category absent from ``gt``; lacks a numeric ``score``; or lacks what
    ``iou_type`` needs: ``bbox`` (4 finite numbers, width and height >= 0), ``segmentation`` (an RLE
    dict whose ``size`` is the image's ``[height, width]``, or polygons of >= 3 points), or
    ``keypoints`` (3*K numbers, K from the category's ``keypoints`` names, which it must have).
    """
    _check_iou_type(iou_type)
    if not isinstance(results, list):
        hint = " (is this a ground-truth file?)" if isinstance(results, dict) else ""
        raise DataError(source, f"expected a JSON list of results, found a {type(results).__name__}{hint}")
    sizes = _mask_sizes(gt) if iou_type == "segm" else {}
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise DataError(source, f"result {i}: expected an object, found {type(r).__name__}")
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise DataError(source, f"result {i}: missing '{key}'")
        if not _contains(gt.imgs, r["image_id"]):
            raise DataError(source, f"result {i}: image_id {r['image_id']!r} is not in the ground truth "
                                    f"({len(gt.imgs)} images)")
        if not _contains(gt.cats, r["category_id"]):
            raise DataError(source, f"result {i}: category_id {r['category_id']!r} is not in the ground "
                                    f"truth (category ids {_some(gt.cats)})")
        if not _is_number(r["score"]):
            raise DataError(source, f"result {i}: score {r['score']!r} is not a finite number")
        if iou_type == "bbox":
            _check_bbox(r, i, source)
        elif iou_type == "segm":
            _check_segmentation(r, sizes[r["image_id"]], i, source)
        else:
            _check_keypoints(r, gt.cats[r["category_id"]], i, source)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_bbox(r: dict[str, Any], i: int, source: str) -> None:
    if "bbox" not in r:
        raise DataError(source, f"result {i}: missing 'bbox' (bbox evaluation needs [x, y, w, h])")
    b = r["bbox"]
    if not (isinstance(b, list | tuple) and len(b) == 4 and all(_is_number(v) for v in b)):
        raise DataError(source, f"result {i}: bbox {b!r} is not [x, y, w, h] (4 finite numbers)")
    if b[2] < 0 or b[3] < 0:
        raise DataError(source, f"result {i}: bbox {b!r} has a negative width or height "
                                f"(expected [x, y, w, h], not corners)")


def _mask_sizes(gt: COCO) -> dict[Any, tuple[list[Any], str]]:
    """Per image, the ``[height, width]`` its masks have, and where that comes from.

    That is the size of its ground-truth RLE masks where it has some (pycocotools compares RLEs as
    they are, and a mask of another size never matches), else the image's ``height``/``width``.
    """
    sizes: dict[Any, tuple[list[Any], str]] = {
        img_id: ([img.get("height"), img.get("width")], "[height, width]") for img_id, img in gt.imgs.items()
    }
    for ann in gt.dataset["annotations"]:
        seg = ann.get("segmentation")
        if isinstance(seg, dict) and isinstance(seg.get("size"), list):
            sizes[ann["image_id"]] = ([int(v) for v in seg["size"]], "ground-truth mask size")
    return sizes


def _some(ids: Iterable[Any], limit: int = 10) -> str:
    ordered = sorted(ids, key=lambda v: (str(type(v)), v))
    shown = ", ".join(repr(v) for v in ordered[:limit])
    return shown + (f", ... ({len(ordered)} in all)" if len(ordered) > limit else "")


def _check_segmentation(r: dict[str, Any], expected: tuple[list[Any], str], i: int, source: str) -> None:
    if "segmentation" not in r:
        raise DataError(source, f"result {i}: missing 'segmentation' (segm evaluation needs an RLE or "
                                f"polygons)")
    seg = r["segmentation"]
    hw, hw_what = expected
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2) or not isinstance(counts, str | bytes | list):
            raise DataError(source, f"result {i}: segmentation is not an RLE "
                                    f"{{'size': [h, w], 'counts': ...}} (keys {sorted(seg)})")
        if None not in hw and list(size) != hw:
            raise DataError(source, f"result {i}: segmentation size {size} differs from image "
                                    f"{r['image_id']!r}'s {hw_what} {hw}")
    elif isinstance(seg, list):
        if None in hw:
            raise DataError(source, f"result {i}: polygon segmentation needs image {r['image_id']!r}'s "
                                    f"height and width, which the ground truth lacks")
        lengths = [len(p) if isinstance(p, list) else -1 for p in seg]
        bad = not seg or any(n < 6 or n % 2 for n in lengths) or \
            not all(_is_number(v) for p in seg for v in p)
        if bad:
            raise DataError(source, f"result {i}: segmentation is not a list of polygons "
                                    f"[x1, y1, x2, y2, x3, y3, ...] (at least 3 points each; lengths "
                                    f"{lengths})")
    else:
        raise DataError(source, f"result {i}: segmentation must be an RLE dict or a list of polygons, "
                                f"found {type(seg).__name__}")


def _check_keypoints(r: dict[str, Any], cat: dict[str, Any], i: int, source: str) -> None:
    names = cat.get("keypoints")
    if not names:
        raise DataError(source, f"result {i}: category_id {r['category_id']!r} has no 'keypoints' "
                                f"names in the ground-truth categories (keypoint evaluation needs them)")
    if "keypoints" not in r:
        raise DataError(source, f"result {i}: missing 'keypoints' (keypoint evaluation needs "
                                f"[x1, y1, s1, ...])")
    kp = r["keypoints"]
    if not isinstance(kp, list | tuple) or not all(_is_number(v) for v in kp):
        raise DataError(source, f"result {i}: keypoints must be a list of finite numbers")
    if len(kp) != 3 * len(names):
        raise DataError(source, f"result {i}: keypoints has {len(kp)} numbers; category_id "
                                f"{r['category_id']!r} has {len(names)} keypoints, so expected "
                                f"{3 * len(names)} ([x, y, score] each)")


def _prepared(gt: COCO, results: list[dict[str, Any]], iou_type: str, *, keep_boxes: bool = False,
              source: str = "results") -> list[dict[str, Any]]:
    """Copies of checked results with only the evaluated type's fields; masks as compressed RLE.

    ``keep_boxes`` (segm, keypoints): each result's ``bbox`` is kept too, which makes
    ``loadRes`` take every detection's area from its box (pycocotools' own behaviour on such a
    file); every result must then carry a valid ``bbox`` (else a ``DataError`` naming ``source``)."""
    key = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    sizes = _mask_sizes(gt) if iou_type == "segm" else {}
    with_box = keep_boxes and iou_type != "bbox"
    out = []
    for i, r in enumerate(results):
        value = r[key]
        if iou_type == "segm":
            height, width = sizes[r["image_id"]][0]
            value = to_compressed_rle(value, height, width)
        det = {"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
               key: value}
        if with_box:
            if "bbox" not in r:
                raise DataError(source, f"result {i}: missing 'bbox' (keep_boxes / --keep-boxes "
                                        f"takes each detection's area from its box)")
            _check_bbox(r, i, source)
            det["bbox"] = [float(v) for v in r["bbox"]]
        out.append(det)
    return out


# -- evaluation --------------------------------------------------------------------------------
def evaluate_coco(
    gt: str | Path | dict[str, Any] | COCO,
    results: list[dict[str, Any]] | str | Path,
    iou_type: IouType,
    *,
    kpt_oks_sigmas: Sequence[float] | None = None,
    cat_ids: Sequence[int] | None = None,
    img_ids: Sequence[int] | None = None,
    source: str = "results",
    keep_boxes: bool = False,
) -> CocoEvalResult:
    """Run pycocotools' ``COCOeval`` on checked inputs and return its stats and summary.

    ``gt``: see :func:`load_coco_gt`. ``results``: COCO result dicts, or the path of a results JSON
    (which then names the source in messages). ``cat_ids``/``img_ids`` restrict the evaluation
    (default: all images; all categories, or for keypoints those with ``keypoints`` names).
    ``kpt_oks_sigmas``: one OKS sigma per keypoint (see the module notes for the default).

    ``keep_boxes`` picks the area a ``segm`` or ``keypoints`` detection is binned by in the
    small/medium/large ranges (APs/APm/APl, ARs/ARm/ARl) when a result carries a ``bbox`` as well:

    - ``False`` (default, detectron2's convention): the box is dropped, so the area is the mask's
      area (segm) or the keypoints' extent (keypoints), consistent with the ground truth's;
    - ``True`` (pycocotools' convention): the box is kept, and ``loadRes`` takes the area from the
      box, as ``COCOeval`` run directly on the same files does; every result needs a ``bbox``.

    Matching (IoU, OKS) and the ``all``-area stats are the same either way; ``bbox`` evaluation
    is unaffected.

    Raises:
        DataError: bad ground truth or results (see :func:`check_results`), unknown ``cat_ids`` or
            ``img_ids``, no keypoint category, keypoint categories of different K.
        ConfigError: unknown ``iou_type``; sigmas of the wrong length, non-positive, or missing
            where the default cannot apply.
    """
    _check_iou_type(iou_type)
    gt_source: object = gt if isinstance(gt, str | Path) else GT_SOURCE
    coco_gt = load_coco_gt(gt)
    if isinstance(results, str | Path):
        source = str(results)
        results = _read_json(results, "results")
    check_results(coco_gt, results, iou_type, source=source)  # type: ignore[arg-type]

    cats = _selected(cat_ids, coco_gt.cats, "category", gt_source)
    imgs = _selected(img_ids, coco_gt.imgs, "image", gt_source)
    if iou_type == "keypoints":
        if cat_ids is None:
            cats = [c for c in cats if coco_gt.cats[c].get("keypoints")]
            if not cats:
                raise DataError(gt_source, "no category has 'keypoints' names; keypoint evaluation "
                                           "needs them")
        else:
            for c in cats:
                if not coco_gt.cats[c].get("keypoints"):
                    raise DataError(gt_source, f"category {c!r} has no 'keypoints' names; keypoint "
                                               f"evaluation needs them")
        sigmas = _oks_sigmas(coco_gt, cats, kpt_oks_sigmas, gt_source)
    _check_gt_for_type(coco_gt, iou_type, cats, imgs, gt_source)

    dets = _prepared(coco_gt, results, iou_type, keep_boxes=keep_boxes,  # type: ignore[arg-type]
                     source=source)
    with _pycocotools_prints():
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.catIds = list(cats)
        evaluator.params.imgIds = list(imgs)
        if iou_type == "keypoints":
            evaluator.params.kpt_oks_sigmas = sigmas
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with _pycocotools_prints(summary):
        evaluator.summarize()
    return CocoEvalResult(iou_type=iou_type, stats=[float(s) for s in evaluator.stats],
                          summary=summary.getvalue(), num_images=len(imgs), num_results=len(results),
                          precision=evaluator.eval["precision"],
                          recall_thresholds=np.asarray(evaluator.params.recThrs),
                          iou_thresholds=np.asarray(evaluator.params.iouThrs))


def _selected(ids: Sequence[Any] | None, known: dict[Any, Any], what: str, source: object) -> list[Any]:
    if ids is None:
        return sorted(known)
    unknown = [i for i in ids if not _contains(known, i)]
    if unknown:
        raise DataError(source, f"{what} id {unknown[0]!r} is not in the ground truth")
    return sorted(set(ids))


def _oks_sigmas(gt: COCO, cats: list[Any], given: Sequence[float] | None, source: object) -> np.ndarray:
    """Per-keypoint OKS sigmas shared by the keypoint categories ``cats`` (one K for all)."""
    counts = {c: len(gt.cats[c]["keypoints"]) for c in cats}
    if len(set(counts.values())) > 1:
        raise DataError(source, f"keypoint categories have different numbers of keypoints {counts}; "
                                f"evaluate one category at a time (cat_ids)")
    k = next(iter(counts.values()))
    cat = gt.cats[cats[0]]
    label = f"category {cat['id']!r} ({cat.get('name', '?')})" if len(cats) == 1 else f"categories {cats}"
    if given is not None:
        sigmas = np.asarray(given, dtype=np.float64).reshape(-1)
        if sigmas.size != k:
            raise ConfigError(f"{sigmas.size} OKS sigmas given but {label} has {k} keypoints")
    else:
        declared = [gt.cats[c].get("oks_sigmas") for c in cats]
        found = [tuple(s) if isinstance(s, list | tuple) else (s,) for s in declared if s is not None]
        if found:
            if len(found) != len(cats) or len(set(found)) > 1:
                raise DataError(source, f"'oks_sigmas' differ between or are missing from {label}; "
                                        f"pass the sigmas or evaluate one category at a time")
            sigmas = np.asarray(found[0], dtype=np.float64)
            if sigmas.size != k:
                raise DataError(source, f"'oks_sigmas' of {label} has {sigmas.size} values but "
                                        f"{k} keypoint names")
        elif k == len(COCO_PERSON_SIGMAS):
            sigmas = np.asarray(COCO_PERSON_SIGMAS, dtype=np.float64)
        else:
            raise ConfigError(f"{label} has {k} keypoints and no 'oks_sigmas' in the ground truth; "
                              f"pass {k} per-keypoint OKS sigmas (--sigmas or kpt_oks_sigmas)")
    if not np.all(np.isfinite(sigmas) & (sigmas > 0)):
        raise ConfigError(f"OKS sigmas must be positive numbers, got {sigmas.tolist()}")
    return sigmas


def _empty_results(gt: COCO) -> COCO:
    """A results ``COCO`` with no detections (``loadRes`` cannot build one from ``[]``)."""
    res = COCO()
    res.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                   "categories": [dict(c) for c in gt.dataset["categories"]]}
    res.createIndex()
    return res


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read {what} file: {exc}".splitlines()[0]) from exc


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ConfigError(f"unknown COCO evaluation type {iou_type!r}; allowed: {', '.join(IOU_TYPES)}")


# -- output ------------------------------------------------------------------------------------
def format_coco_table(result: CocoEvalResult) -> str:
    """pycocotools' summary lines under a header naming the type and the image/result counts."""
    header = f"COCO {result.iou_type} evaluation: {result.num_images} images, {result.num_results} results"
    return f"{header}\n{result.summary.rstrip()}\n"


def write_results_json(path: str | Path, results: list[dict[str, Any]]) -> Path:
    """Write COCO results atomically (compact JSON: results files can be large)."""
    return atomic_write_json(path, results, indent=None)


__all__ = [
    "BBOX_STAT_NAMES", "KEYPOINT_STAT_NAMES", "SEGM_STAT_NAMES", "CocoEvalResult", "check_results",
    "evaluate_coco", "format_coco_table", "load_coco_gt", "stat_names", "write_results_json",
]
