"""The Panoptic FPN combination heuristic (Kirillov et al., "Panoptic Feature Pyramid Networks",
2019): one panoptic map from a semantic map and instance detections."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def combine_semantic_and_instances(
    semantic: Tensor,
    masks: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    stuff_classes: Sequence[int],
    overlap_threshold: float = 0.5,
    stuff_area_limit: int = 4096,
    score_threshold: float = 0.5,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Panoptic map from semantic and instance outputs of one image. Pure: no state, no I/O.

    Args:
        semantic: ``HxW`` integer class indices (the semantic task's prediction).
        masks: ``NxHxW`` bool instance masks at the same size; ``scores`` ``N`` floats and ``labels``
            ``N`` class indices (the instance task's prediction).
        stuff_classes: class indices that are stuff; only these are taken from ``semantic``.
        overlap_threshold: an instance is dropped when more than this share of its mask lies on
            segments already placed (or all of it); otherwise only its free pixels are placed.
        stuff_area_limit: a stuff class whose free pixels number fewer than this becomes VOID.
        score_threshold: instances scoring below this are not placed.

    Steps: instances by descending score (ties keep their order), each kept one a new segment;
    then each stuff class of ``semantic`` in ascending class order fills the pixels still free.
    Pixels left over (thing classes of ``semantic`` not covered by an instance, small stuff) are 0.

    Returns:
        ``ids`` ``HxW`` int64 segment ids (0 = VOID, segments numbered 1, 2, ... in placement order)
        and one dict per segment: ``id``, ``label`` (class index), ``isthing``, ``area`` (pixels),
        and for things ``score`` and ``instance`` (the index into the inputs).
    """
    if semantic.dim() != 2:
        raise ValueError(f"semantic must be HxW, got {tuple(semantic.shape)}")
    if masks.dim() != 3 or masks.shape[1:] != semantic.shape:
        raise ValueError(f"masks must be Nx{semantic.shape[0]}x{semantic.shape[1]}, got {tuple(masks.shape)}")
    if not len(scores) == len(labels) == len(masks):
        raise ValueError(f"{len(masks)} masks, {len(scores)} scores and {len(labels)} labels")
    ids = torch.zeros(semantic.shape, dtype=torch.int64, device=semantic.device)
    segments: list[dict[str, Any]] = []
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    for k in order:
        score = float(scores[k])
        if score < score_threshold:
            break
        mask = masks[k].to(torch.bool)
        area = int(mask.sum())
        if area == 0:
            continue
        taken = mask & (ids > 0)
        overlap = int(taken.sum())
        if overlap / area > overlap_threshold or overlap == area:  # nothing (enough) left to place
            continue
        if overlap:
            mask = mask & ~taken
        sid = len(segments) + 1
        ids[mask] = sid
        segments.append({"id": sid, "label": int(labels[k]), "isthing": True, "score": score,
                         "instance": k, "area": area - overlap})
    free = ids == 0
    present = set(torch.unique(semantic).tolist())
    for c in sorted({int(c) for c in stuff_classes} & present):
        region = (semantic == c) & free
        area = int(region.sum())
        if area == 0 or area < stuff_area_limit:
            continue
        sid = len(segments) + 1
        ids[region] = sid
        segments.append({"id": sid, "label": c, "isthing": False, "area": area})
    return ids, segments
