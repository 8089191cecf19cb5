"""The ``panoptic`` task's drawing: a panoptic prediction over its image, from the core's
primitives (``pipeline.viz``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.viz import _font, _np, _text_size, colorize_panoptic, overlay


def _label_point(mask: np.ndarray) -> tuple[int, int]:
    """A pixel of ``mask`` near its centre of mass (the centre itself when it lies inside)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[k]), int(ys[k])


def draw_panoptic(image: Any, ids: Any, segments: Sequence[Mapping[str, Any]], card: Any, *,
                  alpha: float = 0.6) -> np.ndarray:
    """A panoptic prediction over ``image``: every segment in its own colour (``colorize_panoptic``:
    things jittered per segment, stuff in the class colour, VOID left as the image) and its class
    name written at a pixel inside it."""
    seg_ids = _np(ids).astype(np.int64)
    palette = {c.id: c.color for c in card.classes}
    colors = colorize_panoptic(seg_ids, segments, palette)
    pil = Image.fromarray(overlay(image, colors, alpha, mask=seg_ids > 0))
    draw = ImageDraw.Draw(pil)
    for s in segments:
        mask = seg_ids == int(s["id"])
        if not mask.any():
            continue
        x, y = _label_point(mask)
        pos = card.index_of_category(int(s["category_id"])) if "label" not in s else int(s["label"])
        text = card.class_names[pos]
        tw, th = _text_size(draw, text)
        x0 = min(max(x - tw // 2, 0), max(pil.width - tw - 2, 0))
        y0 = min(max(y - th // 2, 0), max(pil.height - th - 2, 0))
        draw.rectangle([x0, y0, x0 + tw + 2, y0 + th + 2], fill=(0, 0, 0))
        draw.text((x0 + 1, y0), text, fill=(255, 255, 255), font=_font())
    return np.asarray(pil)
