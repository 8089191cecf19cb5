"""The ``nyuv2`` dataset format: NYUv2 as the multi-task literature publishes it (MTAN, LibMTL).

Layout (read unchanged; one ``.npy`` array per sample and kind, file stem = sample index)::

    {root}/{train,val}/image/{index}.npy    float HxWx3, RGB in 0..1 (uint8 0..255 also accepted)
    {root}/{train,val}/label/{index}.npy    HxW class indices, -1 = not labelled (255 also accepted)
    {root}/{train,val}/depth/{index}.npy    float HxWx1 (or HxW) metres, 0 = no measurement
    {root}/{train,val}/normal/{index}.npy   float HxWx3 unit vectors, all-zero = no normal

MTAN's preprocessing has 795 train / 654 val samples at 288x384 (HxW). A split folder named
``test`` serves densepipe's ``val`` when there is no ``val`` folder (``split_dirs`` names others).

How to obtain it (nothing is downloaded by densepipe): the preprocessed NYUv2 of Liu et al.,
"End-to-End Multi-Task Learning with Attention" (CVPR 2019), linked from the README of
github.com/lorenmt/mtan ("Download our pre-processed NYUv2 dataset here", a Dropbox folder
https://www.dropbox.com/sh/86nssgwm6hm3vkb/AACrnUQ4GxpdrBbLjb6n-mWNa?dl=0) and from LibMTL's
examples/nyu/README.md. Unpack it so that ``{root}/train/image/0.npy`` exists.

Conventions, as established from LibMTL ``examples/nyu/create_dataset.py`` + ``utils.py`` and
MTAN ``im2im_pred/create_dataset.py`` (their loaders move the last axis first, so arrays are
channels-last; their losses and metrics define the invalid values):

- image: HxWx3, float in 0..1 (MTAN/LibMTL feed it to the network unnormalised); densepipe's
  image is ``round(255 * value)`` as uint8 3xHxW.
- label: the 13-class NYUv2 labels of SceneNet / ankurhanda/nyuv2-meta-data (0 = unknown,
  1..13 = bed .. window) shifted down by one, so -1 = unknown (``CrossEntropyLoss(ignore_index=-1)``;
  the metric counts ``0 <= gt < 13``); stored as float or int. densepipe: class ``value``,
  -1 -> 255 (255 in the file is taken as ignore too). ``classes: 40`` reads NYU-40 labels stored
  the same way (0..39 = wall .. otherprop of Gupta et al., -1 or 255 = ignore); a preparation
  that stores 1..40 with 0 = void must be shifted first (indistinguishable from 0..39 here).
- depth: metres (their augmentation divides it by the zoom, their depth error is in metres);
  0 = invalid (mask ``sum(gt) != 0``). Non-finite values are read as 0 (unknown).
- normal: unit vectors (their metric: "gt has been normalized"), all-zero = invalid; channel 0
  is the image-horizontal axis (their horizontal flip negates channel 0 only). The signs of the
  other axes are *not* stated by either source (the normals are Eigen & Fergus's precomputed
  ones, cs.nyu.edu/~deigen/dnl). Assumption: the stored vectors already are OpenCV camera-frame
  (x right, y down, z forward) and are kept as they are (renormalised to unit length, invalid
  -> 0). If a visual check shows otherwise, ``normal_signs`` multiplies each channel, e.g.
  ``[1, -1, -1]`` for an OpenGL-style (x right, y up, z backward) frame.

``.png`` variants are not read: neither loader supports them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.card import IGNORE_INDEX, ClassInfo, DatasetCard
from pipeline.data.formats import (
    DatasetFormat,
    SplitDataset,
    image_ids_of,
    numeric_stems,
    wanted_label_kinds,
)
from pipeline.data.split_dataset import SampleDataset
from pipeline.errors import DataError
from pipeline.hookspecs import hookimpl

__all__ = ["CLASSES_13", "CLASSES_40", "NYUv2Dataset", "NYUv2Format", "NYUv2Options"]

CLASSES_13 = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "painting",
              "sofa", "table", "tv", "wall", "window")
"""The 13 classes (SceneNet / nyuv2-meta-data order, without its 0 = unknown)."""
CLASSES_40 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)
"""NYU-40 (Gupta et al. 2013), in label order 0..39."""
_STUFF = {"wall", "floor", "ceiling", "window", "door", "blinds", "curtain", "floor mat",
          "otherstructure"}
# densepipe label kind -> MTAN/LibMTL folder name
KIND_DIRS = {"semantic": "label", "depth": "depth", "normals": "normal"}
NPY = ".npy"


class NYUv2Options(BaseModel):
    """``data.options`` of ``nyuv2``."""

    model_config = ConfigDict(extra="forbid")

    classes: Literal[13, 40] = 13
    """Label set of the ``label`` arrays: 13 (MTAN/LibMTL) or NYU-40 (values 0..39)."""
    split_dirs: dict[str, str] = Field(default_factory=dict)
    """densepipe split -> folder under root (default: the split's name; ``val`` falls back to
    ``test`` when there is no ``val`` folder)."""
    normal_signs: tuple[Literal[-1, 1], Literal[-1, 1], Literal[-1, 1]] = (1, 1, 1)
    """Per-channel sign applied to the stored normals to reach OpenCV's camera frame."""


def _palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` display colours (RGB 0..255), the same every run."""
    rgb = np.random.default_rng(13).integers(40, 256, (n, 3))
    return [(int(r), int(g), int(b)) for r, g, b in rgb]


def make_card(classes: int) -> DatasetCard:
    """The dataset card of the 13- or 40-class label set (class index = label value)."""
    names = CLASSES_13 if classes == 13 else CLASSES_40
    infos = [ClassInfo(i, n, col, n not in _STUFF)
             for i, (n, col) in enumerate(zip(names, _palette(len(names)), strict=True))]
    return DatasetCard(name=f"nyuv2-{classes}", classes=infos)


def _load(path: Path, *, mmap: bool = False) -> np.ndarray:
    """The array in ``path``; a missing or unreadable file is a ``DataError`` naming it."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except (OSError, ValueError, EOFError) as e:
        raise DataError(path, f"not a .npy array numpy can read ({' '.join(str(e).split())})") from e
    if not isinstance(arr, np.ndarray):
        raise DataError(path, "expected one .npy array, found an .npz archive")
    return arr


def _shape(arr: np.ndarray) -> str:
    return "x".join(str(s) for s in arr.shape) or "scalar"


def _image_shape(arr: np.ndarray, path: Path) -> tuple[int, int]:
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(path, f"image array is {_shape(arr)} ({arr.dtype}); expected HxWx3 "
                              "(RGB, float 0..1 or uint8)")
    if not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(path, f"image array has dtype {arr.dtype}; expected float (0..1) or uint8")
    return int(arr.shape[0]), int(arr.shape[1])


def _map(arr: np.ndarray, path: Path, kind: str, hw: tuple[int, int], last: int) -> np.ndarray:
    """``arr`` as HxW (``last`` = 1: HxW or HxWx1) or HxWx3 (``last`` = 3), checked against the
    image size ``hw``."""
    ok_shape = (arr.shape[:2] == hw and
                ((last == 1 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1)))
                 or (last == 3 and arr.ndim == 3 and arr.shape[2] == 3)))
    if not ok_shape:
        want = f"{hw[0]}x{hw[1]}" + ("" if last == 1 else "x3")
        alt = f" or {hw[0]}x{hw[1]}x1" if last == 1 and kind == "depth" else ""
        raise DataError(path, f"{kind} array is {_shape(arr)}; expected {want}{alt} (the size of "
                              "its image)")
    numeric = np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    if not numeric or (kind != "label" and not np.issubdtype(arr.dtype, np.floating)):
        want = "integers or integral floats" if kind == "label" else "floats"
        raise DataError(path, f"{kind} array has dtype {arr.dtype}; expected {want}")
    return arr.reshape(hw) if last == 1 else arr


def image_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """HxWx3 float 0..1 (or uint8) -> uint8 3xHxW, ``round(255 * value)``."""
    _image_shape(arr, path)
    if arr.dtype == np.uint8:
        out = np.asarray(arr)
    else:
        a = np.asarray(arr, dtype=np.float32)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise DataError(path, f"image values span {lo:g}..{hi:g}; expected floats in 0..1 "
                                  "(MTAN/LibMTL's preprocessing)")
        out = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def semantic_labels(arr: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    """HxW label array -> int64 HxW class indices, -1 and 255 -> ``IGNORE_INDEX``. Values that
    are not integers, or outside ``0..num_classes-1``, are a ``DataError``."""
    a = np.asarray(arr)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.rint(a)):
            raise DataError(path, "label array holds non-integer values; expected class indices "
                                  f"0..{num_classes - 1} (-1 = ignore)")
    lab = a.astype(np.int64)
    ignore = (lab == -1) | (lab == IGNORE_INDEX)
    bad = ~ignore & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        vals = np.unique(lab[bad])
        shown = ", ".join(str(v) for v in vals[:5]) + (", ..." if len(vals) > 5 else "")
        raise DataError(path, f"label values {shown} ({int(bad.sum())} pixels) outside the "
                              f"{num_classes} classes 0..{num_classes - 1} (-1 or 255 = ignore; "
                              "data.options.classes picks 13 or 40)")
    lab[ignore] = IGNORE_INDEX
    return lab


def depth_metres(arr: np.ndarray, path: Path) -> np.ndarray:
    """HxW float depth in metres, 0 = unknown (non-finite -> 0); negative values: ``DataError``."""
    d = np.array(arr, dtype=np.float32)
    d[~np.isfinite(d)] = 0.0
    if (d < 0).any():
        raise DataError(path, f"depth array has negative values (min {float(d.min()):g}); "
                              "expected metres >= 0 (0 = unknown)")
    return d


def normals_opencv(arr: np.ndarray, signs: tuple[int, int, int] = (1, 1, 1)) -> np.ndarray:
    """HxWx3 stored normals -> float32 3xHxW unit vectors (times ``signs`` per channel); an
    all-zero or non-finite vector -> 0 (unknown)."""
    n = np.array(arr, dtype=np.float32).transpose(2, 0, 1)
    n[:, ~np.isfinite(n).all(axis=0)] = 0.0
    norm = np.sqrt((n * n).sum(axis=0))
    valid = norm > 1e-6
    n = np.where(valid, n / np.where(valid, norm, 1.0), 0.0).astype(np.float32)
    n *= np.asarray(signs, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray(n)


def _npy_stems(folder: Path) -> list[str]:
    try:
        return [n[:-len(NPY)] for n in os.listdir(folder) if n.endswith(NPY)]
    except (FileNotFoundError, NotADirectoryError):
        return []


class NYUv2Dataset(SampleDataset):
    """One split of MTAN/LibMTL's NYUv2 folder (see the module docstring) as a ``SplitDataset``.

    Samples are in index order (numeric stems sorted as numbers); ``image_ids`` are the stems
    when all are distinct integers, else 1..N. ``label_kinds``: those of semantic/depth/normals
    whose folder holds a ``.npy``; a sample whose file is missing lacks that key."""

    def __init__(self, root: Path, split: str, *, label_kinds: Iterable[str] | None = None,
                 options: NYUv2Options | None = None) -> None:
        self.options = options or NYUv2Options()
        self.root = Path(root)
        self.split = split
        self.split_dir = self._split_dir()
        self.image_dir = self.split_dir / "image"
        if not self.image_dir.is_dir():
            raise DataError(self.image_dir, "NYUv2 image folder not found; expected MTAN/LibMTL's "
                                            "preprocessed layout {root}/{train,val}/{image,label,"
                                            "depth,normal}/{index}.npy (see the nyuv2 format's "
                                            "docstring for how to obtain it)")
        stems = _npy_stems(self.image_dir)
        self.stems = sorted(stems, key=int) if numeric_stems(stems) else sorted(stems)
        self.image_ids = image_ids_of(self.stems)
        self.card = make_card(self.options.classes)
        self._files: dict[str, set[str]] = {
            kind: set(_npy_stems(self.split_dir / d)) for kind, d in KIND_DIRS.items()}
        self.label_kinds = tuple(k for k in KIND_DIRS if self._files[k])
        wanted = wanted_label_kinds(label_kinds)
        self.loaded_kinds = tuple(k for k in self.label_kinds if k in wanted)
        self.transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def _split_dir(self) -> Path:
        name = self.options.split_dirs.get(self.split, self.split)
        folder = self.root / name
        if (self.split not in self.options.split_dirs and self.split == "val"
                and not folder.is_dir() and (self.root / "test").is_dir()):
            folder = self.root / "test"
        return folder

    def __len__(self) -> int:
        return len(self.stems)

    def _path(self, folder: str, index: int) -> Path:
        return self.split_dir / folder / f"{self.stems[index]}{NPY}"

    def image_hw(self, index: int) -> tuple[int, int]:
        """(H, W) of sample ``index`` from the array header (memory-mapped, pixels not read)."""
        path = self._path("image", index)
        return _image_shape(_load(path, mmap=True), path)

    def load(self, index: int) -> dict[str, Any]:
        """Sample ``index`` without transforms, with the kinds of ``loaded_kinds`` only."""
        path = self._path("image", index)
        image = image_uint8(_load(path), path)
        hw = (int(image.shape[1]), int(image.shape[2]))
        sample: dict[str, Any] = {
            "image": torch.from_numpy(image),
            "image_id": self.image_ids[index],
            "file_name": f"{self.stems[index]}{NPY}",
            "meta": {"orig_size": hw},
        }
        stem = self.stems[index]
        for kind in self.loaded_kinds:
            if stem not in self._files[kind]:
                continue
            p = self._path(KIND_DIRS[kind], index)
            if kind == "semantic":
                arr = _map(_load(p, mmap=True), p, "label", hw, 1)
                sample["semantic"] = torch.from_numpy(
                    semantic_labels(arr, p, self.card.num_classes))
            elif kind == "depth":
                arr = _map(_load(p, mmap=True), p, "depth", hw, 1)
                sample["depth"] = torch.from_numpy(depth_metres(arr, p))
            else:
                arr = _map(_load(p, mmap=True), p, "normal", hw, 3)
                sample["normals"] = torch.from_numpy(
                    normals_opencv(arr, self.options.normal_signs))
        return sample



class NYUv2Format(DatasetFormat):
    name = "nyuv2"
    summary = ("NYUv2 as preprocessed by MTAN/LibMTL: {train,val}/{image,label,depth,normal}/"
               "<index>.npy (13-class semantic, depth in metres, surface normals)")
    Options = NYUv2Options

    def open(self, root: Path, split: str, *, label_kinds: Iterable[str] | None = None,
             options: BaseModel) -> SplitDataset:
        assert isinstance(options, NYUv2Options)
        return NYUv2Dataset(Path(root), split, label_kinds=label_kinds, options=options)


@hookimpl
def densepipe_register_dataset_formats() -> list[DatasetFormat]:
    return [NYUv2Format()]
