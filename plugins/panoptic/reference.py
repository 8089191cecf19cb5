"""A straightforward per-image PQ implementation: the baseline that ``plugins.panoptic.metrics`` is
checked and timed against (tests and ``benchmarks/panoptic_speed.py``).

It follows panopticapi's steps one by one on plain dictionaries: ``np.unique`` over each map for the
areas, ``np.unique`` over ``gt * 2^24 + pred`` for every overlap, then Python loops for matching,
false negatives and false positives. Same rules as the fast path (see that module); it does no input
checking beyond what the algorithm itself needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from plugins.panoptic.metrics import IGNORED_SHARE, MATCH_IOU, VOID, PanopticCategories, PQStats

OFFSET = 256 * 256 * 256  # larger than any 24-bit RGB-encoded segment id


def reference_image_stats(gt_ids: np.ndarray, gt_segments: Sequence[Mapping[str, Any]],
                          pred_ids: np.ndarray, pred_segments: Sequence[Mapping[str, Any]],
                          categories: PanopticCategories, stats: PQStats | None = None) -> PQStats:
    """One image's counts, added to ``stats`` (see ``pq_image_stats`` for the arguments)."""
    stats = stats if stats is not None else PQStats(len(categories))
    gt_info = {int(s["id"]): dict(s) for s in gt_segments}
    pred_info = {int(s["id"]): dict(s) for s in pred_segments}
    for label, count in zip(*np.unique(pred_ids, return_counts=True), strict=True):
        if int(label) in pred_info:
            pred_info[int(label)]["area"] = int(count)
    gt_counts = dict(zip(*np.unique(gt_ids, return_counts=True), strict=True))
    for label, info in gt_info.items():
        if info.get("area") is None:
            info["area"] = int(gt_counts.get(label, 0))

    combined = gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64)
    overlap: dict[tuple[int, int], int] = {}
    for label, count in zip(*np.unique(combined, return_counts=True), strict=True):
        overlap[(int(label) // OFFSET, int(label) % OFFSET)] = int(count)

    def cat(category_id: int) -> int:
        pos = categories.position(category_id)
        assert pos is not None
        return pos

    gt_hit: set[int] = set()
    pred_hit: set[int] = set()
    for (g, p), inter in overlap.items():
        if g not in gt_info or p not in pred_info:
            continue
        gs, ps = gt_info[g], pred_info[p]
        if gs.get("iscrowd", 0) or gs["category_id"] != ps["category_id"]:
            continue
        union = ps["area"] + gs["area"] - inter - overlap.get((VOID, p), 0)
        iou = inter / union
        if iou > MATCH_IOU:
            stats.tp[cat(gs["category_id"])] += 1
            stats.iou[cat(gs["category_id"])] += iou
            gt_hit.add(g)
            pred_hit.add(p)

    crowd_region: dict[int, int] = {}
    for g, gs in gt_info.items():
        if g in gt_hit:
            continue
        if gs.get("iscrowd", 0):
            crowd_region[gs["category_id"]] = g
            continue
        stats.fn[cat(gs["category_id"])] += 1
    for p, ps in pred_info.items():
        if p in pred_hit:
            continue
        ignored = overlap.get((VOID, p), 0)
        if ps["category_id"] in crowd_region:
            ignored += overlap.get((crowd_region[ps["category_id"]], p), 0)
        if ignored / ps["area"] > IGNORED_SHARE:
            continue
        stats.fp[cat(ps["category_id"])] += 1
    return stats
