"""Draw one sample with every label it has, side by side (``densepipe show-sample``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import viz
from pipeline.data.card import DatasetCard
from pipeline.errors import DataError
from pipeline.io import atomic_path
from pipeline.data.transforms import resize_sample
from pipeline.data.reader import open_dataset

__all__ = ["draw_sample", "show_sample"]


def _present_classes(sample: dict[str, Any], card: DatasetCard) -> list[int]:
    found: set[int] = set()
    if "semantic" in sample:
        found.update(int(v) for v in np.unique(viz._np(sample["semantic"])))
    if "instances" in sample:
        found.update(int(v) for v in viz._np(sample["instances"]["labels"]).tolist())
    if "panoptic" in sample:
        for s in sample["panoptic"]["segments"]:
            try:
                found.add(card.index_of_category(int(s["category_id"])))
            except KeyError:
                pass
    return sorted(i for i in found if 0 <= i < card.num_classes)


def draw_sample(sample: dict[str, Any], card: DatasetCard, *, ncols: int | None = None,
                min_size: int = 256) -> Image.Image:
    """One image: the sample's image and each label it has (semantic, instances with keypoints,
    panoptic, depth with a colour bar in metres, normals), titled, plus a legend of the class
    colours that occur (all classes when none occurs).

    Samples smaller than ``min_size`` are first upscaled by an integer factor (at most 4; labels
    nearest) so that boxes, keypoints and text stay legible."""
    H0, W0 = (int(v) for v in sample["image"].shape[-2:])
    if min_size and max(H0, W0) < min_size:
        f = min(4, math.ceil(min_size / max(H0, W0)))
        sample = resize_sample(sample, (H0 * f, W0 * f))
    image = viz.as_hwc_uint8(sample["image"])
    H, W = image.shape[:2]
    palette = card.palette()
    panels: list[tuple[str, Any]] = [(f"image {sample.get('file_name', '')}".strip(), image)]
    if "semantic" in sample:
        panels.append(("semantic", viz.colorize_labels(sample["semantic"], palette,
                                                       ignore=card.ignore_index)))
    if "instances" in sample:
        inst = sample["instances"]
        skeletons = {}
        for spec in card.keypoints:
            try:
                skeletons[card.index_of_category(spec.category_id)] = spec.skeleton
            except KeyError:
                continue
        n = len(inst["labels"])
        panels.append((f"instances ({n})", viz.draw_instances(
            image, inst["boxes"], inst["labels"], masks=inst.get("masks"),
            keypoints=inst.get("keypoints"), class_names=card.class_names, palette=palette,
            skeletons=skeletons, line_width=1 if max(H, W) < 256 else 2)))
    if "panoptic" in sample:
        pan = sample["panoptic"]
        cat_palette = {c.id: c.color for c in card.classes}
        panels.append((f"panoptic ({len(pan['segments'])} segments)",
                       viz.colorize_panoptic(pan["ids"], pan["segments"], cat_palette)))
    if "depth" in sample:
        d = viz._np(sample["depth"]).astype(np.float32)
        known = d[d > 0]
        lo, hi = (float(known.min()), float(known.max())) if known.size else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1e-3
        col = viz.colorize_depth(d, lo, hi)
        bar = viz.depth_colorbar(lo, hi, height=H)
        gap = np.full((H, 4, 3), 255, np.uint8)
        panels.append(("depth (m)", np.concatenate([col, gap, bar[:H]], axis=1)))
    if "normals" in sample:
        panels.append(("normals", viz.normals_to_rgb(sample["normals"])))
    grid = viz.panel_grid(panels, ncols=ncols or min(len(panels), 3))
    classes = _present_classes(sample, card) or list(range(card.num_classes))
    leg = viz.legend([card.class_names[i] for i in classes], [palette[i] for i in classes],
                     max_rows=max(8, grid.height // 16))
    out = Image.new("RGB", (grid.width + leg.width + 6, max(grid.height, leg.height)),
                    (255, 255, 255))
    out.paste(grid, (0, 0))
    out.paste(leg, (grid.width + 6, 6))
    return out


def show_sample(root: str | os.PathLike[str], split: str, index: int,
                out: str | os.PathLike[str]) -> Path:
    """Draw sample ``index`` of ``split`` of the dataset at ``root`` into ``out`` (atomically);
    returns ``out``. Raises ``DataError`` for an index out of range."""
    ds = open_dataset(root, split)
    if not 0 <= index < len(ds):
        raise DataError(root, f"sample index {index} out of range: split '{split}' has "
                              f"{len(ds)} samples (0..{len(ds) - 1})")
    img = draw_sample(ds[index], ds.card)
    out = Path(out)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(out.suffix.lower(), "PNG")
    with atomic_path(out) as tmp:
        img.save(tmp, format=fmt)
    return out
