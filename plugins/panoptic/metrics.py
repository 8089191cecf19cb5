"""Panoptic quality (PQ; Kirillov et al., "Panoptic Segmentation", 2019), as COCO's panopticapi
computes it.

One image is two id maps (``HxW`` integers, 0 = VOID) with a list of segments each
(``{"id", "category_id", "iscrowd"?, "area"?}``). ``pq_image_stats`` adds that image's per-category
counts to a ``PQStats``; ``PQStats.summarize`` turns the sums into PQ, SQ and RQ.

The rules (panopticapi's ``pq_compute_single_core``):
- a ground-truth segment and a predicted one of the same category *match* when their IoU is above
  0.5, where the union leaves out the predicted segment's pixels that lie on VOID; crowd ground
  truth never matches. Matches are unique because segments do not overlap.
- every matched pair is a true positive and adds its IoU; an unmatched non-crowd ground-truth
  segment is a false negative; an unmatched predicted segment is a false positive unless more than
  half of its pixels lie on VOID or on the crowd region of its own category (the last crowd segment
  of that category listed in the ground truth).
- a ground-truth segment's area is its ``area`` field when given (panopticapi reads it from the
  JSON), else its pixel count; a predicted segment's area is always its pixel count.
- per category: PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP (0 without TP),
  RQ = TP / (TP + FP/2 + FN/2); PQ = SQ x RQ. Group scores (all, things, stuff) average the
  categories that have any TP, FP or FN; ``n`` is how many.

Ground-truth pixels whose id is listed in no segment count as neither VOID nor a segment (as in
panopticapi). Predicted pixels must all be VOID or a listed segment.

Bad input (a predicted id missing from the segments or the reverse, a segment id listed twice, a
category unknown to the ground truth, maps of different sizes) raises ``DataError`` naming the
image and the segment.

Speed: instead of ``np.unique`` over each map and over the combined 64-bit labels (sorts), each
map is turned into segment positions with one table lookup per pixel and the (ground truth,
prediction) overlap table is one ``np.bincount``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.panoptic_ids import ID_LIMIT
from pipeline.errors import DataError

VOID = 0
MATCH_IOU = 0.5  # a match needs IoU strictly above this
IGNORED_SHARE = 0.5  # an unmatched prediction is forgiven above this share on VOID / own crowd
_SHOWN = 5  # how many offending ids an error message lists

Segment = Mapping[str, Any]


@dataclass(frozen=True)
class PanopticCategories:
    """The ground truth's categories: COCO ids, names and which are things, in one order."""

    ids: tuple[int, ...]
    names: tuple[str, ...]
    isthing: tuple[bool, ...]
    _index: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.ids)})

    @classmethod
    def from_json(cls, categories: Iterable[Mapping[str, Any]]) -> PanopticCategories:
        """From COCO panoptic ``categories`` (``id``, ``name``, ``isthing``)."""
        cats = list(categories)
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c.get("name", c["id"])) for c in cats),
                   tuple(bool(c.get("isthing", 1)) for c in cats))

    @classmethod
    def from_card(cls, card: Any) -> PanopticCategories:
        """From a ``DatasetCard``: its classes in index order."""
        return cls(tuple(c.id for c in card.classes), tuple(c.name for c in card.classes),
                   tuple(c.isthing for c in card.classes))

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, category_id: int) -> int | None:
        return self._index.get(int(category_id))


@dataclass
class PQGroup:
    """PQ, SQ, RQ (ratios in [0, 1]) averaged over ``n`` categories."""

    pq: float
    sq: float
    rq: float
    n: int


@dataclass
class PQResult:
    """Scores for all categories, things and stuff, and per category (COCO id -> (pq, sq, rq)),
    the latter only for categories with any TP, FP or FN."""

    all: PQGroup
    things: PQGroup
    stuff: PQGroup
    per_class: dict[int, tuple[float, float, float]]
    categories: PanopticCategories

    def named(self) -> dict[str, float]:
        """``PQ``, ``SQ``, ``RQ``, ``PQ_th`` ... ``RQ_st`` and ``PQ/<class>``, ``SQ/<class>``,
        ``RQ/<class>``; a group without categories (e.g. no stuff) is left out."""
        out: dict[str, float] = {}
        for suffix, g in (("", self.all), ("_th", self.things), ("_st", self.stuff)):
            if g.n:
                out.update({f"PQ{suffix}": g.pq, f"SQ{suffix}": g.sq, f"RQ{suffix}": g.rq})
        for cid, (pq, sq, rq) in self.per_class.items():
            pos = self.categories.position(cid)
            name = self.categories.names[pos] if pos is not None else str(cid)
            out.update({f"PQ/{name}": pq, f"SQ/{name}": sq, f"RQ/{name}": rq})
        return out

    def table(self) -> str:
        """panopticapi's summary table (percent)."""
        lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}", "-" * 38]
        for name, g in (("All", self.all), ("Things", self.things), ("Stuff", self.stuff)):
            lines.append(f"{name:10s}| {100 * g.pq:5.1f}  {100 * g.sq:5.1f}  {100 * g.rq:5.1f} {g.n:5d}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        groups = {k: vars(g) for k, g in (("All", self.all), ("Things", self.things), ("Stuff", self.stuff))}
        per_class = {}
        for cid, (pq, sq, rq) in self.per_class.items():
            pos = self.categories.position(cid)
            per_class[str(cid)] = {"name": self.categories.names[pos] if pos is not None else str(cid),
                                   "pq": pq, "sq": sq, "rq": rq}
        return {**groups, "per_class": per_class, "metrics": self.named()}


class PQStats:
    """Per-category sums over images: ``tp``, ``fp``, ``fn`` counts and ``iou`` (sum of the true
    positives' IoU), arrays in the order of ``categories``."""

    def __init__(self, num_categories: int) -> None:
        self.tp = np.zeros(num_categories, np.int64)
        self.fp = np.zeros(num_categories, np.int64)
        self.fn = np.zeros(num_categories, np.int64)
        self.iou = np.zeros(num_categories, np.float64)

    def __iadd__(self, other: PQStats) -> PQStats:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        return self

    def summarize(self, categories: PanopticCategories) -> PQResult:
        tp, fp, fn, iou = (a.astype(np.float64) for a in (self.tp, self.fp, self.fn, self.iou))
        seen = (tp + fp + fn) > 0
        denom = np.where(seen, tp + 0.5 * fp + 0.5 * fn, 1.0)
        pq = np.where(seen, iou / denom, 0.0)
        sq = np.where(tp > 0, iou / np.maximum(tp, 1.0), 0.0)
        rq = np.where(seen, tp / denom, 0.0)
        thing = np.asarray(categories.isthing, bool)

        def group(sel: np.ndarray) -> PQGroup:
            m = seen & sel
            n = int(m.sum())
            if n == 0:
                return PQGroup(0.0, 0.0, 0.0, 0)
            return PQGroup(float(pq[m].sum() / n), float(sq[m].sum() / n), float(rq[m].sum() / n), n)

        per_class = {categories.ids[i]: (float(pq[i]), float(sq[i]), float(rq[i]))
                     for i in np.flatnonzero(seen)}
        everything = np.ones_like(thing)
        return PQResult(group(everything), group(thing), group(~thing), per_class, categories)


def _segment_ids(segments: Sequence[Segment], where: str, what: str) -> np.ndarray:
    ids = np.fromiter((int(s["id"]) for s in segments), np.int64, len(segments))
    if len(np.unique(ids)) != len(ids):
        values, counts = np.unique(ids, return_counts=True)
        raise DataError(where, f"{what} segment id {int(values[counts > 1][0])} is listed more than "
                               "once in segments_info")
    if (ids == VOID).any():
        raise DataError(where, f"{what} segment id 0 is listed in segments_info, but 0 is VOID")
    return ids


_UNLISTED = np.iinfo(np.uint16).max
_local = threading.local()


def _id_lookup() -> np.ndarray:
    """This thread's id -> position table (``uint16`` over all 2^24 ids, 32 MiB, made once):
    ``_UNLISTED`` everywhere except while ``_positions`` uses it."""
    lut = getattr(_local, "lut", None)
    if lut is None:
        lut = _local.lut = np.full(ID_LIMIT, _UNLISTED, np.uint16)
        lut[VOID] = 0
    return lut


def _positions(id_map: np.ndarray, seg_ids: np.ndarray) -> np.ndarray:
    """Flat map of 0 (VOID), 1 + k (the pixel's id is ``seg_ids[k]``) or ``len + 1`` (unlisted).

    Ids below 2^24 (every RGB-encoded map) go through a lookup table, one gather per pixel; other
    maps through ``searchsorted`` on the sorted ids."""
    flat = id_map.reshape(-1)
    n = len(seg_ids)
    lo, hi = (int(flat.min()), int(flat.max())) if flat.size else (0, 0)
    if lo >= 0 and hi < ID_LIMIT and n < _UNLISTED - 1 and (n == 0 or int(seg_ids.max()) < ID_LIMIT):
        lut = _id_lookup()
        lut[seg_ids] = np.arange(1, n + 1, dtype=np.uint16)
        try:
            out = lut[flat]
        finally:
            lut[seg_ids] = _UNLISTED
        np.minimum(out, n + 1, out=out)
        return out.astype(np.intp)
    order = np.argsort(seg_ids, kind="stable")
    table = np.concatenate([[VOID], seg_ids[order]])  # VOID sorts first: ids are positive
    flat = flat.astype(np.int64)
    pos = np.searchsorted(table, flat)
    np.minimum(pos, n, out=pos)
    found = table[pos] == flat
    rank = np.empty(n + 2, np.intp)  # sorted position -> 1 + original position
    rank[0], rank[n + 1] = 0, n + 1
    rank[1:n + 1] = 1 + order
    return rank[np.where(found, pos, n + 1)]


def _categories_of(segments: Sequence[Segment], categories: PanopticCategories, where: str,
                   what: str) -> np.ndarray:
    pos = np.empty(len(segments), np.intp)
    for k, s in enumerate(segments):
        p = categories.position(int(s["category_id"]))
        if p is None:
            raise DataError(where, f"{what} segment {int(s['id'])} has category_id "
                                   f"{int(s['category_id'])}, which is not a ground-truth category")
        pos[k] = p
    return pos


def pq_image_stats(gt_ids: Any, gt_segments: Sequence[Segment], pred_ids: Any,
                   pred_segments: Sequence[Segment], categories: PanopticCategories, *,
                   where: str = "image", stats: PQStats | None = None) -> PQStats:
    """Add one image's TP/FP/FN/IoU per category to ``stats`` (a new one by default) and return it.

    ``gt_ids``, ``pred_ids``: ``HxW`` integer maps (numpy or torch), 0 = VOID. ``where`` names the
    image in error messages (a file name or ``"image_id 42"``)."""
    gt = np.asarray(gt_ids.cpu() if hasattr(gt_ids, "cpu") else gt_ids)
    pred = np.asarray(pred_ids.cpu() if hasattr(pred_ids, "cpu") else pred_ids)
    if gt.shape != pred.shape:
        raise DataError(where, f"prediction is {'x'.join(map(str, pred.shape))} (HxW) but the ground "
                               f"truth is {'x'.join(map(str, gt.shape))}")
    stats = stats if stats is not None else PQStats(len(categories))
    g_ids = _segment_ids(gt_segments, where, "ground-truth")
    p_ids = _segment_ids(pred_segments, where, "predicted")
    g_cat = _categories_of(gt_segments, categories, where, "ground-truth")
    p_cat = _categories_of(pred_segments, categories, where, "predicted")
    S, P = len(g_ids), len(p_ids)

    gi = _positions(gt, g_ids)
    pi = _positions(pred, p_ids)
    table = np.bincount(gi * (P + 2) + pi, minlength=(S + 2) * (P + 2)).reshape(S + 2, P + 2)
    if table[:, P + 1].any():
        flat = pred.reshape(-1)
        bad = np.unique(flat[pi == P + 1])[:_SHOWN].tolist()
        raise DataError(where, f"predicted segment id(s) {bad} are in the PNG but not in segments_info")
    pred_area = table[:, 1:P + 1].sum(axis=0)
    if (pred_area == 0).any():
        missing = p_ids[pred_area == 0][:_SHOWN].tolist()
        raise DataError(where, f"predicted segment id(s) {missing} are in segments_info but not in the PNG")
    gt_area = table[1:S + 1, :].sum(axis=1).astype(np.float64)
    for k, s in enumerate(gt_segments):
        if s.get("area") is not None:
            gt_area[k] = float(s["area"])
    crowd = np.fromiter((bool(s.get("iscrowd", 0)) for s in gt_segments), bool, S)

    inter = table[1:S + 1, 1:P + 1]
    on_void = table[0, 1:P + 1]
    gt_matched = np.zeros(S, bool)
    pred_matched = np.zeros(P, bool)
    if S and P:
        union = pred_area[None, :] + gt_area[:, None] - inter - on_void[None, :]
        candidate = (inter > 0) & (g_cat[:, None] == p_cat[None, :]) & ~crowd[:, None]
        iou = np.divide(inter, union, out=np.zeros(inter.shape), where=candidate)
        g, p = np.nonzero(candidate & (iou > MATCH_IOU))
        np.add.at(stats.tp, g_cat[g], 1)
        np.add.at(stats.iou, g_cat[g], iou[g, p])
        gt_matched[g] = True
        pred_matched[p] = True

    crowd_of: dict[int, int] = {}  # category position -> gt segment position of its crowd region
    for k in range(S):
        if gt_matched[k]:
            continue
        if crowd[k]:
            crowd_of[int(g_cat[k])] = k
        else:
            stats.fn[g_cat[k]] += 1
    for k in np.flatnonzero(~pred_matched):
        ignored = int(on_void[k])
        c = crowd_of.get(int(p_cat[k]))
        if c is not None:
            ignored += int(inter[c, k])
        if ignored / pred_area[k] > IGNORED_SHARE:
            continue
        stats.fp[p_cat[k]] += 1
    return stats
