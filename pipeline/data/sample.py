"""The sample contract: one image and whichever labels exist for it.

A sample is a plain dict (torch tensors, CHW):

- ``image``: uint8 3xHxW, RGB.
- ``image_id``: int (the COCO image id), ``file_name``: str, ``meta``: ``{"orig_size": (H, W)}``.
- ``semantic``: int64 HxW class indices of the dataset card, ``IGNORE_INDEX`` (255) = ignore.
- ``instances``: dict with ``boxes`` float32 Nx4 (x1, y1, x2, y2 in pixels, of the visible part),
  ``labels`` int64 N (class indices of the card, same space as ``semantic``), ``masks`` bool NxHxW,
  ``iscrowd`` bool N, ``ids`` int64 N (annotation ids), optional ``keypoints`` float32 NxKx3
  (x, y, visibility with COCO's 0 = not labelled/outside, 1 = occluded, 2 = visible; rows of an
  instance whose category has no keypoints are all zero).
- ``panoptic``: dict with ``ids`` int64 HxW segment ids (0 = void) and ``segments``: list of
  ``{"id", "category_id", "isthing", "iscrowd"}`` dicts.
- ``depth``: float32 HxW metres, 0 = unknown.
- ``normals``: float32 3xHxW camera-frame unit vectors (x right, y down, z forward: OpenCV), 0 = unknown.
- any dense label kind a plugin registers (``pipeline.data.label_kinds``): its ``dtype``, HxW or
  CxHxW, its ``unknown`` value = unknown.

Coordinates are COCO's continuous ones: pixel ``i`` spans ``[i, i + 1)``; a horizontal flip maps
``x -> W - x``.

A label kind missing for a sample is a missing key, never an error; so is one the dataset was
not asked to load (``label_kinds=`` of ``CocoDataset``/``open_dataset``: the loaders pass the
enabled tasks' ``Task.requires``), so a task sees the same thing either way. Batches (``collate``) stack
``image`` and the dense maps, keep ``instances``/``panoptic`` as lists (``None`` where missing),
carry ``image_ids``, ``file_names``, ``meta`` as lists, and ``has``: a dict
``{label kind: bool tensor B}`` telling which samples have which labels (a missing dense map is
filled with its "unknown" value: 255, 0, 0).

``DENSE_KEYS``, ``LABEL_KEYS`` and ``UNKNOWN_VALUE`` are views of the label-kind registry
(``pipeline.data.label_kinds``): they include the dense kinds plugins register.
"""

from __future__ import annotations

from pipeline.data.card import IGNORE_INDEX
from pipeline.data.label_kinds import DENSE_KINDS, KindsView, UnknownValues, label_kinds

DENSE_KEYS = DENSE_KINDS
"""The registered dense kinds (semantic, depth, normals, then the plugins')."""
LABEL_KEYS = KindsView(lambda: tuple(k for k in label_kinds() if k != "keypoints"),
                       "Sample keys that hold labels (keypoints ride inside instances).")
UNKNOWN_VALUE = UnknownValues()
"""Value that means "unknown" in each dense map; used to fill samples that lack the map."""

__all__ = ["DENSE_KEYS", "IGNORE_INDEX", "LABEL_KEYS", "UNKNOWN_VALUE"]
