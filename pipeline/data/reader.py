"""COCO-format dataset reader: one image plus whichever labels exist -> the sample dict.

``CocoDataset`` reads the formats users already have (see ``pipeline.data.sample`` for the
sample contract it returns):

- images: any PIL-readable file (PNG, JPEG), converted to RGB (``read_image``: 16-bit and
  float grayscale scaled to 8 bit, not clipped) and turned upright by its EXIF orientation, as
  COCO tools do (a phone photo stored 375x500 with orientation 6 is read 500x375, the size its
  JSON ``height``/``width`` give);
- instances (+ keypoints): COCO instances JSON, segmentation as polygons, uncompressed or
  compressed RLE (a missing ``segmentation`` falls back to the filled box). Invalid polygons
  (fewer than 3 points, an odd number of coordinates, zero area) are dropped, and so is an
  annotation left without a valid polygon, as detectron2's ``load_coco_json`` does; one warning
  per dataset says how many, and ``CocoDataset.dropped_annotations`` / ``dropped_polygons``
  count them;
- keypoints may also come from a separate COCO person-keypoints JSON; its annotations are merged
  into the instances by annotation id (COCO 2017 uses the same ids in both files);
- panoptic: COCO panoptic JSON + RGB PNGs (segment id = R + 256 G + 256^2 B);
- semantic: uint8 PNGs sharing the image's file stem, read by ``semantic_values``
  (``SEMANTIC_VALUES``; ``data.options.semantic_values`` of the ``folder`` format): ``index``
  (default) stores the class *index*, i.e. the position in the card's ``classes`` (0..C-1 of the
  card's C classes); ``category_id`` stores the class ``id`` of the card (as VOC-style tools write
  PNGs), mapped to its index. The card's ignore value (255) is ignore in both; any other value is
  a ``DataError`` naming the file. Without them, a split with panoptic labels gets ``semantic``
  derived from the panoptic map (segment category -> class index, void and crowd -> 255);
- depth: files sharing the image's file stem, decoded by ``depth_encoding`` (``DEPTH_ENCODINGS``;
  ``data.options.depth_encoding``) to float32 metres, 0 = unknown: ``mm`` (default) uint16 PNGs
  in millimetres; ``kitti`` uint16 PNGs in metres x 256 (the KITTI depth benchmark's); ``float``
  32-bit float TIFFs (PIL mode F) or ``.npy`` float arrays in metres, non-finite or <= 0 unknown
  (see ``read_depth``);
- normals: RGB PNGs (8 or 16 bit) encoding (n + 1) / 2; (0, 0, 0) = unknown -> vector 0;
- any dense label kind a plugin registers (``pipeline.data.label_kinds``): the files of
  ``<kind>/<split>/`` sharing the image's file stem, read by the kind's ``decode`` (semantic,
  depth and normals are such kinds too: their decoders are the functions below).

Construction parses every JSON once, indexes annotations per image and validates them (raising a
one-line ``DataError`` naming the file); pixels (images, masks, label PNGs) are decoded lazily per
sample, and only for the label kinds asked for (``label_kinds=``: the union of the enabled tasks'
``Task.requires``; default all): a kind not asked for is never read from disk and is absent from
the sample exactly as a kind the split lacks. A label kind the split lacks is a missing key of
the sample, never an error; so is a semantic/depth/normals PNG missing for one image. Samples
are ordered by image id.

Coordinates are COCO's continuous pixel coordinates: pixel ``i`` spans ``[i, i + 1)``, its centre
is ``i + 0.5``; boxes (xyxy) and keypoints are read from the JSON unchanged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.data.card import IGNORE_INDEX, DatasetCard, KeypointSpec
from pipeline.data.formats import LABEL_KINDS, image_hw, image_ids_of, wanted_label_kinds
from pipeline.data.label_kinds import DenseLabelKind, dense_kind, dense_kinds, ordered
from pipeline.data.panoptic_ids import rgb_to_ids
from pipeline.data.split_dataset import SampleDataset
from pipeline.errors import DataError
from torchvision.io import ImageReadMode, decode_png
from pycocotools import mask as mask_utils
from pycocotools import mask as mask_utils
import mmap

DEPTH_ENCODINGS = ("mm", "kitti", "float")
"""How depth files store metres (``read_depth``): uint16 PNG millimetres (default), uint16 PNG
metres x 256 (KITTI), 32-bit float TIFF or ``.npy`` metres."""
SEMANTIC_VALUES = ("index", "category_id")
"""What a semantic PNG value is (``semantic_classes``): the class index (position in the card,
default) or the class ``id`` of the card."""
# depth files per encoding, in the order a stem is matched (first found wins); a PNG under
# ``float`` is matched so that it is refused by name instead of silently missing
_DEPTH_SUFFIXES = {"mm": (".png",), "kitti": (".png",), "float": (".tiff", ".tif", ".npy", ".png")}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
BOX_TOLERANCE = 1.0  # pixels a COCO box may stick out of its image
MIN_POLYGON_AREA = 1e-6  # square pixels; a polygon with less is degenerate (its mask is empty)
CARD_DOC = 'docs/own-data.md, section "Dataset card (meta.json)"'
CARD_EXAMPLE = ('{"name": "mydata", "classes": [{"id": 0, "name": "road"}, '
                '{"id": 1, "name": "car"}]}')

log = logging.getLogger(__name__)

__all__ = [
    "DEPTH_ENCODINGS",
    "LABEL_KINDS",
    "SEMANTIC_VALUES",
    "CocoDataset",
    "SampleFiles",
    "open_dataset",
    "read_image",
    "read_depth",
    "read_label",
    "read_png",
    "check_semantic_values",
    "semantic_classes",
    "split_label_kinds",
    "panoptic_rgb_to_ids",
]

Sample = dict[str, Any]


# ------------------------------------------------------------------------------------------------
# file decoding
# ------------------------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(path, f"{what} not found") from e
    except IsADirectoryError as e:
        raise DataError(path, f"{what} expected, found a folder") from e
    except OSError as e:
        raise DataError(path, f"cannot read {what} ({e.strerror or e})") from e


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as RGB: a C-contiguous ``HxWx3 uint8`` array, fully decoded.

    The image is turned upright by its EXIF orientation tag (``ImageOps.exif_transpose``, as
    COCO tools and browsers show it): the size returned is the displayed one, the same for
    training, evaluation, ``predict`` and serving. Conversions:

    - 8-bit RGB as is; grayscale (``L``, ``1``), palette (``P``, ``PA``), ``LA``, ``RGBA``,
      CMYK, YCbCr by PIL's ``convert("RGB")`` (alpha dropped, palette looked up);
    - 16-bit RGB/RGBA PNGs: PIL keeps the high byte (value >> 8);
    - 16-bit grayscale (PIL modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and 32-bit integer
      grayscale (mode ``I``) whose values lie in 0..65535: value >> 8 (65535 -> 255), repeated
      on 3 channels;
    - float grayscale (mode ``F``) with finite values in 0..1: round(value * 255).

    Raises ``DataError`` naming the file when it is missing, truncated or corrupt (the pixels are
    decoded, so a truncated PNG or JPEG is caught), or in a mode that cannot be read faithfully
    (``I`` outside 0..65535, ``F`` outside 0..1, modes PIL cannot convert to RGB)."""
    path = Path(path)
    data = _read_bytes(path, "image file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise DataError(path, "not an image file PIL can read (unknown or corrupt header; "
                              f"expected PNG, JPEG or another of {', '.join(IMAGE_SUFFIXES)})"
                        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(path, f"corrupt image header ({type(e).__name__}: {e})") from e
    with img:
        fmt = img.format or "unknown format"
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(path, f"truncated or corrupt image ({fmt}: {e})") from e
        _exif_upright(img, path, fmt)
        return _to_rgb8(img, path, fmt)


_EXIF_ORIENTATION = 0x0112


def _exif_upright(img: Image.Image, path: Path, fmt: str) -> None:
    """Apply ``img``'s EXIF orientation (2..8) in place; nothing for images without one."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError, TypeError, struct.error) as e:
        raise DataError(path, f"{fmt} image with unreadable EXIF orientation "
                              f"({type(e).__name__}: {e})") from e


def _to_rgb8(img: Image.Image, path: Path, fmt: str) -> np.ndarray:
    """A loaded PIL image as ``HxWx3 uint8`` (see ``read_image`` for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(img))
    gray: np.ndarray | None = None
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img)
        if mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise DataError(path, f"{fmt} image in 32-bit integer mode I with values "
                                  f"{int(a.min())}..{int(a.max())}: expected 0..65535 "
                                  "(16-bit) to scale to 8 bit")
        gray = (a.astype(np.uint32) >> 8).astype(np.uint8)
    elif mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            finite = a[np.isfinite(a)]
            found = (f"{float(finite.min()):g}..{float(finite.max()):g}" if finite.size
                     else "none finite")
            found += "" if np.isfinite(a).all() else " and NaN/inf"
            raise DataError(path, f"{fmt} image in float mode F with values {found}: expected "
                                  "finite values in 0..1 to scale to 8 bit")
        gray = np.rint(a * np.float32(255.0)).astype(np.uint8)
    if gray is not None:
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    try:
        return np.ascontiguousarray(np.asarray(img.convert("RGB")))
    except (ValueError, OSError) as e:
        raise DataError(path, f"{fmt} image in PIL mode {mode} cannot be converted to RGB "
                              f"({e})") from e


def read_png(path: str | os.PathLike[str], what: str = "label PNG") -> tuple[np.ndarray, str]:
    """Read a PNG exactly as stored: ``(array, mode)``.

    The array is ``HxW`` (gray, palette) or ``HxWxC``; dtype uint8 for 8-bit and uint16 for
    16-bit files, including 16-bit RGB, which PIL would truncate to 8 bit (decoded with
    torchvision's libpng instead). ``mode`` is PIL's mode name, ``"RGB;16"``/``"RGBA;16"`` for
    16-bit colour. Raises ``DataError`` for a missing or corrupt file."""
    path = Path(path)
    data = _read_bytes(path, what)
    try:
        if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
            _w, _h, depth, ctype = struct.unpack(">IIBB", data[16:26])
            if depth == 16 and ctype in (2, 6):  # 16-bit RGB / RGBA
                with warnings.catch_warnings():  # torchvision >= 0.29 deprecates its codecs
                    warnings.simplefilter("ignore", DeprecationWarning)
                    t = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                   ImageReadMode.UNCHANGED)
                arr = t.permute(1, 2, 0).numpy().astype(np.uint16)  # HxWxC, contiguous copy
                return arr, "RGB;16" if ctype == 2 else "RGBA;16"
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except Image.UnidentifiedImageError:
        raise DataError(path, f"corrupt or unreadable {what} (not an image file PIL can read: "
                              "unknown or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as e:
        raise DataError(path, f"corrupt or unreadable {what} ({type(e).__name__}: {e})") from e
    if mode.startswith("I;16"):
        arr = arr.astype(np.uint16, copy=False)  # I;16B arrives big-endian
    elif mode == "1":
        arr = arr.astype(np.uint8)
    return arr, mode


def _describe(arr: np.ndarray, mode: str) -> str:
    shape = "x".join(str(s) for s in arr.shape[:2])
    chans = f"x{arr.shape[2]}" if arr.ndim == 3 else ""
    return f"{shape}{chans} {arr.dtype} (PNG mode {mode})"


def read_label(path: Path, kind: str, hw: tuple[int, int] | None, *,
               depth_encoding: str = "mm") -> np.ndarray:
    """Read and check one label PNG of ``kind`` (semantic, depth, normals, panoptic) for an
    image of size ``hw`` (None: any size): the array as stored, depth as its uint16 values
    (millimetres; metres x 256 with ``depth_encoding="kitti"``; ``read_depth`` gives metres and
    reads ``float`` files).

    Raises ``DataError`` naming the file when it is missing, corrupt, or of the wrong size,
    channel count or bit depth for its kind."""
    if kind == "depth" and depth_encoding not in ("mm", "kitti"):
        raise ValueError(f"read_label reads depth PNGs of depth_encoding mm or kitti, got "
                         f"{depth_encoding!r} (use read_depth)")
    expect = {
        "semantic": "uint8 single-channel (PNG mode L or P)",
        "depth": ("uint16 single-channel millimetres (PNG mode I;16)" if depth_encoding == "mm"
                  else "uint16 single-channel PNG (mode I;16) of metres x 256, what "
                       "data.options.depth_encoding kitti reads (KITTI's depth maps)"),
        "normals": "RGB uint8 or uint16 (PNG mode RGB or RGB;16)",
        "panoptic": "RGB uint8 (PNG mode RGB)",
    }[kind]
    arr, mode = read_png(path, f"{kind} PNG")
    ok = {
        "semantic": arr.ndim == 2 and arr.dtype == np.uint8,
        "depth": arr.ndim == 2 and (arr.dtype == np.uint16 or mode == "I"),
        "normals": arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype in (np.uint8, np.uint16),
        "panoptic": arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8,
    }[kind]
    if not ok or (hw is not None and arr.shape[:2] != hw):
        size = f"{hw[0]}x{hw[1]} (HxW, the image's size) " if hw is not None else ""
        raise DataError(path, f"expected a {size}{expect}, got {_describe(arr, mode)}")
    if kind == "depth" and arr.dtype != np.uint16:  # mode "I" (int32) from older encoders
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            unit = "mm" if depth_encoding == "mm" else "(uint16)"
            raise DataError(path, f"depth values outside 0..65535 {unit} ({_describe(arr, mode)})")
        arr = arr.astype(np.uint16)
    return arr


_FLOAT_DEPTH = ("a 32-bit float TIFF (PIL mode F) or a .npy float array (HxW) in metres, what "
                "data.options.depth_encoding float reads")


def read_depth(path: str | os.PathLike[str], hw: tuple[int, int] | None,
               encoding: str = "mm") -> np.ndarray:
    """Read one depth file for an image of size ``hw`` (None: any size) as ``HxW float32``
    metres, 0 = unknown. ``encoding`` (``DEPTH_ENCODINGS``, ``data.options.depth_encoding``):

    - ``mm`` (default): uint16 PNG in millimetres, metres = value / 1000;
    - ``kitti``: uint16 PNG as the KITTI depth benchmark writes it, metres = value / 256
      (up to 256 m; KITTI caps at 80 m);
    - ``float``: 32-bit float TIFF (``.tif``/``.tiff``, PIL mode F) or ``.npy`` float array in
      metres; non-finite values and values <= 0 become 0 (unknown).

    Raises ``DataError`` naming the file when it is missing, corrupt, of the wrong size, or not
    what the encoding reads (e.g. an 8-bit PNG for ``kitti``, a PNG for ``float``): the message
    names the file's mode and what the encoding expects."""
    path = Path(path)
    if encoding not in DEPTH_ENCODINGS:
        raise ValueError(f"unknown depth encoding {encoding!r}: expected one of "
                         f"{', '.join(DEPTH_ENCODINGS)}")
    if encoding == "mm":
        return read_label(path, "depth", hw).astype(np.float32) * np.float32(0.001)
    if encoding == "kitti":
        raw = read_label(path, "depth", hw, depth_encoding="kitti")
        return raw.astype(np.float32) * np.float32(1.0 / 256.0)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        data = _read_bytes(path, "depth array")
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(path, f"corrupt or unreadable .npy depth array ({e})") from e
        if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind != "f":
            got = (f"{'x'.join(map(str, arr.shape))} {arr.dtype}" if isinstance(arr, np.ndarray)
                   else type(arr).__name__)
            raise DataError(path, f"expected {_FLOAT_DEPTH}, got a .npy array {got}")
        what = ".npy array"
    else:
        data = _read_bytes(path, "depth file")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                mode, fmt = img.mode, img.format or "image"
                arr = np.asarray(img) if mode == "F" else None
        except Image.UnidentifiedImageError:
            raise DataError(path, f"not a depth file PIL can read (unknown or corrupt header); "
                                  f"expected {_FLOAT_DEPTH}") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(path, f"corrupt or unreadable depth file ({type(e).__name__}: "
                                  f"{e})") from e
        if arr is None:
            hint = (" (a uint16 PNG is read with depth_encoding mm or kitti)"
                    if fmt == "PNG" else "")
            raise DataError(path, f"depth {fmt} in PIL mode {mode}: expected {_FLOAT_DEPTH}"
                                  f"{hint}")
        what = f"{fmt} (PIL mode F)"
    if hw is not None and arr.shape != hw:
        raise DataError(path, f"expected depth of {hw[0]}x{hw[1]} (HxW, the image's size), got "
                              f"{arr.shape[0]}x{arr.shape[1]} {what}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    out[~(np.isfinite(out) & (out > 0))] = 0.0
    return out


def _category_lut(card: DatasetCard) -> np.ndarray:
    """256 entries: PNG value -> class index for ``semantic_values="category_id"`` (a class's
    ``id`` -> its position; the ignore value -> itself; -1: no class has that id)."""
    lut = np.full(256, -1, np.int64)
    for i, c in enumerate(card.classes):
        if 0 <= c.id < 256:
            lut[c.id] = i
    if 0 <= card.ignore_index < 256:
        lut[card.ignore_index] = card.ignore_index  # ignore wins over a class id equal to it
    return lut


def _listed(values: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def check_semantic_values(sem: np.ndarray, path: str | os.PathLike[str], card: DatasetCard, *,
                          semantic_values: str = "index") -> None:
    """Raise ``DataError`` naming ``path`` when the semantic map ``sem`` (uint8 ``HxW``) holds a
    value that is neither a class of ``card`` nor its ignore value. ``semantic_values``
    (``SEMANTIC_VALUES``): ``index`` (default): a class is its index 0..C-1 (position in the
    card's ``classes``); ``category_id``: a class is its ``id`` in the card."""
    semantic_classes(sem, path, card, semantic_values=semantic_values, convert=False)


def semantic_classes(sem: np.ndarray, path: str | os.PathLike[str], card: DatasetCard, *,
                     semantic_values: str = "index", convert: bool = True) -> np.ndarray:
    """The semantic map ``sem`` (uint8 ``HxW`` as stored) as class indices (``HxW int64``,
    0..C-1 and the card's ignore value), checked (see ``check_semantic_values``).

    ``semantic_values="index"``: the stored value is the class index (position in the card's
    ``classes``, i.e. categories sorted by id for a card from COCO JSON): returned as is.
    ``"category_id"``: the stored value is the class ``id`` (VOC-style): a card with class ids
    ``[0, 5, 9]`` reads 5 as index 1, 255 stays 255 (ignore), 3 is a ``DataError``.
    ``convert=False``: only check (returns ``sem`` unchanged)."""
    if semantic_values not in SEMANTIC_VALUES:
        raise ValueError(f"unknown semantic_values {semantic_values!r}: expected one of "
                         f"{', '.join(SEMANTIC_VALUES)}")
    counts = np.bincount(sem.ravel(), minlength=256)
    values = np.flatnonzero(counts)
    lut = _category_lut(card)
    if semantic_values == "index":
        bad = values[(values >= card.num_classes) & (values != card.ignore_index)]
    else:
        bad = values[lut[values] < 0]
    if bad.size:
        noun = "value" if bad.size == 1 else "values"
        pixels = int(counts[bad].sum())
        if semantic_values == "index":
            msg = (f"semantic {noun} {_listed(bad)} ({pixels} pixels) out of range: expected "
                   f"0..{card.num_classes - 1} (the {card.num_classes} classes of dataset card "
                   f"'{card.name}') or {card.ignore_index} (ignore)")
            if (lut[bad] >= 0).all():
                msg += ("; these are class ids of the card: if the PNGs store class ids, set "
                        "data.options.semantic_values: category_id")
        else:
            ids = sorted({c.id for c in card.classes})
            msg = (f"semantic {noun} {_listed(bad)} ({pixels} pixels) not a class id: "
                   f"data.options.semantic_values category_id expects the ids of dataset card "
                   f"'{card.name}' ({_listed(ids, 20)}) or {card.ignore_index} (ignore)")
        raise DataError(path, msg)
    if not convert:
        return sem
    if semantic_values == "index":
        return sem.astype(np.int64)
    return lut[sem]


def panoptic_rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic encoding: ``HxWx3 uint8`` -> ``HxW int64`` ids (R + 256 G + 256^2 B)."""
    return rgb_to_ids(rgb).astype(np.int64)


_NORMALS_LUT8 = np.arange(256, dtype=np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def _decode_normals(arr: np.ndarray) -> np.ndarray:
    """``HxWx3`` uint8/uint16 encoding (n + 1) / 2 -> ``3xHxW`` float32 unit vectors (0 unknown).

    Quantised vectors are renormalised to unit length; (0, 0, 0) pixels become 0."""
    planes = np.ascontiguousarray(arr.transpose(2, 0, 1))
    if planes.dtype == np.uint8:
        n = _NORMALS_LUT8[planes]
    else:
        n = planes.astype(np.float32) * np.float32(2.0 / 65535.0) - np.float32(1.0)
    known = (planes[0] | planes[1] | planes[2]) != 0
    norm2 = n[0] * n[0] + n[1] * n[1] + n[2] * n[2]
    inv = np.zeros_like(norm2)
    ok = known & (norm2 > 1e-12)
    inv[ok] = 1.0 / np.sqrt(norm2[ok])
    n *= inv[None]
    return n


# ------------------------------------------------------------------------------------------------
# JSON parsing and validation
# ------------------------------------------------------------------------------------------------
def _load_json(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise DataError(path, f"{what} JSON not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not valid JSON ({e})") from e
    except OSError as e:
        raise DataError(path, f"cannot read {what} JSON ({e.strerror or e})") from e
    if not isinstance(obj, dict):
        raise DataError(path, f"not a COCO {what} JSON: expected an object with keys images, "
                              f"annotations, categories, got {type(obj).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in obj]
    if missing:
        raise DataError(path, f"not a COCO {what} JSON: missing key(s) {', '.join(missing)} "
                              "(expected images, annotations, categories)")
    for k in ("images", "annotations", "categories"):
        if not isinstance(obj[k], list):
            raise DataError(path, f"not a COCO {what} JSON: '{k}' must be a list, "
                                  f"got {type(obj[k]).__name__}")
    return obj


def _class_index(path: Path, where: str, category_id: int, own_categories: set[int],
                 card: DatasetCard) -> int:
    """Class index of ``category_id``, which must be in the file's categories and in the card."""
    if category_id not in own_categories:
        raise DataError(path, f"{where}: category_id {category_id} is not in this file's categories")
    try:
        return card.index_of_category(category_id)
    except KeyError:
        raise DataError(path, f"{where}: category_id {category_id} is not a class of the "
                              f"dataset card '{card.name}'") from None


def _require(path: Path, rec: Any, fields: Sequence[str], where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(path, f"{where} must be an object with {', '.join(fields)}")
    for f in fields:
        if f not in rec:
            raise DataError(path, f"{where} has no '{f}' field (expected {', '.join(fields)})")


def _check_categories(path: Path, obj: dict[str, Any]) -> set[int]:
    ids: set[int] = set()
    for i, c in enumerate(obj["categories"]):
        _require(path, c, ("id", "name"), f"categories[{i}]")
        ids.add(int(c["id"]))
    return ids


@dataclass(frozen=True)
class SampleFiles:
    """The files ``CocoDataset.load`` reads for one sample (what ``check_dataset`` checks).

    ``image``: the image file; ``size``/``size_source``: ``(H, W)`` as declared by the JSON
    ``size_source`` (None for a folder without JSON); ``labels``: kind -> label PNG, the panoptic
    PNG whenever the panoptic JSON lists one (it must exist), semantic/depth/normals PNGs only
    when present in their folder; ``unlabelled``: dense kinds whose folder exists but holds no
    PNG for this image (not an error: the sample lacks that key); ``listed_in``: kind -> the JSON
    that references the file (``"image"``, ``"panoptic"``)."""

    image: Path
    size: tuple[int, int] | None
    size_source: Path | None
    labels: dict[str, Path]
    unlabelled: tuple[str, ...]
    listed_in: dict[str, Path]


@dataclass
class _ImageRecord:
    id: int
    file_name: str
    height: int | None
    width: int | None
    source: str | None  # JSON that declared its size
    anns: list[dict[str, Any]] | None = None  # instances (None: not labelled for instances)
    panoptic: dict[str, Any] | None = None  # panoptic annotation (None: no panoptic label)


# ------------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------------
class CocoDataset(SampleDataset):
    """A split of a COCO-format dataset as a map-style torch ``Dataset`` of sample dicts.

    Args:
        image_dir: folder of the images (``file_name`` in the JSONs is relative to it).
        instances_json: COCO instances JSON (boxes, masks, optionally keypoints).
        keypoints_json: COCO person-keypoints JSON, merged into the instances by annotation id.
        panoptic_json, panoptic_dir: COCO panoptic JSON and the folder of its PNGs.
        semantic_dir, depth_dir, normals_dir: folders of label PNGs named like the images
            (depth with ``depth_encoding="float"``: ``.tiff``/``.tif``/``.npy`` files).
        label_dirs: ``{dense kind: folder}`` for any registered dense label kind
            (``pipeline.data.label_kinds``), files named like the images, read by its ``decode``;
            an unknown kind is a ``ValueError``.
        card: the ``DatasetCard``; by default built from the JSON categories (panoptic ones if
            any, since they carry ``isthing`` and stuff classes, else instances ones), merged with
            the keypoint declarations of ``keypoints_json``.
        transforms: callable ``sample -> sample`` applied last (see ``pipeline.data.transforms``).
        label_kinds: the label kinds (of ``LABEL_KINDS``) samples carry; the others are not
            decoded and are missing keys, as for a split without them. ``None``: all. Semantic
            derived from panoptic still reads the panoptic PNG; ``keypoints`` ride in
            ``instances``, so asking for either decodes the instances, with keypoints only when
            asked for. An unknown kind is a ``ValueError``.
        depth_encoding: how depth files store metres, one of ``DEPTH_ENCODINGS`` (see
            ``read_depth``): ``"mm"`` (default), ``"kitti"``, ``"float"``.
        semantic_values: what semantic PNG values are, one of ``SEMANTIC_VALUES`` (see
            ``semantic_classes``): ``"index"`` (default: position in the card's classes) or
            ``"category_id"`` (the card's class ``id``).

    Without any JSON the images are the files of ``image_dir`` (sorted; image id = the numeric
    file stem, else position + 1).

    Attributes: ``card``, ``image_ids`` (in sample order), ``label_kinds`` (which of
    ``LABEL_KINDS`` this split has; a label folder without a PNG gives none; not narrowed by the
    ``label_kinds`` argument), ``loaded_kinds`` (those of them samples carry), the paths given
    above; ``dropped_annotations`` (annotations left without a valid polygon, not loaded),
    ``dropped_polygons`` (invalid polygons removed, those of dropped annotations included) and
    ``drop_examples`` (the first few, as ``"file: annotation id N: reason"``).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        instances_json: str | os.PathLike[str] | None = None,
        keypoints_json: str | os.PathLike[str] | None = None,
        panoptic_json: str | os.PathLike[str] | None = None,
        panoptic_dir: str | os.PathLike[str] | None = None,
        semantic_dir: str | os.PathLike[str] | None = None,
        depth_dir: str | os.PathLike[str] | None = None,
        normals_dir: str | os.PathLike[str] | None = None,
        card: DatasetCard | None = None,
        transforms: Callable[[Sample], Sample] | None = None,
        *,
        label_kinds: Iterable[str] | None = None,
        depth_encoding: str = "mm",
        semantic_values: str = "index",
        label_dirs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    ) -> None:
        if depth_encoding not in DEPTH_ENCODINGS:
            raise ValueError(f"unknown depth_encoding {depth_encoding!r}: expected one of "
                             f"{', '.join(DEPTH_ENCODINGS)}")
        if semantic_values not in SEMANTIC_VALUES:
            raise ValueError(f"unknown semantic_values {semantic_values!r}: expected one of "
                             f"{', '.join(SEMANTIC_VALUES)}")
        self.depth_encoding = depth_encoding
        self.semantic_values = semantic_values
        self.image_dir = Path(image_dir)
        self.instances_json = Path(instances_json) if instances_json is not None else None
        self.keypoints_json = Path(keypoints_json) if keypoints_json is not None else None
        self.panoptic_json = Path(panoptic_json) if panoptic_json is not None else None
        self.panoptic_dir = Path(panoptic_dir) if panoptic_dir is not None else None
        self.semantic_dir = Path(semantic_dir) if semantic_dir is not None else None
        self.depth_dir = Path(depth_dir) if depth_dir is not None else None
        self.normals_dir = Path(normals_dir) if normals_dir is not None else None
        dirs: dict[str, Path | None] = {"semantic": self.semantic_dir, "depth": self.depth_dir,
                                        "normals": self.normals_dir}
        for kind_name, d in (label_dirs or {}).items():
            if dirs.get(kind_name) is not None:
                raise ValueError(f"label_dirs: {kind_name} folder given twice")
            dirs[kind_name] = Path(d) if d is not None else None
        self._dense: dict[str, DenseLabelKind] = {}  # kind -> its rules, for the folders given
        self._label_dirs: dict[str, Path] = {}
        for kind_name, d in dirs.items():
            if d is None:
                continue
            kind = dense_kind(kind_name)
            if kind is None:
                raise ValueError(f"label_dirs: {kind_name!r} is no registered dense label kind; "
                                 f"registered: {', '.join(dense_kinds())}")
            self._dense[kind_name], self._label_dirs[kind_name] = kind, d
        self.transforms = transforms
        self._wanted = wanted_label_kinds(label_kinds)

        if not self.image_dir.is_dir():
            raise DataError(self.image_dir, "images folder not found")
        if (self.panoptic_json is None) != (self.panoptic_dir is None):
            given = self.panoptic_json if self.panoptic_json is not None else self.panoptic_dir
            raise DataError(given, "panoptic labels need both panoptic_json and panoptic_dir")

        inst = _load_json(self.instances_json, "instances") if self.instances_json else None
        kps = _load_json(self.keypoints_json, "keypoints") if self.keypoints_json else None
        pan = _load_json(self.panoptic_json, "panoptic") if self.panoptic_json else None
        if self.panoptic_dir is not None and not self.panoptic_dir.is_dir():
            raise DataError(self.panoptic_dir, "panoptic PNG folder not found")

        self.card = card if card is not None else _card_from_jsons(inst, kps, pan, self)
        self._kp_specs: dict[int, KeypointSpec] = {s.category_id: s for s in self.card.keypoints}
        self.num_keypoints = max((s.num_keypoints for s in self.card.keypoints), default=0)

        self.dropped_annotations = 0
        self.dropped_polygons = 0
        self.drop_examples: list[str] = []
        self._dropped_ids: set[int] = set()

        # images: union over the JSONs, each image remembers which labels it has
        records: dict[int, _ImageRecord] = {}
        for path, obj in ((self.instances_json, inst), (self.keypoints_json, kps),
                          (self.panoptic_json, pan)):
            if obj is not None:
                assert path is not None
                self._add_images(path, obj, records)
        has_keypoints = False
        if inst is not None:
            assert self.instances_json is not None
            has_keypoints |= self._add_instances(self.instances_json, inst, records, merge=False)
        if kps is not None:
            assert self.keypoints_json is not None
            has_keypoints |= self._add_instances(self.keypoints_json, kps, records, merge=True)
            has_keypoints = has_keypoints or bool(self.num_keypoints)
        if pan is not None:
            assert self.panoptic_json is not None
            self._add_panoptic(self.panoptic_json, pan, records)
        if self.dropped_polygons:
            log.warning("%s: dropped %d annotation(s) without a valid polygon and %d invalid "
                        "polygon(s) in all (fewer than 3 points, odd coordinate count or zero "
                        "area; detectron2's rule); first: %s", self.image_dir,
                        self.dropped_annotations, self.dropped_polygons, self.drop_examples[0])
        if not records:
            if inst is None and kps is None and pan is None:
                records = self._images_from_folder()
        self._records: list[_ImageRecord] = [records[k] for k in sorted(records)]
        self.image_ids: list[int] = [r.id for r in self._records]

        # dense label folders: list each once (kind -> image file stem -> label file name)
        self._label_files: dict[str, dict[str, str]] = {}
        for kind, d in self._label_dirs.items():
            if not d.is_dir():
                raise DataError(d, f"{kind} PNG folder not found")
            suffixes = self._dense[kind].suffixes(self.read_options)
            self._label_files[kind] = _files_by_stem(os.listdir(d), suffixes)

        kinds = {k for k, names in self._label_files.items() if names}  # empty folder: none
        if inst is not None or kps is not None:
            kinds.add("instances")
        if has_keypoints and self.num_keypoints > 0:
            kinds.add("keypoints")
        if pan is not None:
            kinds.update(("panoptic", "semantic"))
        self.label_kinds: tuple[str, ...] = ordered(kinds)
        self.loaded_kinds: tuple[str, ...] = tuple(k for k in self.label_kinds
                                                   if k in self._wanted)

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_layout(
        cls, root: str | os.PathLike[str], split: str,
        transforms: Callable[[Sample], Sample] | None = None, *,
        label_kinds: Iterable[str] | None = None,
        depth_encoding: str = "mm",
        semantic_values: str = "index",
    ) -> CocoDataset:
        """A split of the densepipe layout (what the synthetic world writes)::

            root/meta.json                      dataset card
            root/images/{split}/*.png
            root/annotations/instances_{split}.json
            root/annotations/panoptic_{split}.json + root/panoptic/{split}/*.png
            root/semantic/{split}/*.png, root/depth/{split}/*.png, root/normals/{split}/*.png
            root/<kind>/{split}/*                 any other registered dense label kind

        Every label file/folder is optional. Without ``meta.json`` the card comes from the JSONs.
        ``label_kinds``, ``depth_encoding`` (``depth/{split}/`` may then hold ``.tiff``/``.npy``),
        ``semantic_values``: see the class doc.
        """
        root = Path(root)
        image_dir = root / "images" / split
        if not image_dir.is_dir():
            raise DataError(image_dir, f"images folder of split '{split}' not found (expected "
                                       f"{root}/images/{split}/ holding one file per image)")

        def opt(p: Path) -> Path | None:
            return p if p.exists() else None

        pan_json = opt(root / "annotations" / f"panoptic_{split}.json")
        pan_dir = root / "panoptic" / split
        meta = root / "meta.json"
        inst_json = opt(root / "annotations" / f"instances_{split}.json")
        kps_json = opt(root / "annotations" / f"person_keypoints_{split}.json")
        if not meta.exists() and inst_json is None and kps_json is None and pan_json is None:
            raise DataError(root, f"no dataset card (meta.json) and no annotation JSON for split "
                                  f"'{split}' (annotations/instances_{split}.json, "
                                  f"annotations/panoptic_{split}.json): nothing says what the "
                                  f"classes are; write meta.json with at least {CARD_EXAMPLE} "
                                  f"(the index in 'classes' is the value semantic PNGs store) or "
                                  f"a COCO instances JSON; see {CARD_DOC}")
        return cls(
            image_dir,
            instances_json=inst_json,
            keypoints_json=kps_json,
            panoptic_json=pan_json,
            panoptic_dir=pan_dir if pan_json is not None else None,
            semantic_dir=opt(root / "semantic" / split),
            depth_dir=opt(root / "depth" / split),
            normals_dir=opt(root / "normals" / split),
            label_dirs={k: opt(root / k / split) for k in dense_kinds()
                        if k not in ("semantic", "depth", "normals")},
            card=DatasetCard.load(meta) if meta.exists() else None,
            transforms=transforms,
            label_kinds=label_kinds,
            depth_encoding=depth_encoding,
            semantic_values=semantic_values,
        )

    @classmethod
    def from_coco2017(
        cls, root: str | os.PathLike[str], split: str,
        transforms: Callable[[Sample], Sample] | None = None, *,
        label_kinds: Iterable[str] | None = None,
    ) -> CocoDataset:
        """A split ("train", "val") of a COCO 2017 folder::

            root/{split}2017/*.jpg
            root/annotations/instances_{split}2017.json
            root/annotations/person_keypoints_{split}2017.json
            root/annotations/panoptic_{split}2017.json + root/annotations/panoptic_{split}2017/

        The card comes from the panoptic categories when present (133 classes with stuff and
        ``isthing``), else the instances ones, with the person keypoints merged in.
        ``label_kinds``: see the class doc."""
        root = Path(root)
        ann = root / "annotations"
        image_dir = root / f"{split}2017"
        if not image_dir.is_dir():
            raise DataError(image_dir, f"images folder of split '{split}' not found "
                                       f"(expected COCO 2017 layout {root}/{split}2017/)")

        def opt(p: Path) -> Path | None:
            return p if p.exists() else None

        pan_json = opt(ann / f"panoptic_{split}2017.json")
        inst_json = opt(ann / f"instances_{split}2017.json")
        kps_json = opt(ann / f"person_keypoints_{split}2017.json")
        if inst_json is None and kps_json is None and pan_json is None:
            raise DataError(ann, f"no annotation JSON for split '{split}': expected "
                                 f"instances_{split}2017.json, panoptic_{split}2017.json or "
                                 f"person_keypoints_{split}2017.json here (COCO 2017 layout); "
                                 f"a folder without one needs the densepipe layout and a dataset "
                                 f"card (meta.json); see {CARD_DOC}")
        return cls(
            image_dir,
            instances_json=inst_json,
            keypoints_json=kps_json,
            panoptic_json=pan_json,
            panoptic_dir=(ann / f"panoptic_{split}2017") if pan_json is not None else None,
            transforms=transforms,
            label_kinds=label_kinds,
        )

    # -- parsing -------------------------------------------------------------------------------
    @staticmethod
    def _add_images(path: Path, obj: dict[str, Any], records: dict[int, _ImageRecord]) -> None:
        for i, im in enumerate(obj["images"]):
            _require(path, im, ("id", "file_name", "height", "width"), f"images[{i}]")
            iid = int(im["id"])
            h, w = int(im["height"]), int(im["width"])
            rec = records.get(iid)
            if rec is None:
                records[iid] = _ImageRecord(iid, str(im["file_name"]), h, w, str(path))
            elif (rec.height, rec.width) != (h, w):
                raise DataError(path, f"image id {iid} is {h}x{w} (HxW) here but "
                                      f"{rec.height}x{rec.width} in {rec.source}")

    def _add_instances(self, path: Path, obj: dict[str, Any],
                       records: dict[int, _ImageRecord], *, merge: bool) -> bool:
        """Index the annotations of an instances/keypoints JSON per image; True if keypoints."""
        own_images = {int(im["id"]) for im in obj["images"]}
        own_cats = _check_categories(path, obj)
        for iid in own_images:
            if records[iid].anns is None:
                records[iid].anns = []
        by_id: dict[int, dict[str, Any]] = {}
        if merge:
            for r in records.values():
                for a in r.anns or ():
                    by_id[a["id"]] = a
        dropped_ids = self._dropped_ids
        any_kp = False
        card = self.card
        for i, a in enumerate(obj["annotations"]):
            _require(path, a, ("id", "image_id", "category_id", "bbox"), f"annotations[{i}]")
            aid, iid, cid = int(a["id"]), int(a["image_id"]), int(a["category_id"])
            where = f"annotation id {aid}"
            if iid not in own_images:
                raise DataError(path, f"{where}: image_id {iid} is not in this file's images")
            label = _class_index(path, where, cid, own_cats, card)
            rec = records[iid]
            bbox = a["bbox"]
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) for v in bbox)):
                raise DataError(path, f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox}")
            x, y, w, h = (float(v) for v in bbox)
            assert rec.width is not None and rec.height is not None
            if (w < 0 or h < 0 or x < -BOX_TOLERANCE or y < -BOX_TOLERANCE
                    or x + w > rec.width + BOX_TOLERANCE or y + h > rec.height + BOX_TOLERANCE):
                raise DataError(path, f"{where}: bbox [x, y, w, h] = {bbox} lies outside its "
                                      f"image ({rec.width}x{rec.height} WxH, id {iid})")
            kp = a.get("keypoints")
            if kp:
                spec = self._kp_specs.get(cid)
                if spec is None:
                    raise DataError(path, f"{where}: has keypoints but category {cid} declares "
                                          "none (no 'keypoints' names in its category)")
                if len(kp) != 3 * spec.num_keypoints:
                    raise DataError(path, f"{where}: expected {3 * spec.num_keypoints} keypoint "
                                          f"numbers (x, y, v for {spec.num_keypoints} keypoints), "
                                          f"got {len(kp)}")
                any_kp = True
            entry = {
                "id": aid, "label": label, "category_id": cid, "bbox": (x, y, w, h),
                "iscrowd": bool(a.get("iscrowd", 0)), "segmentation": a.get("segmentation"),
                "keypoints": kp or None, "source": str(path),
            }
            if merge and aid in by_id:  # keypoints file annotating an existing instance
                if kp:
                    by_id[aid]["keypoints"] = kp
                continue
            if merge and aid in dropped_ids:  # the instances file's copy was dropped already
                continue
            seg = entry["segmentation"]
            if isinstance(seg, list) and seg:
                valid, problems = _valid_polygons(path, where, seg)
                if problems:
                    self.dropped_polygons += len(problems)
                    if len(self.drop_examples) < 5:
                        self.drop_examples.append(f"{path.name}: {where}: {problems[0]}")
                if not valid:
                    self.dropped_annotations += 1
                    dropped_ids.add(aid)
                    continue
                entry["segmentation"] = valid
            assert rec.anns is not None
            rec.anns.append(entry)
        return any_kp

    def _add_panoptic(self, path: Path, obj: dict[str, Any],
                      records: dict[int, _ImageRecord]) -> None:
        own_images = {int(im["id"]) for im in obj["images"]}
        own_cats = _check_categories(path, obj)
        card = self.card
        for i, a in enumerate(obj["annotations"]):
            _require(path, a, ("image_id", "file_name", "segments_info"), f"annotations[{i}]")
            iid = int(a["image_id"])
            if iid not in own_images:
                raise DataError(path, f"annotations[{i}] ({a['file_name']}): image_id {iid} is "
                                      "not in this file's images")
            segments = []
            for j, s in enumerate(a["segments_info"]):
                where = f"annotations[{i}].segments_info[{j}]"
                _require(path, s, ("id", "category_id"), where)
                cid = int(s["category_id"])
                label = _class_index(path, where, cid, own_cats, card)
                segments.append({
                    "id": int(s["id"]), "category_id": cid,
                    "isthing": bool(card.classes[label].isthing),
                    "iscrowd": bool(s.get("iscrowd", 0)), "label": label,
                })
            records[iid].panoptic = {"file_name": str(a["file_name"]), "segments": segments}

    def _images_from_folder(self) -> dict[int, _ImageRecord]:
        names = sorted(n for n in os.listdir(self.image_dir)
                       if n.lower().endswith(IMAGE_SUFFIXES))
        ids = image_ids_of([Path(n).stem for n in names])
        return {iid: _ImageRecord(iid, n, None, None, None) for iid, n in zip(ids, names, strict=True)}

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)


    def sample_files(self, index: int) -> SampleFiles:
        """The files sample ``index`` is read from (see ``SampleFiles``); no file is opened."""
        rec = self._records[index]
        labels: dict[str, Path] = {}
        listed: dict[str, Path] = {}
        if rec.source is not None:
            listed["image"] = Path(rec.source)
        if rec.panoptic is not None:
            assert self.panoptic_dir is not None and self.panoptic_json is not None
            labels["panoptic"] = self.panoptic_dir / rec.panoptic["file_name"]
            listed["panoptic"] = self.panoptic_json
        stem = Path(rec.file_name).stem
        unlabelled = []
        for kind, d in self._label_dirs.items():
            name = self._label_files[kind].get(stem)
            if name is not None:
                labels[kind] = d / name
            else:
                unlabelled.append(kind)
        size = (rec.height, rec.width) if rec.height is not None and rec.width is not None else None
        return SampleFiles(self.image_dir / rec.file_name, size,
                           Path(rec.source) if rec.source is not None else None, labels,
                           tuple(unlabelled), listed)

    def listed_file_names(self) -> set[str] | None:
        """``file_name`` of every image the JSONs list; None when the images are the folder's."""
        if self.instances_json is None and self.keypoints_json is None \
                and self.panoptic_json is None:
            return None
        return {r.file_name for r in self._records}

    def segmentation_problems(self, index: int, hw: tuple[int, int]) -> list[tuple[str, str]]:
        """What ``load`` would reject in sample ``index``'s segmentations for an image of size
        ``hw`` (an RLE of another size, a malformed segmentation), as ``(json file, problem)``
        pairs; polygons and RLEs are converted, no mask is decoded."""
        out = []
        for a in self._records[index].anns or ():
            try:
                _to_rle(a["segmentation"], a["bbox"], hw[0], hw[1], mask_utils)
            except DataError as e:
                out.append((a["source"], f"annotation id {a['id']}: {e.problem}"))
            except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
                out.append((a["source"], f"annotation id {a['id']}: cannot decode "
                                         f"segmentation ({type(e).__name__}: {e})"))
        return out

    def image_hw(self, index: int) -> tuple[int, int]:
        """Sample ``index``'s upright (H, W): from its JSON when listed there, else from the
        image file's header (``pipeline.data.formats.image_hw``; no pixels decoded)."""
        rec = self._records[index]
        if rec.height is not None and rec.width is not None:
            return int(rec.height), int(rec.width)
        return image_hw(self.image_dir / rec.file_name)

    def index_of_image_id(self, image_id: int) -> int:
        """Sample index of a COCO image id (KeyError if absent)."""
        lookup = self.__dict__.get("_id_index")
        if lookup is None:
            lookup = {iid: i for i, iid in enumerate(self.image_ids)}
            self.__dict__["_id_index"] = lookup
        return lookup[image_id]

    def load(self, index: int) -> Sample:
        """The sample at ``index`` without transforms, with the labels of ``loaded_kinds`` only
        (a label kind not asked for is not read from disk)."""
        rec = self._records[index]
        img_path = self.image_dir / rec.file_name
        image = read_image(img_path)
        hw = (int(image.shape[0]), int(image.shape[1]))
        if rec.height is not None and hw != (rec.height, rec.width):
            raise DataError(img_path, f"image is {hw[0]}x{hw[1]} (HxW) but {rec.source} says "
                                      f"{rec.height}x{rec.width}")
        sample: Sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "image_id": rec.id,
            "file_name": rec.file_name,
            "meta": {"orig_size": hw},
        }
        stem = Path(rec.file_name).stem
        files = self._label_files
        want = self._wanted
        sem_name = files.get("semantic", {}).get(stem) if "semantic" in want else None
        sem_png = sem_name is not None

        if rec.anns is not None and ("instances" in want or "keypoints" in want):
            sample["instances"] = self._instances(rec, hw)
        pan_ids: np.ndarray | None = None
        if rec.panoptic is not None and (
                "panoptic" in want or ("semantic" in want and not sem_png)):
            assert self.panoptic_dir is not None
            rgb = read_label(self.panoptic_dir / rec.panoptic["file_name"], "panoptic", hw)
            ids = pan_ids = panoptic_rgb_to_ids(rgb)
            segs = rec.panoptic["segments"]
            if "panoptic" in want:
                sample["panoptic"] = {
                    "ids": torch.from_numpy(ids),
                    "segments": [{k: s[k] for k in ("id", "category_id", "isthing", "iscrowd")}
                                 for s in segs],
                }
        if "semantic" in want and not sem_png and rec.panoptic is not None and pan_ids is not None:
            sample["semantic"] = torch.from_numpy(
                _semantic_from_panoptic(pan_ids, rec.panoptic["segments"]))
        for kind, names in files.items():  # the dense kinds' files (semantic's PNG wins)
            name = names.get(stem) if kind in want else None
            if name is not None:
                sample[kind] = self.decode_label(kind, self._label_dirs[kind] / name, hw)
        return sample

    @property
    def read_options(self) -> dict[str, Any]:
        """What the dense kinds' ``decode`` gets as ``options`` (``pipeline.data.label_kinds``)."""
        return {"card": self.card, "depth_encoding": self.depth_encoding,
                "semantic_values": self.semantic_values}

    def decode_label(self, kind: str, path: Path, hw: tuple[int, int] | None) -> torch.Tensor:
        """One file of dense label kind ``kind`` as the sample tensor (its kind's ``decode``, then
        its ``dtype``); ``DataError`` naming the file when the array is not ``HxW`` (``CxHxW``)
        of the image's size."""
        dk = self._dense[kind]
        arr = np.asarray(dk.decode(path, hw, self.read_options))
        want = (dk.channels,) if dk.channels else ()
        if arr.ndim != len(want) + 2 or arr.shape[:-2] != want or (
                hw is not None and arr.shape[-2:] != hw):
            size = f"{hw[0]}x{hw[1]}" if hw is not None else "HxW"
            shape = f"{dk.channels}x{size}" if dk.channels else size
            raise DataError(path, f"{kind} label decoded to shape {'x'.join(map(str, arr.shape))},"
                                  f" expected {shape} (the image's size)")
        arr = np.ascontiguousarray(arr)
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(dk.dtype)

    def _instances(self, rec: _ImageRecord, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        H, W = hw
        anns = rec.anns or []
        n = len(anns)
        out: dict[str, torch.Tensor] = {}
        boxes = np.zeros((n, 4), np.float32)
        for i, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            boxes[i] = (x, y, x + w, y + h)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, H)
        out["boxes"] = torch.from_numpy(boxes)
        out["labels"] = torch.tensor([a["label"] for a in anns], dtype=torch.int64)
        out["masks"] = torch.from_numpy(self._masks(rec, anns, hw))
        out["iscrowd"] = torch.tensor([a["iscrowd"] for a in anns], dtype=torch.bool)
        out["ids"] = torch.tensor([a["id"] for a in anns], dtype=torch.int64)
        if "keypoints" in self.loaded_kinds:
            kp = np.zeros((n, self.num_keypoints, 3), np.float32)
            for i, a in enumerate(anns):
                if a["keypoints"]:
                    k = np.asarray(a["keypoints"], np.float32).reshape(-1, 3)
                    kp[i, : len(k)] = k
            out["keypoints"] = torch.from_numpy(kp)
        return out

    def _masks(self, rec: _ImageRecord, anns: list[dict[str, Any]],
               hw: tuple[int, int]) -> np.ndarray:
        H, W = hw
        if not anns:
            return np.zeros((0, H, W), bool)
        rles = []
        for a in anns:
            seg = a["segmentation"]
            try:
                rles.append(_to_rle(seg, a["bbox"], H, W, mask_utils))
            except DataError as e:
                raise DataError(a["source"], f"annotation id {a['id']}: {e.problem}") from None
            except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
                raise DataError(a["source"], f"annotation id {a['id']}: cannot decode "
                                            f"segmentation ({type(e).__name__}: {e})") from None
        with warnings.catch_warnings():  # pycocotools vs numpy 2 `copy=` chatter
            warnings.simplefilter("ignore", DeprecationWarning)
            m = mask_utils.decode(rles)  # HxWxN uint8, Fortran order
        return np.ascontiguousarray(m.transpose(2, 0, 1)).astype(bool, copy=False)


def _polygon_problem(xy: np.ndarray) -> str | None:
    """Why a COCO polygon (its coordinates ``[x0, y0, x1, y1, ...]`` as a float array) is
    invalid: fewer than 3 points, an odd number of coordinates, zero area; None when valid."""
    n = len(xy)
    if n % 2:
        return f"odd number of coordinates ({n})"
    if n < 6:
        return f"{n // 2} point(s), fewer than 3"
    x, y = xy[0::2], xy[1::2]
    twice = float(x[:-1] @ y[1:] - x[1:] @ y[:-1]) + float(x[-1] * y[0] - x[0] * y[-1])
    if abs(twice) >= 2 * MIN_POLYGON_AREA:
        return None
    if len(set(zip(x.tolist(), y.tolist(), strict=True))) < 3:
        return "fewer than 3 distinct points"
    return "zero area"


def _valid_polygons(path: Path, where: str, seg: list[Any]) -> tuple[list[list[Any]], list[str]]:
    """Split a polygon segmentation into its valid polygons and the reasons for the others.

    Raises ``DataError`` for a coordinate that is not a finite number (a broken file, not a
    degenerate shape)."""
    valid: list[list[Any]] = []
    problems: list[str] = []
    for k, poly in enumerate(seg):
        if not isinstance(poly, list):
            problems.append(f"polygon {k} is a {type(poly).__name__}, not a list of coordinates")
            continue
        try:
            xy = np.asarray(poly)
            ok = xy.ndim == 1 and xy.dtype.kind in "iuf" and bool(np.isfinite(xy).all())
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise DataError(path, f"{where}: segmentation polygon {k} must be finite numbers "
                                  f"[x0, y0, x1, y1, ...], got {str(poly)[:80]}")
        why = _polygon_problem(xy.astype(np.float64, copy=False))
        if why is None:
            valid.append(poly)
        else:
            problems.append(f"polygon {k}: {why}")
    return valid, problems


def _to_rle(seg: Any, bbox: tuple[float, float, float, float], H: int, W: int,
            mask_utils: Any) -> dict[str, Any]:
    """One COCO segmentation (polygons, RLE, compressed RLE, or none) as a compressed RLE."""
    if seg is None:  # no segmentation at all: the filled box
        x, y, w, h = bbox
        return mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], H, W)[0]
    if isinstance(seg, list):  # invalid polygons were dropped when the JSON was parsed
        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polys:  # `segmentation: []`: empty mask
            return mask_utils.encode(np.zeros((H, W, 1), np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(polys, H, W))
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = [int(v) for v in seg["size"]]
        if size != [H, W]:
            raise DataError("", f"RLE size {size} differs from the image size [{H}, {W}] (HxW)")
        if isinstance(seg["counts"], list):
            return mask_utils.frPyObjects(seg, H, W)
        return seg
    raise DataError("", f"segmentation must be polygons or an RLE, got {type(seg).__name__}")


def _semantic_from_panoptic(ids: np.ndarray, segments: Iterable[dict[str, Any]]) -> np.ndarray:
    """Semantic map from a panoptic id map: segment -> its class index; void, crowd -> 255."""
    segs = [s for s in segments if not s["iscrowd"]]
    out = np.full(ids.shape, IGNORE_INDEX, np.int64)
    if not segs:
        return out
    seg_ids = np.array([s["id"] for s in segs], np.int64)
    labels = np.array([s["label"] for s in segs], np.int64)
    order = np.argsort(seg_ids)
    seg_ids, labels = seg_ids[order], labels[order]
    pos = np.searchsorted(seg_ids, ids).clip(0, len(seg_ids) - 1)
    hit = seg_ids[pos] == ids
    out[hit] = labels[pos[hit]]
    return out


def _card_from_jsons(inst: dict[str, Any] | None, kps: dict[str, Any] | None,
                     pan: dict[str, Any] | None, ds: CocoDataset) -> DatasetCard:
    base = pan if pan is not None else inst if inst is not None else kps
    if base is None:
        raise DataError(ds.image_dir, "no dataset card (meta.json) and no annotation JSON whose "
                                      "categories define the classes; write meta.json with at "
                                      f"least {CARD_EXAMPLE} (see {CARD_DOC})")
    source = ds.panoptic_json if pan is not None else (
        ds.instances_json if inst is not None else ds.keypoints_json)
    for i, c in enumerate(base["categories"]):
        _require(Path(str(source)), c, ("id", "name"), f"categories[{i}]")
    card = DatasetCard.from_coco_categories(base["categories"])
    declared = {s.category_id for s in card.keypoints}
    for extra in (inst, kps):
        if extra is None or extra is base:
            continue
        cats = [c for c in extra["categories"] if isinstance(c, dict) and c.get("keypoints")]
        for spec in DatasetCard.from_coco_categories(cats).keypoints:
            if spec.category_id not in declared:
                card.keypoints.append(spec)
                declared.add(spec.category_id)
    return card


def open_dataset(root: str | os.PathLike[str], split: str,
                 transforms: Callable[[Sample], Sample] | None = None, *,
                 label_kinds: Iterable[str] | None = None, depth_encoding: str = "mm",
                 semantic_values: str = "index") -> CocoDataset:
    """Open split ``split`` of the dataset at ``root``, detecting its layout.

    The densepipe layout (``meta.json`` / ``images/{split}/``) or a COCO 2017 folder
    (``{split}2017/`` + ``annotations/``). ``label_kinds``: the label kinds to decode (None: all;
    see ``CocoDataset``). ``depth_encoding`` and ``semantic_values`` (the ``folder`` format's
    ``data.options``; see ``CocoDataset``) say how the densepipe layout's depth files and
    semantic PNGs are read; a COCO 2017 folder has neither (its semantic labels come from the
    panoptic PNGs)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found (run `densepipe prepare`?)")
    layout = _layout(root, split)
    if layout == "densepipe":
        return CocoDataset.from_layout(root, split, transforms, label_kinds=label_kinds,
                                       depth_encoding=depth_encoding,
                                       semantic_values=semantic_values)
    if layout == "coco2017":
        return CocoDataset.from_coco2017(root, split, transforms, label_kinds=label_kinds)
    raise DataError(root, f"unknown dataset layout: expected densepipe's (meta.json, "
                          f"images/{split}/) or COCO 2017's ({split}2017/, annotations/)")


def _layout(root: Path, split: str) -> str | None:
    """``"densepipe"``, ``"coco2017"`` or None: how ``open_dataset`` reads ``root``."""
    if (root / "meta.json").exists() or (root / "images").is_dir():
        return "densepipe"
    ann = root / "annotations"
    if (root / f"{split}2017").is_dir() or any(
        (ann / f"{k}_{split}2017.json").exists()
        for k in ("instances", "person_keypoints", "panoptic")
    ):
        return "coco2017"
    return None


def _files_by_stem(names: Iterable[str], suffixes: Sequence[str]) -> dict[str, str]:
    """Label file names by file stem: those ending in one of ``suffixes`` (``.png`` exactly as
    written, as before; other suffixes in any case); a stem with several files takes the first
    suffix of ``suffixes``."""
    by_suffix: dict[str, list[str]] = {s: [] for s in suffixes}
    for n in names:
        for suf in suffixes:
            if n.endswith(suf) if suf == ".png" else n.lower().endswith(suf):
                by_suffix[suf].append(n)
                break
    out: dict[str, str] = {}
    for suf in suffixes:
        for n in sorted(by_suffix[suf]):
            out.setdefault(n[: -len(suf)], n)
    return out


def _has_label_file(folder: Path, suffixes: Sequence[str] = (".png",)) -> bool:
    if not folder.is_dir():
        return False
    with os.scandir(folder) as it:
        return bool(_files_by_stem((e.name for e in it), suffixes))


def _mentions(path: Path, needle: bytes) -> bool:
    """Whether the file's bytes contain ``needle`` (memory-mapped: no parse, no full copy)."""
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(needle) != -1


def split_label_kinds(root: str | os.PathLike[str], split: str, *,
                      depth_encoding: str = "mm") -> tuple[str, ...] | None:
    """The label kinds (``LABEL_KINDS``) split ``split`` of the dataset at ``root`` has, found
    from which files exist, without parsing any JSON: cheap enough to check before training.

    Never misses a kind ``open_dataset(root, split).label_kinds`` has (keypoints count when a
    person-keypoints JSON exists or the instances JSON mentions ``"keypoints"``); a label folder
    without a PNG counts as absent (a depth folder: without a file ``depth_encoding`` reads, see
    ``CocoDataset``). None when ``root`` is no dataset folder of a known layout."""
    root = Path(root)
    if not root.is_dir():
        return None
    layout = _layout(root, split)
    ann = root / "annotations"
    if layout == "densepipe":
        tag = split
        dense = {k: root / k / split for k in dense_kinds()}
    elif layout == "coco2017":
        tag = f"{split}2017"
        dense = {}
    else:
        return None
    inst, kps, pan = (ann / f"{k}_{tag}.json" for k in ("instances", "person_keypoints", "panoptic"))
    options = {"depth_encoding": depth_encoding}
    kinds = {k for k, d in dense.items() if _has_label_file(d, dense_kinds()[k].suffixes(options))}
    if inst.is_file() or kps.is_file():
        kinds.add("instances")
    if kps.is_file() or (inst.is_file() and _mentions(inst, b'"keypoints"')):
        kinds.add("keypoints")
    if pan.is_file():
        kinds.update(("panoptic", "semantic"))
    return ordered(kinds)
