"""Predictions as COCO results: RLE masks, ``[x, y, w, h]`` boxes, flat keypoint lists.

Inputs may be torch tensors (any device) or numpy arrays. Boxes are ``xyxy`` in continuous pixel
coordinates of the image's original size; masks are NxHxW at that size. Everything returned is plain
Python (``int``/``float``/``str``), ready for ``json.dump`` and for pycocotools' ``loadRes``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def _numpy(x: Any) -> np.ndarray:
    """A numpy view of a torch tensor (detached, on the CPU) or anything array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def masks_to_rle(masks: Any) -> list[dict[str, Any]]:
    """Encode NxHxW masks (bool, or integer with nonzero = inside) as compressed RLE.

    Returns one ``{"size": [H, W], "counts": str}`` per mask (``counts`` decoded from pycocotools'
    bytes, so the dicts are JSON-serialisable). Float masks are refused: threshold them first.
    """
    arr = _numpy(masks)
    if arr.ndim != 3:
        raise ValueError(f"masks must be NxHxW, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biu":
        raise ValueError(f"masks must be bool or integer (threshold soft masks first), got {arr.dtype}")
    if arr.shape[0] == 0:
        return []
    fortran = np.asfortranarray((arr != 0).transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(fortran)
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}
            for r in rles]


def rle_to_masks(rles: Sequence[Any], height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode COCO segmentations to a bool NxHxW array (inverse of :func:`masks_to_rle`).

    Each item is an RLE dict (``counts`` as ``str``, ``bytes`` or an uncompressed list of run
    lengths) or a polygon list ``[[x1, y1, x2, y2, ...], ...]``; polygons and uncompressed RLE need
    ``height`` and ``width``. All masks must have the same size; an empty input gives shape
    ``(0, height or 0, width or 0)``.
    """
    masks = []
    with warnings.catch_warnings():  # pycocotools' decode trips numpy 2's __array__(copy=) deprecation
        warnings.filterwarnings("ignore", message=".*__array__ implementation", category=DeprecationWarning)
        for i, seg in enumerate(rles):
            rle = to_compressed_rle(seg, height, width, what=f"segmentation {i}")
            masks.append(mask_utils.decode(rle).astype(bool))
    if not masks:
        return np.zeros((0, height or 0, width or 0), dtype=bool)
    sizes = {m.shape for m in masks}
    if len(sizes) > 1:
        raise ValueError(f"segmentations have different sizes {sorted(sizes)}; expected one size")
    return np.stack(masks)


def to_compressed_rle(seg: Any, height: int | None, width: int | None, *, what: str = "segmentation"
                      ) -> dict[str, Any]:
    """One segmentation (RLE dict or polygon list) as a compressed RLE dict pycocotools accepts."""
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if counts is None or size is None:
            raise ValueError(f"{what}: an RLE needs 'counts' and 'size', got keys {sorted(seg)}")
        if isinstance(counts, list):  # uncompressed RLE
            return mask_utils.frPyObjects(seg, int(size[0]), int(size[1]))
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        return {"size": [int(size[0]), int(size[1])], "counts": counts}
    if isinstance(seg, list):
        if height is None or width is None:
            raise ValueError(f"{what}: a polygon needs the image height and width")
        polygons = [[float(v) for v in poly] for poly in seg]
        bad = [len(p) for p in polygons if len(p) < 6 or len(p) % 2]
        if not polygons or bad:
            raise ValueError(f"{what}: expected polygons of an even number (at least 6) of coordinates, "
                             f"got lengths {[len(p) for p in polygons]}")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, int(height), int(width)))
    raise ValueError(f"{what}: expected an RLE dict or a list of polygons, got {type(seg).__name__}")


def xyxy_to_xywh(boxes: Any) -> list[list[float]]:
    """Nx4 ``[x1, y1, x2, y2]`` boxes as COCO ``[x, y, width, height]`` lists of floats."""
    arr = _numpy(boxes).astype(np.float64)
    if arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must be Nx4 (x1, y1, x2, y2), got shape {tuple(arr.shape)}")
    xywh = np.concatenate([arr[:, :2], arr[:, 2:] - arr[:, :2]], axis=1)
    return xywh.tolist()


def detections_to_results(
    image_id: int,
    *,
    boxes: Any,
    scores: Any,
    category_ids: Any,
    masks: Any = None,
    keypoints: Any = None,
) -> list[dict[str, Any]]:
    """One COCO result dict per detection of one image.

    Each has ``image_id``, ``category_id`` (int), ``bbox`` ``[x, y, w, h]`` (from ``xyxy``) and
    ``score``; plus ``segmentation`` (compressed RLE, ``str`` counts) when ``masks`` (NxHxW, at the
    image's original size) are given and ``keypoints`` ``[x1, y1, s1, x2, ...]`` when ``keypoints``
    (NxKx3: x, y, score) are given. Category ids are COCO ``category_id`` values, not class indices.
    """
    bbox = xyxy_to_xywh(boxes)
    score = _numpy(scores).astype(np.float64).reshape(-1).tolist()
    cats = _numpy(category_ids).reshape(-1)
    if cats.dtype.kind == "f" and not np.all(cats == np.round(cats)):
        raise ValueError(f"category_ids must be integers, got {cats.tolist()}")
    cat = cats.astype(np.int64).tolist()
    n = len(bbox)
    if len(score) != n or len(cat) != n:
        raise ValueError(f"{n} boxes but {len(score)} scores and {len(cat)} category ids")
    segs = None
    if masks is not None:
        segs = masks_to_rle(masks)
        if len(segs) != n:
            raise ValueError(f"{n} boxes but {len(segs)} masks")
    kps = None
    if keypoints is not None:
        kp = _numpy(keypoints).astype(np.float64)
        if kp.size == 0 and n == 0:
            kp = kp.reshape(0, 0, 3)
        if kp.ndim != 3 or kp.shape[0] != n or kp.shape[2] != 3:
            raise ValueError(f"keypoints must be NxKx3 (x, y, score) with N={n}, got shape {tuple(kp.shape)}")
        kps = kp.reshape(n, kp.shape[1] * 3).tolist()
    results = []
    for i in range(n):
        r: dict[str, Any] = {"image_id": int(image_id), "category_id": cat[i], "bbox": bbox[i],
                             "score": score[i]}
        if segs is not None:
            r["segmentation"] = segs[i]
        if kps is not None:
            r["keypoints"] = kps[i]
        results.append(r)
    return results


__all__ = ["detections_to_results", "masks_to_rle", "rle_to_masks", "to_compressed_rle", "xyxy_to_xywh"]
