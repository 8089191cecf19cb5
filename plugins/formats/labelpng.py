"""Label-PNG datasets as published: ``ade20k`` (ADEChallengeData2016) and ``voc`` (Pascal VOC 2012).

Both are semantic-only: one 8-bit label PNG per image, same file stem, read unchanged.

- ``ade20k``: ``images/{training,validation}/ADE_*.jpg`` + ``annotations/{training,validation}/
  ADE_*.png``; split ``train``/``val`` mean ``training``/``validation`` (the literal folder names
  work too). PNG value 0 ("other objects") -> 255 (ignore), ``v`` in 1..150 -> ``v - 1`` (MMSeg's
  ``reduce_zero_label``); 255 stays ignore; anything else is a ``DataError``. The card lists the
  150 classes of SceneParsing's ``objectInfo150.txt`` (first name of each line, ``id`` = the PNG
  value), all ``isthing=False`` (semantic only), colours from the card's fallback palette.
- ``voc``: ``JPEGImages/<stem>.jpg`` + ``SegmentationClass/<stem>.png`` (palette PNGs: the pixel
  *index* is the class) for the stems listed in ``ImageSets/Segmentation/<split>.txt``; option
  ``label_dir`` picks another label folder (``SegmentationClassAug``: SBD-augmented grayscale PNGs,
  same values). Values 0..20 are the 21 classes (0 = background), 255 = boundary/ignore; 21..254
  are a ``DataError``. The card has the VOC colour map; the 20 object classes are things.

``root`` may also be the folder above the dataset (``ADEChallengeData2016/``, ``VOC2012/`` or
``VOCdevkit/VOC2012/`` inside it). Images are read upright (EXIF) as RGB; a label PNG must have the
upright image's size. An image without a label PNG is a sample without ``semantic``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from pipeline.data.card import IGNORE_INDEX, DatasetCard
from pipeline.data.formats import DatasetFormat, SplitDataset, image_hw, wanted_label_kinds
from pipeline.data.reader import (
    IMAGE_SUFFIXES,
    check_semantic_values,
    read_image,
    read_label,
)
from pipeline.data.split_dataset import SampleDataset
from pipeline.errors import DataError
from pipeline.hookspecs import hookimpl

__all__ = ["ADE20K_CLASSES", "VOC_CLASSES", "Ade20kFormat", "LabelPngDataset", "VocFormat",
           "voc_colormap"]

# SceneParsing objectInfo150.txt, first name of each line, in index order (PNG value 1..150).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall",
    "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag",
)  # fmt: skip

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

ADE_SPLITS = {"train": "training", "val": "validation"}
VOC_SPLITS = ("train", "val", "trainval")


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The Pascal VOC colour map (devkit's ``labelcolormap``): the bits of index ``i`` spread over
    R, G, B from the most significant bit down. ``voc_colormap()[255] == (224, 224, 192)``."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def ade20k_card() -> DatasetCard:
    """The ADE20K SceneParsing card: 150 classes, ``id`` = the PNG value (1..150), all stuff."""
    return DatasetCard.from_json({
        "name": "ade20k",
        "classes": [{"id": i + 1, "name": n, "isthing": 0} for i, n in enumerate(ADE20K_CLASSES)],
    })


def voc_card() -> DatasetCard:
    """The Pascal VOC 2012 card: 21 classes (``id`` = the PNG value), VOC colours, the 20
    object classes are things."""
    cmap = voc_colormap(len(VOC_CLASSES))
    return DatasetCard.from_json({
        "name": "voc",
        "classes": [{"id": i, "name": n, "color": list(cmap[i]), "isthing": int(i > 0)}
                    for i, n in enumerate(VOC_CLASSES)],
    })


def _ade_decode(raw: np.ndarray, path: Path, card: DatasetCard) -> np.ndarray:
    """ADE PNG values -> class indices: 0 -> 255, v -> v - 1 (1..150), 255 stays 255."""
    counts = np.bincount(raw.ravel(), minlength=256)
    values = np.flatnonzero(counts)
    n = card.num_classes
    bad = values[(values > n) & (values != IGNORE_INDEX)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:5]) + (
            f" and {bad.size - 5} more" if bad.size > 5 else "")
        noun = "value" if bad.size == 1 else "values"
        raise DataError(path, f"ADE20K label {noun} {shown} ({int(counts[bad].sum())} pixels) out "
                              f"of range: expected 0..{n} (0 = other objects, ignored; 1..{n} "
                              f"the {n} classes of dataset card '{card.name}') or 255 (ignore)")
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[1:n + 1] = np.arange(n, dtype=np.uint8)
    return lut[raw]


def _voc_decode(raw: np.ndarray, path: Path, card: DatasetCard) -> np.ndarray:
    """VOC PNG values are class indices already (0..20, 255 = ignore)."""
    check_semantic_values(raw, path, card)
    return raw


class LabelPngDataset(SampleDataset):
    """One split of a label-PNG dataset (a ``SplitDataset``): ``items`` are (image, label PNG or
    None) pairs in sample order, image ids 1..N; ``decode(raw, path, card)`` turns a stored uint8
    label map into class indices (255 = ignore), raising ``DataError`` for a value outside the
    card. Label PNGs are decoded only when ``semantic`` was asked for."""

    def __init__(self, card: DatasetCard, items: list[tuple[Path, Path | None]],
                 decode: Callable[[np.ndarray, Path, DatasetCard], np.ndarray],
                 label_kinds: Iterable[str] | None = None) -> None:
        self.card = card
        self.items = items
        self.decode = decode  # module-level function: picklable for loader processes
        self.image_ids = list(range(1, len(items) + 1))
        has = any(label is not None for _, label in items)
        self.label_kinds: tuple[str, ...] = ("semantic",) if has else ()
        self.loaded_kinds = tuple(k for k in self.label_kinds if k in wanted_label_kinds(label_kinds))
        self.transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.items)


    def image_hw(self, index: int) -> tuple[int, int]:
        """Upright (H, W) of sample ``index`` from the image header (no pixels decoded)."""
        return image_hw(self.items[index][0])

    def load(self, index: int) -> dict[str, Any]:
        """Sample ``index`` without transforms (``semantic`` only when loaded and present)."""
        img_path, label_path = self.items[index]
        image = read_image(img_path)
        hw = (int(image.shape[0]), int(image.shape[1]))
        sample: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "image_id": self.image_ids[index],
            "file_name": img_path.name,
            "meta": {"orig_size": hw},
        }
        if label_path is not None and "semantic" in self.loaded_kinds:
            raw = read_label(label_path, "semantic", hw)
            sem = self.decode(raw, label_path, self.card)
            sample["semantic"] = torch.from_numpy(sem.astype(np.int64))
        return sample


def _find_root(root: Path, marker: str, inner: tuple[str, ...]) -> Path:
    """``root`` itself when it holds ``marker``, else the first of ``root/inner`` that does."""
    if (root / marker).is_dir():
        return root
    for sub in inner:
        if (root / sub / marker).is_dir():
            return root / sub
    return root


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file for the files of ``folder`` with one of ``suffixes`` (empty when absent)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file()}


class Ade20kOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Ade20kFormat(DatasetFormat):
    name = "ade20k"
    summary = ("ADE20K SceneParsing (ADEChallengeData2016) as published: images/{training,"
               "validation}/*.jpg + annotations/{training,validation}/*.png, 150 classes")
    Options: ClassVar[type[BaseModel]] = Ade20kOptions
    INNER: ClassVar[tuple[str, ...]] = ("ADEChallengeData2016",)

    def open(self, root: Path, split: str, *, label_kinds: Iterable[str] | None = None,
             options: BaseModel) -> SplitDataset:
        base = _find_root(Path(root), "images", self.INNER)
        folder = ADE_SPLITS.get(split, split)
        img_dir = base / "images" / folder
        if not img_dir.is_dir():
            raise DataError(img_dir, f"no image folder for split '{split}': expected ADE20K's "
                                     "images/{training,validation}/ADE_*.jpg (data.source ade20k; "
                                     "split train = training, val = validation)")
        images = _files(img_dir, IMAGE_SUFFIXES)
        labels = _files(base / "annotations" / folder, (".png",))
        items = [(images[s], labels.get(s)) for s in sorted(images)]
        return LabelPngDataset(ade20k_card(), items, _ade_decode, label_kinds)

    def ready(self, root: Path, *, options: BaseModel) -> bool:
        return (_find_root(Path(root), "images", self.INNER) / "images").is_dir()


class VocOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label_dir: str = "SegmentationClass"
    """Label PNG folder under the VOC root: SegmentationClass (palette PNGs) or
    SegmentationClassAug (SBD-augmented grayscale PNGs); same values either way."""


class VocFormat(DatasetFormat):
    name = "voc"
    summary = ("Pascal VOC 2012 as published: JPEGImages/*.jpg + SegmentationClass/*.png (or "
               "options.label_dir), split lists ImageSets/Segmentation/<split>.txt, 21 classes")
    Options: ClassVar[type[BaseModel]] = VocOptions
    INNER: ClassVar[tuple[str, ...]] = ("VOC2012", "VOCdevkit/VOC2012")

    def open(self, root: Path, split: str, *, label_kinds: Iterable[str] | None = None,
             options: BaseModel) -> SplitDataset:
        assert isinstance(options, VocOptions)
        base = _find_root(Path(root), "JPEGImages", self.INNER)
        lists = base / "ImageSets" / "Segmentation"
        listing = lists / f"{split}.txt"
        if not listing.is_file():
            have = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
            raise DataError(listing, f"no split list for split '{split}': expected Pascal VOC's "
                                     "ImageSets/Segmentation/<split>.txt (one image stem a line; "
                                     f"present: {', '.join(have) or 'none'})")
        stems = sorted({s.split()[0] for s in listing.read_text().splitlines() if s.strip()})
        img_dir = base / "JPEGImages"
        images = _files(img_dir, IMAGE_SUFFIXES)
        missing = [s for s in stems if s not in images]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(img_dir, f"{len(missing)} image(s) listed in {listing.name} not "
                                     f"found: {', '.join(missing[:5])}{more} (expected "
                                     "JPEGImages/<stem>.jpg)")
        label_dir = base / options.label_dir
        if options.label_dir != VocOptions().label_dir and not label_dir.is_dir():
            raise DataError(label_dir, "label folder of data.options.label_dir not found: "
                                       "expected label PNGs <stem>.png there")
        labels = _files(label_dir, (".png",))
        items = [(images[s], labels.get(s)) for s in stems]
        return LabelPngDataset(voc_card(), items, _voc_decode, label_kinds)

    def ready(self, root: Path, *, options: BaseModel) -> bool:
        base = _find_root(Path(root), "JPEGImages", self.INNER)
        return (base / "JPEGImages").is_dir() and (base / "ImageSets" / "Segmentation").is_dir()


@hookimpl
def densepipe_register_dataset_formats() -> list[DatasetFormat]:
    return [Ade20kFormat(), VocFormat()]
