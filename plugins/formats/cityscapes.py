"""The ``cityscapes`` dataset format: Cityscapes as published, read unchanged.

Layout (the cityscapesScripts conventions; ``stem`` = ``{city}_{seq}_{frame}``)::

    leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png      images (required)
    gtFine/{split}/{city}/{stem}_gtFine_labelIds.png       -> semantic
    gtFine/{split}/{city}/{stem}_gtFine_instanceIds.png    -> instances, panoptic
    disparity/{split}/{city}/{stem}_disparity.png          -> depth (data.options.depth: true)
    camera/{split}/{city}/{stem}_camera.json               (baseline, fx for depth)

Labels, as the official scripts define them:

- ``semantic``: the label ids of ``labelIds`` mapped to the 19 train ids (0..18, the card's class
  indices); every other value (void classes, classes ignored in evaluation such as parking or
  caravan, values the table lacks) is 255 = ignore. The licence plate (id -1) cannot be stored in
  a PNG; the official ``labelIds`` hold the car's id there.
- ``instances``: from ``instanceIds`` (16-bit): a value ``v >= 1000`` is one instance of label id
  ``v // 1000``; a value ``v < 1000`` is label id ``v`` without instance, which on a thing class
  is a crowd/group region (``iscrowd=True``, one per class). Only the 8 thing train classes
  (person, rider, car, truck, bus, train, motorcycle, bicycle) give instances; ``ids`` are the
  ``instanceIds`` values, ``boxes`` the tight xyxy boxes of the masks.
- ``panoptic``: derived from ``instanceIds`` as cityscapesScripts' ``createPanopticImgs`` does
  (with train ids): each distinct value of a train class is one segment whose id is that value
  (a stuff class is one segment per class, each thing instance one, a thing's group region one
  crowd segment); pixels of void/ignored classes are 0. ``category_id`` = the train id.
- ``depth``: ``disparity`` PNG value ``p > 0`` is disparity ``(p - 1) / 256`` pixels (0 =
  invalid); depth = ``extrinsic.baseline * intrinsic.fx / disparity`` metres from the image's
  camera JSON, 0 where invalid or the disparity is <= 0. Read only with ``depth: true``.

``label_kinds`` of a split: ``semantic`` when ``gtFine`` holds ``labelIds`` files for it,
``instances`` and ``panoptic`` when it holds ``instanceIds`` files, ``depth`` when enabled and
``disparity`` holds files for it. Decision for the ``test`` split: its public ``gtFine`` files are
placeholders (every pixel void), so a split named ``test`` reports no label kinds and its samples
carry images only; nothing is decoded to find that out. Within a split that has a kind, every image
must have its file: one missing is a ``DataError`` naming it at ``open``.

Samples are in sorted stem order with image ids 1..N; ``file_name`` is the image path relative to
``leftImg8bit/{split}`` (``{city}/{stem}_leftImg8bit.png``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from pipeline.data.card import IGNORE_INDEX, ClassInfo, DatasetCard
from pipeline.data.formats import DatasetFormat, SplitDataset, image_hw, wanted_label_kinds
from pipeline.data.reader import LABEL_KINDS, read_image, read_label, read_png
from pipeline.data.split_dataset import SampleDataset
from pipeline.data.transforms import masks_to_boxes
from pipeline.errors import DataError
from pipeline.hookspecs import hookimpl

__all__ = ["CITYSCAPES_CLASSES", "LABEL_TO_TRAIN", "CityscapesDataset", "CityscapesFormat",
           "CityscapesOptions"]

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
DISPARITY_SUFFIX = "_disparity.png"
CAMERA_SUFFIX = "_camera.json"
UNLABELLED_SPLITS = frozenset({"test"})
LAYOUT = "leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png (gtFine/{split}/<city>/ labels)"

# (label id, train id, name, colour, isthing) of the 19 train classes (official label table)
_TRAIN_CLASSES: tuple[tuple[int, int, str, tuple[int, int, int], bool], ...] = (
    (7, 0, "road", (128, 64, 128), False),
    (8, 1, "sidewalk", (244, 35, 232), False),
    (11, 2, "building", (70, 70, 70), False),
    (12, 3, "wall", (102, 102, 156), False),
    (13, 4, "fence", (190, 153, 153), False),
    (17, 5, "pole", (153, 153, 153), False),
    (19, 6, "traffic light", (250, 170, 30), False),
    (20, 7, "traffic sign", (220, 220, 0), False),
    (21, 8, "vegetation", (107, 142, 35), False),
    (22, 9, "terrain", (152, 251, 152), False),
    (23, 10, "sky", (70, 130, 180), False),
    (24, 11, "person", (220, 20, 60), True),
    (25, 12, "rider", (255, 0, 0), True),
    (26, 13, "car", (0, 0, 142), True),
    (27, 14, "truck", (0, 0, 70), True),
    (28, 15, "bus", (0, 60, 100), True),
    (31, 16, "train", (0, 80, 100), True),
    (32, 17, "motorcycle", (0, 0, 230), True),
    (33, 18, "bicycle", (119, 11, 32), True),
)  # fmt: skip

CITYSCAPES_CLASSES: tuple[ClassInfo, ...] = tuple(
    ClassInfo(train, name, color, thing) for _lid, train, name, color, thing in _TRAIN_CLASSES)
"""The card's classes: ``id`` = train id = class index."""

LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, np.uint8)
"""Lookup table label id (0..255) -> train id, 255 for every id outside the 19 train classes."""
for _lid, _train, *_ in _TRAIN_CLASSES:
    LABEL_TO_TRAIN[_lid] = _train
LABEL_TO_TRAIN.flags.writeable = False
_IS_THING = np.zeros(256, bool)
for _c in CITYSCAPES_CLASSES:
    _IS_THING[_c.id] = _c.isthing


class CityscapesOptions(BaseModel):
    """``data.options`` of ``cityscapes``."""

    model_config = ConfigDict(extra="forbid")
    depth: bool = False
    """Read ``disparity/`` + ``camera/`` as the ``depth`` label kind."""


def cityscapes_card() -> DatasetCard:
    """The card: the 19 train classes with their official names and colours."""
    return DatasetCard(name="cityscapes", classes=list(CITYSCAPES_CLASSES))


def _listing(folder: Path, suffix: str) -> dict[str, Path]:
    """``{stem: path}`` of ``folder/{city}/{stem}{suffix}`` (empty when ``folder`` is absent)."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for city in sorted(os.listdir(folder)):
        d = folder / city
        if not d.is_dir():
            continue
        for name in os.listdir(d):
            if name.endswith(suffix):
                out[name[: -len(suffix)]] = d / name
    return out


class CityscapesDataset(SampleDataset):
    """One split of a Cityscapes folder as a ``SplitDataset`` (module docstring: the rules).

    Construction lists the folders only; pixels are decoded per sample and only for
    ``loaded_kinds`` (semantic alone never opens an ``instanceIds`` file)."""

    def __init__(self, root: str | os.PathLike[str], split: str, *,
                 label_kinds: Iterable[str] | None = None, depth: bool = False,
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.card = cityscapes_card()
        wanted = wanted_label_kinds(label_kinds)
        self.image_dir = self.root / "leftImg8bit" / split
        if not self.image_dir.is_dir():
            raise DataError(self.image_dir, "folder not found: expected the Cityscapes layout "
                                            + LAYOUT.format(split=split))
        images = _listing(self.image_dir, IMAGE_SUFFIX)
        self.stems: list[str] = sorted(images)
        self._images = images
        self.image_ids: list[int] = list(range(1, len(self.stems) + 1))

        self._files: dict[str, dict[str, Path]] = {}
        if split not in UNLABELLED_SPLITS:
            gt = self.root / "gtFine" / split
            self._files["labelIds"] = _listing(gt, LABEL_SUFFIX)
            self._files["instanceIds"] = _listing(gt, INSTANCE_SUFFIX)
            if depth:
                self._files["disparity"] = _listing(self.root / "disparity" / split,
                                                    DISPARITY_SUFFIX)
                if self._files["disparity"]:
                    self._files["camera"] = _listing(self.root / "camera" / split, CAMERA_SUFFIX)
        for what, files in self._files.items():
            if files:
                self._require_all(what, files)

        kinds = set()
        if self._files.get("labelIds"):
            kinds.add("semantic")
        if self._files.get("instanceIds"):
            kinds.update(("instances", "panoptic"))
        if self._files.get("disparity"):
            kinds.add("depth")
        self.label_kinds: tuple[str, ...] = tuple(k for k in LABEL_KINDS if k in kinds)
        self.loaded_kinds: tuple[str, ...] = tuple(k for k in self.label_kinds if k in wanted)

    def _require_all(self, what: str, files: dict[str, Path]) -> None:
        """Every image has its ``what`` file once the split has any: else a ``DataError``."""
        missing = [s for s in self.stems if s not in files]
        if not missing:
            return
        folder, suffix = {
            "labelIds": ("gtFine", LABEL_SUFFIX), "instanceIds": ("gtFine", INSTANCE_SUFFIX),
            "disparity": ("disparity", DISPARITY_SUFFIX), "camera": ("camera", CAMERA_SUFFIX),
        }[what]
        stem = missing[0]
        city = Path(self._images[stem]).parent.name
        path = self.root / folder / self.split / city / f"{stem}{suffix}"
        more = f" ({len(missing)} images lack theirs)" if len(missing) > 1 else ""
        raise DataError(path, f"{what} file not found, while other images of split "
                              f"'{self.split}' have one{more}")

    # -- SplitDataset --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.stems)


    def image_hw(self, index: int) -> tuple[int, int]:
        """Sample ``index``'s (H, W) from the image header (no pixels decoded)."""
        return image_hw(self._images[self.stems[index]])

    def load(self, index: int) -> dict[str, Any]:
        """Sample ``index`` without transforms, with the labels of ``loaded_kinds`` only."""
        stem = self.stems[index]
        path = self._images[stem]
        image = read_image(path)
        hw = (int(image.shape[0]), int(image.shape[1]))
        sample: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "image_id": self.image_ids[index],
            "file_name": path.relative_to(self.image_dir).as_posix(),
            "meta": {"orig_size": hw},
        }
        kinds = self.loaded_kinds
        if "semantic" in kinds:
            label_ids = read_label(self._files["labelIds"][stem], "semantic", hw)
            sample["semantic"] = torch.from_numpy(LABEL_TO_TRAIN[label_ids].astype(np.int64))
        if "instances" in kinds or "panoptic" in kinds:
            inst = self._instance_ids(self._files["instanceIds"][stem], hw)
            if "instances" in kinds:
                sample["instances"] = _instances(inst)
            if "panoptic" in kinds:
                sample["panoptic"] = _panoptic(inst)
        if "depth" in kinds:
            sample["depth"] = torch.from_numpy(
                _depth(self._files["disparity"][stem], self._files["camera"].get(stem), hw))
        return sample

    @staticmethod
    def _instance_ids(path: Path, hw: tuple[int, int]) -> np.ndarray:
        arr, mode = read_png(path, "instanceIds PNG")
        ok = arr.ndim == 2 and (arr.dtype in (np.uint16, np.uint8) or mode == "I")
        if not ok or arr.shape != hw or (arr.size and int(arr.min()) < 0):
            raise DataError(path, f"expected a {hw[0]}x{hw[1]} (HxW, the image's size) 16-bit "
                                  f"single-channel instanceIds PNG, got {arr.shape} {arr.dtype} "
                                  f"(PNG mode {mode})")
        return arr.astype(np.int64)


def _train_ids(values: np.ndarray) -> np.ndarray:
    """Train id (255: none) of ``instanceIds`` values (``v // 1000`` from 1000 on, else ``v``)."""
    label = np.where(values >= 1000, values // 1000, values)
    out = np.full(label.shape, IGNORE_INDEX, np.int64)
    ok = (label >= 0) & (label < 256)
    out[ok] = LABEL_TO_TRAIN[label[ok]]
    return out


def _instances(inst: np.ndarray) -> dict[str, torch.Tensor]:
    """Thing instances (and crowd regions) of an ``instanceIds`` map (int64 HxW)."""
    values = np.unique(inst)
    train = _train_ids(values)
    keep = _IS_THING[train]
    values, train = values[keep], train[keep]
    H, W = inst.shape
    masks = torch.from_numpy(inst[None] == values[:, None, None]) if len(values) else \
        torch.zeros((0, H, W), dtype=torch.bool)
    return {
        "boxes": masks_to_boxes(masks),
        "labels": torch.from_numpy(train.astype(np.int64)),
        "masks": masks,
        "iscrowd": torch.from_numpy(values < 1000),
        "ids": torch.from_numpy(values.astype(np.int64)),
    }


def _panoptic(inst: np.ndarray) -> dict[str, Any]:
    """Panoptic ids (segment id = the ``instanceIds`` value, 0 = void) and segments."""
    values, inverse = np.unique(inst, return_inverse=True)
    train = _train_ids(values)
    kept = train != IGNORE_INDEX
    ids = np.where(kept, values, 0)[inverse.reshape(inst.shape)].astype(np.int64)
    segments = []
    for v, t in zip(values[kept].tolist(), train[kept].tolist(), strict=True):
        thing = bool(_IS_THING[t])
        segments.append({"id": int(v), "category_id": int(t), "isthing": thing,
                         "iscrowd": bool(thing and v < 1000)})
    return {"ids": torch.from_numpy(ids), "segments": segments}


def _depth(disparity: Path, camera: Path | None, hw: tuple[int, int]) -> np.ndarray:
    """Depth in metres (float32 HxW, 0 = unknown) from a disparity PNG and its camera JSON."""
    if camera is None:  # _require_all saw to it; kept for a file removed since open
        raise DataError(disparity, "no camera JSON for this disparity map")
    arr, mode = read_png(disparity, "disparity PNG")
    if arr.ndim != 2 or arr.shape != hw or not (arr.dtype == np.uint16 or mode == "I"):
        raise DataError(disparity, f"expected a {hw[0]}x{hw[1]} (HxW, the image's size) uint16 "
                                   f"single-channel disparity PNG, got {arr.shape} {arr.dtype} "
                                   f"(PNG mode {mode})")
    try:
        cam = json.loads(camera.read_text())
        baseline = float(cam["extrinsic"]["baseline"])
        fx = float(cam["intrinsic"]["fx"])
    except FileNotFoundError as e:
        raise DataError(camera, "camera JSON not found") from e
    except json.JSONDecodeError as e:
        raise DataError(camera, f"not valid JSON ({e.msg} at line {e.lineno})") from e
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(camera, f"expected extrinsic.baseline and intrinsic.fx numbers "
                                f"({type(e).__name__}: {e})") from e
    p = arr.astype(np.float64)
    disp = np.where(p > 0, (p - 1.0) / 256.0, 0.0)
    valid = disp > 0
    depth = np.zeros(hw, np.float64)
    depth[valid] = baseline * fx / disp[valid]
    return depth.astype(np.float32)


class CityscapesFormat(DatasetFormat):
    name = "cityscapes"
    summary = ("Cityscapes as published: leftImg8bit/<split>/<city>/, gtFine labelIds + "
               "instanceIds (19 train classes), optional disparity + camera depth")
    Options = CityscapesOptions

    def open(self, root: Path, split: str, *, label_kinds: Iterable[str] | None = None,
             options: BaseModel) -> SplitDataset:
        return CityscapesDataset(root, split, label_kinds=label_kinds,
                                 depth=bool(getattr(options, "depth", False)))

    def ready(self, root: Path, *, options: BaseModel) -> bool:
        return (root / "leftImg8bit").is_dir()


@hookimpl
def densepipe_register_dataset_formats() -> list[DatasetFormat]:
    return [CityscapesFormat()]
