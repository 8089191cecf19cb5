"""Drawing primitives (numpy + PIL only) shared by ``show-sample`` and the task plugins.

Images go in as ``HxWx3 uint8`` numpy arrays (a ``3xHxW`` torch tensor or PIL image is accepted
too) and come out as ``HxWx3 uint8`` arrays, except ``legend``/``panel_grid`` which build PIL
images. Colours are RGB tuples 0..255. Text uses PIL's default font.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

__all__ = [
    "as_hwc_uint8",
    "COLORMAPS",
    "colorize_depth",
    "colorize_labels",
    "colormap",
    "colorize_panoptic",
    "depth_colorbar",
    "draw_instances",
    "fallback_color",
    "legend",
    "normals_to_rgb",
    "overlay",
    "panel_grid",
    "turbo",
    "viridis",
]

_FONT: Any = None


def _font() -> Any:
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default()
    return _FONT


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=_font())
    return int(x1 - x0), int(y1 - y0)


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def as_hwc_uint8(image: Any) -> np.ndarray:
    """``HxWx3 uint8`` view of an image given as HxWx3 / 3xHxW array or tensor, or PIL image.

    Float images are taken as 0..1 when their maximum is <= 1, else 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = _np(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def fallback_color(i: int) -> RGB:
    """Deterministic, well-spread colour for index ``i`` (golden-ratio hue walk)."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _palette_array(palette: Sequence[Sequence[int]] | None, n: int) -> np.ndarray:
    pal = np.array([fallback_color(i) for i in range(n)], np.uint8)
    if palette:
        m = min(len(palette), n)
        pal[:m] = np.asarray(palette[:m], np.uint8).reshape(m, 3)
    return pal


def colorize_labels(label: Any, palette: Sequence[Sequence[int]] | None,
                    ignore: int = 255) -> np.ndarray:
    """Class-index map ``HxW`` -> ``HxWx3 uint8``; ``ignore`` pixels black; indices beyond the
    palette get fallback colours."""
    lab = _np(label).astype(np.int64)
    top = max(int(lab.max()) + 1 if lab.size else 1, len(palette or ()), ignore + 1)
    lut = _palette_array(palette, top)
    lut[ignore] = 0
    return lut[np.clip(lab, 0, top - 1)]


def overlay(image: Any, color_map: Any, alpha: float = 0.5, mask: Any = None) -> np.ndarray:
    """Blend ``color_map`` over ``image`` with opacity ``alpha`` (only where ``mask``, if given)."""
    img = as_hwc_uint8(image).astype(np.float32)
    col = as_hwc_uint8(color_map).astype(np.float32)
    out = img * (1 - alpha) + col * alpha
    if mask is not None:
        out = np.where(_np(mask).astype(bool)[..., None], out, img)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _instance_color(base: Sequence[int], k: int, amount: int = 48) -> RGB:
    """``base`` jittered deterministically by ``k`` (same k -> same colour)."""
    rng = np.random.default_rng(zlib.crc32(str(k).encode()))
    c = np.asarray(base, np.int64) + rng.integers(-amount, amount + 1, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def draw_instances(
    image: Any,
    boxes: Any,
    labels: Any,
    masks: Any = None,
    scores: Any = None,
    keypoints: Any = None,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    skeletons: Mapping[int, Sequence[Sequence[int]]] | None = None,
    *,
    mask_alpha: float = 0.45,
    line_width: int = 2,
) -> np.ndarray:
    """Draw instances on ``image``: tinted masks, boxes, ``"name score"`` labels, keypoints.

    ``boxes`` Nx4 xyxy, ``labels`` N class indices, ``masks`` NxHxW bool, ``scores`` N,
    ``keypoints`` NxKx3 (x, y, v): ``v >= 2`` visible (filled dot), ``0 < v < 2`` occluded (hollow
    ring), ``v <= 0`` not drawn. ``skeletons`` maps a class index to its 1-based keypoint pairs
    (COCO ``skeleton``); a limb is drawn when both ends are drawn (dashed-looking thin line if
    either is occluded)."""
    img = as_hwc_uint8(image).copy()
    b = _np(boxes).reshape(-1, 4).astype(np.float64)
    lab = _np(labels).reshape(-1).astype(np.int64)
    n = len(lab)
    top = max(int(lab.max()) + 1 if n else 1, len(palette or ()))
    pal = _palette_array(palette, top)
    colors = [_instance_color(pal[lab[i]], i, 40) for i in range(n)]
    if masks is not None and n:
        m = _np(masks).astype(bool)
        acc = img.astype(np.float32)
        for i in range(n):
            acc[m[i]] = acc[m[i]] * (1 - mask_alpha) + np.asarray(colors[i]) * mask_alpha
        img = np.clip(np.rint(acc), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    sc = _np(scores).reshape(-1) if scores is not None else None
    for i in range(n):
        x1, y1, x2, y2 = b[i]
        draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=colors[i],
                       width=line_width)
        name = (class_names[lab[i]] if class_names is not None and 0 <= lab[i] < len(class_names)
                else str(int(lab[i])))
        text = f"{name} {float(sc[i]):.2f}" if sc is not None else name
        tw, th = _text_size(draw, text)
        ty = y1 - th - 3 if y1 - th - 3 >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 3, ty + th + 3], fill=colors[i])
        lum = 0.299 * colors[i][0] + 0.587 * colors[i][1] + 0.114 * colors[i][2]
        draw.text((x1 + 2, ty + 1), text, fill=(0, 0, 0) if lum > 140 else (255, 255, 255),
                  font=_font())
    if keypoints is not None and n:
        kp = _np(keypoints).reshape(n, -1, 3).astype(np.float64)
        r = max(2, line_width + 1)
        for i in range(n):
            v = kp[i, :, 2]
            for a, c in (skeletons or {}).get(int(lab[i]), ()):
                a, c = int(a) - 1, int(c) - 1
                if 0 <= a < len(v) and 0 <= c < len(v) and v[a] > 0 and v[c] > 0:
                    both = v[a] >= 2 and v[c] >= 2
                    draw.line([tuple(kp[i, a, :2]), tuple(kp[i, c, :2])], fill=colors[i],
                              width=line_width if both else 1)
            for k in range(len(v)):
                if v[k] <= 0:
                    continue
                x, y = kp[i, k, :2]
                box = [x - r, y - r, x + r, y + r]
                if v[k] >= 2:
                    draw.ellipse(box, fill=colors[i], outline=(255, 255, 255))
                else:
                    draw.ellipse(box, fill=None, outline=colors[i], width=1)
    return np.asarray(pil)


# ------------------------------------------------------------------------------------------------
# depth
# ------------------------------------------------------------------------------------------------
# Google's Turbo colormap (A. Mikhailov, 2019, Apache-2.0): every 8th entry of its 256-entry
# table (plus the last), interpolated linearly.
_TURBO_AT = (*range(0, 256, 8), 255)
_TURBO = (
    (0.18995, 0.07176, 0.23217), (0.22500, 0.16354, 0.45096), (0.25107, 0.25237, 0.63374),
    (0.26816, 0.33825, 0.78050), (0.27628, 0.42118, 0.89123), (0.27543, 0.50115, 0.96594),
    (0.25862, 0.57958, 0.99876), (0.21382, 0.65886, 0.97959), (0.15844, 0.73551, 0.92305),
    (0.11167, 0.80569, 0.84525), (0.09267, 0.86554, 0.76230), (0.12014, 0.91193, 0.68660),
    (0.19659, 0.94901, 0.59466), (0.30513, 0.97697, 0.48987), (0.42778, 0.99419, 0.38575),
    (0.54658, 0.99907, 0.29581), (0.64362, 0.98999, 0.23356), (0.72596, 0.96470, 0.20640),
    (0.80473, 0.92452, 0.20459), (0.87530, 0.87267, 0.21555), (0.93301, 0.81236, 0.22667),
    (0.97323, 0.74682, 0.22536), (0.99314, 0.67408, 0.20348), (0.99593, 0.58703, 0.16899),
    (0.98360, 0.49291, 0.12849), (0.95801, 0.39958, 0.08831), (0.92105, 0.31489, 0.05475),
    (0.87422, 0.24526, 0.03297), (0.81608, 0.18462, 0.01809), (0.74617, 0.13098, 0.00851),
    (0.66449, 0.08436, 0.00424), (0.57103, 0.04474, 0.00529), (0.47960, 0.01583, 0.01055),
)
# Matplotlib's viridis (S. van der Walt, N. Smith, E. Firing, 2015, CC0): perceptually uniform
# (lightness rises linearly), readable in grey and by colour-blind viewers; the same sampling.
_VIRIDIS = (
    (0.26700, 0.00487, 0.32942), (0.27702, 0.05034, 0.37572), (0.28233, 0.09495, 0.41733),
    (0.28288, 0.13592, 0.45343), (0.27883, 0.17549, 0.48340), (0.27059, 0.21407, 0.50705),
    (0.25897, 0.25154, 0.52474), (0.24497, 0.28768, 0.53726), (0.22974, 0.32236, 0.54571),
    (0.21430, 0.35562, 0.55118), (0.19943, 0.38761, 0.55464), (0.18556, 0.41857, 0.55675),
    (0.17272, 0.44879, 0.55788), (0.16067, 0.47854, 0.55812), (0.14904, 0.50805, 0.55725),
    (0.13777, 0.53749, 0.55491), (0.12757, 0.56695, 0.55056), (0.12057, 0.59642, 0.54361),
    (0.12064, 0.62583, 0.53349), (0.13227, 0.65501, 0.51966), (0.15785, 0.68376, 0.50169),
    (0.19657, 0.71183, 0.47922), (0.24607, 0.73891, 0.45202), (0.30415, 0.76470, 0.41994),
    (0.36921, 0.78889, 0.38291), (0.44014, 0.81114, 0.34097), (0.51599, 0.83116, 0.29428),
    (0.59584, 0.84872, 0.24333), (0.67849, 0.86374, 0.18950), (0.76237, 0.87642, 0.13706),
    (0.84556, 0.88732, 0.09970), (0.92611, 0.89733, 0.10407), (0.99325, 0.90616, 0.14394),
)
_LUTS: dict[str, np.ndarray] = {}


def _lut(name: str, table: Sequence[Sequence[float]]) -> np.ndarray:
    """256x3 uint8 lookup table interpolated linearly from anchors at ``_TURBO_AT``."""
    if name not in _LUTS:
        pos = np.asarray(_TURBO_AT, np.float64)
        tab = np.asarray(table, np.float64)
        grid = np.arange(256, dtype=np.float64)
        lut = np.stack([np.interp(grid, pos, tab[:, c]) for c in range(3)], axis=1)
        _LUTS[name] = np.clip(np.rint(lut * 255.0), 0, 255).astype(np.uint8)
    return _LUTS[name]


def _apply(lut: np.ndarray, x: Any) -> np.ndarray:
    t = np.nan_to_num(np.asarray(x, np.float64), nan=0.0)
    return lut[np.rint(np.clip(t, 0.0, 1.0) * 255.0).astype(np.int64)]


def turbo(x: Any) -> np.ndarray:
    """Turbo colormap of values in [0, 1] (clipped; NaN -> 0) -> ``...x3 uint8``."""
    return _apply(_lut("turbo", _TURBO), x)


def viridis(x: Any) -> np.ndarray:
    """Viridis colormap of values in [0, 1] (clipped; NaN -> 0) -> ``...x3 uint8``: dark purple
    (0) -> teal -> yellow (1), lightness increasing monotonically."""
    return _apply(_lut("viridis", _VIRIDIS), x)


COLORMAPS: dict[str, Callable[[Any], np.ndarray]] = {"viridis": viridis, "turbo": turbo}
"""Colormaps by name for ``colorize_depth`` / ``depth_colorbar``."""

Colormap = str | Callable[[Any], np.ndarray]


def colormap(cmap: Colormap) -> Callable[[Any], np.ndarray]:
    """The colormap function ``cmap`` names (``COLORMAPS``), or ``cmap`` itself if callable."""
    if callable(cmap):
        return cmap
    if cmap not in COLORMAPS:
        raise ValueError(f"cmap: expected one of {', '.join(COLORMAPS)} or a function, got {cmap!r}")
    return COLORMAPS[cmap]


def _depth_range(d: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    known = d[d > 0]
    lo = float(vmin) if vmin is not None else (float(known.min()) if known.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(known.max()) if known.size else 1.0)
    if hi <= lo:
        hi = lo + 1e-3
    return lo, hi


def colorize_depth(depth: Any, vmin: float | None = None, vmax: float | None = None, *,
                   cmap: Colormap = "viridis") -> np.ndarray:
    """Depth ``HxW`` (metres, 0 = unknown) -> ``HxWx3 uint8`` with ``cmap`` (viridis: near dark
    purple, far yellow; ``"turbo"``: near blue, far red); unknown pixels black. The range defaults
    to the known pixels' min/max."""
    d = _np(depth).astype(np.float32)
    lo, hi = _depth_range(d, vmin, vmax)
    out = colormap(cmap)((d - lo) / (hi - lo))
    out[~(d > 0)] = 0
    return out


def depth_colorbar(vmin: float, vmax: float, height: int = 128, width: int = 14,
                   ticks: int = 5, *, cmap: Colormap = "viridis") -> np.ndarray:
    """Vertical colour bar for ``colorize_depth`` with the same ``cmap`` (``vmin`` at the bottom),
    labelled in metres: ``height x (width + label margin) x 3 uint8``, white background."""
    height = max(int(height), 24)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [f"{vmin + (vmax - vmin) * i / max(ticks - 1, 1):.2f} m" for i in range(ticks)]
    tw = max(_text_size(probe, s)[0] for s in labels)
    th = max(_text_size(probe, s)[1] for s in labels)
    pad = th // 2 + 2
    canvas = Image.new("RGB", (width + 6 + tw + 2, height), (255, 255, 255))
    bar_h = height - 2 * pad
    ramp = colormap(cmap)(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(width, axis=1)
    canvas.paste(Image.fromarray(ramp), (0, pad))
    draw = ImageDraw.Draw(canvas)
    for i, s in enumerate(labels):
        y = pad + round((bar_h - 1) * (1 - i / max(ticks - 1, 1)))
        draw.line([(width, y), (width + 3, y)], fill=(0, 0, 0))
        draw.text((width + 5, y - th // 2 - 1), s, fill=(0, 0, 0), font=_font())
    return np.asarray(canvas)


# ------------------------------------------------------------------------------------------------
# normals, panoptic
# ------------------------------------------------------------------------------------------------
def normals_to_rgb(normals: Any) -> np.ndarray:
    """Normals ``3xHxW`` (unit vectors, 0 = unknown) -> ``HxWx3 uint8`` as (n + 1) / 2;
    unknown pixels black."""
    n = _np(normals).astype(np.float32)
    known = np.abs(n).sum(axis=0) > 0
    rgb = np.clip(np.rint((n.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    rgb[~known] = 0
    return rgb


def colorize_panoptic(ids: Any, segments: Sequence[Mapping[str, Any]],
                      palette: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
                      *, boundaries: bool = True) -> np.ndarray:
    """Panoptic id map ``HxW`` -> ``HxWx3 uint8``: each segment its class colour jittered by its
    id (things; stuff keeps the class colour), void (0 / unlisted ids) black, optional dark
    boundaries between segments.

    ``palette`` maps ``category_id`` -> colour (a dict, e.g. ``{c.id: c.color for c in
    card.classes}``); a sequence is indexed by the segment's ``label`` (class index) if present,
    else by ``category_id``."""
    seg_ids = _np(ids).astype(np.int64)
    out = np.zeros((*seg_ids.shape, 3), np.uint8)
    for s in segments:
        key = int(s.get("label", s["category_id"])) if not isinstance(palette, Mapping) \
            else int(s["category_id"])
        if isinstance(palette, Mapping):
            base = palette.get(key, fallback_color(key))
        else:
            base = palette[key] if 0 <= key < len(palette) else fallback_color(key)
        color = _instance_color(base, int(s["id"])) if s.get("isthing", True) else tuple(base)
        out[seg_ids == int(s["id"])] = color
    if boundaries:
        edge = np.zeros(seg_ids.shape, bool)
        edge[:, 1:] |= seg_ids[:, 1:] != seg_ids[:, :-1]
        edge[1:, :] |= seg_ids[1:, :] != seg_ids[:-1, :]
        out[edge] = (out[edge] * 0.4).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------------
def legend(names: Sequence[str], colors: Sequence[Sequence[int]], *, max_rows: int = 20,
           swatch: int = 12) -> Image.Image:
    """Colour swatch + name per entry, in columns of at most ``max_rows`` rows."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    n = len(names)
    if n == 0:
        return Image.new("RGB", (1, 1), (255, 255, 255))
    th = max(max(_text_size(probe, s)[1] for s in names), swatch)
    tw = max(_text_size(probe, s)[0] for s in names)
    row_h, col_w = th + 4, swatch + 6 + tw + 12
    rows = min(n, max_rows)
    cols = (n + rows - 1) // rows
    img = Image.new("RGB", (cols * col_w + 4, rows * row_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (name, c) in enumerate(zip(names, colors, strict=False)):
        x, y = 4 + (i // rows) * col_w, 4 + (i % rows) * row_h
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(v) for v in c),
                       outline=(0, 0, 0))
        draw.text((x + swatch + 5, y), name, fill=(0, 0, 0), font=_font())
    return img


def panel_grid(panels: Sequence[tuple[str, Any]], ncols: int | None = None, *,
               pad: int = 6, background: RGB = (255, 255, 255)) -> Image.Image:
    """Lay ``(title, image)`` panels out in a grid of ``ncols`` columns, a title above each.

    Images may differ in size (each cell is as large as the largest panel)."""
    if not panels:
        return Image.new("RGB", (1, 1), background)
    ims = [Image.fromarray(as_hwc_uint8(p)) for _, p in panels]
    ncols = max(1, min(ncols or len(ims), len(ims)))
    nrows = (len(ims) + ncols - 1) // ncols
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    th = max(_text_size(probe, t or " ")[1] for t, _ in panels) + 4
    cw = max(max(i.width for i in ims), max(_text_size(probe, t)[0] for t, _ in panels))
    ch = max(i.height for i in ims)
    W = ncols * (cw + pad) + pad
    H = nrows * (ch + th + pad) + pad
    canvas = Image.new("RGB", (W, H), background)
    draw = ImageDraw.Draw(canvas)
    for k, ((title, _), im) in enumerate(zip(panels, ims, strict=True)):
        r, c = divmod(k, ncols)
        x, y = pad + c * (cw + pad), pad + r * (ch + th + pad)
        draw.text((x, y), title, fill=(0, 0, 0), font=_font())
        canvas.paste(im, (x, y + th))
    return canvas


def with_legend(image: Any, names: Sequence[str], colors: Sequence[Sequence[int]]) -> np.ndarray:
    """``image`` (HxWx3) with a legend of ``names``/``colors`` to its right, on white."""
    img = as_hwc_uint8(image)
    key = np.asarray(legend(names, colors, max_rows=max(1, img.shape[0] // 16)))
    h = max(img.shape[0], key.shape[0])
    out = np.full((h, img.shape[1] + key.shape[1], 3), 255, dtype=np.uint8)
    out[: img.shape[0], : img.shape[1]] = img
    out[: key.shape[0], img.shape[1]:] = key
    return out
