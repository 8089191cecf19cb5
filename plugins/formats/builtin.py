"""The built-in dataset formats: ``synthetic``, ``folder`` and ``coco``.

``folder`` reads densepipe's own layout (``meta.json``, ``images/<split>/``, label folders; see
docs/own-data.md) or, when there is none, a COCO 2017 folder; ``coco`` reads only COCO 2017's
(``<split>2017/`` + ``annotations/{instances,person_keypoints,panoptic}_<split>2017.json``);
``synthetic`` is the folder ``prepare`` renders (densepipe's layout).

``folder``'s ``data.options`` (``FolderOptions``) say how the densepipe layout's label files are
encoded: ``depth_encoding`` (``mm`` default, ``kitti``, ``float``) and ``semantic_values``
(``index`` default, ``category_id``); see docs/own-data.md, "Label encodings". ``synthetic``
(always written in the defaults) and ``coco`` (no depth, semantic from panoptic) take none."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from pipeline.data.formats import DatasetFormat, NoFormatOptions, SplitDataset
from pipeline.data.reader import CocoDataset, open_dataset, split_label_kinds
from pipeline.hookspecs import hookimpl

# Imports inside functions: the dataset check, when `prepare` checks a folder: the train and
# evaluate stages do not depend on it (dvc.yaml).


class FolderOptions(BaseModel):
    """``data.options`` of ``data.source: folder``: how label files are encoded."""

    model_config = ConfigDict(extra="forbid")

    depth_encoding: Literal["mm", "kitti", "float"] = "mm"
    """``depth/{split}/`` files: ``mm`` uint16 PNG millimetres (0 unknown); ``kitti`` uint16 PNG
    metres x 256 (KITTI depth benchmark, 0 unknown); ``float`` 32-bit float TIFF (PIL mode F) or
    ``.npy`` float array in metres (non-finite or <= 0 unknown)."""
    semantic_values: Literal["index", "category_id"] = "index"
    """``semantic/{split}/`` PNG values: ``index`` the class position in the dataset card
    (0..C-1); ``category_id`` the card's class ``id`` (VOC-style). 255 = ignore in both."""


def _encodings(options: BaseModel) -> dict[str, str]:
    """``depth_encoding``/``semantic_values`` of ``options`` (defaults for formats without)."""
    return {"depth_encoding": getattr(options, "depth_encoding", "mm"),
            "semantic_values": getattr(options, "semantic_values", "index")}


class FolderFormat(DatasetFormat):
    name = "folder"
    summary = "densepipe's layout (meta.json, images/<split>/, label PNG folders) or a COCO 2017 folder"
    Options: ClassVar[type[BaseModel]] = FolderOptions

    def open(self, root: Path, split: str, *, label_kinds: Iterable[str] | None = None,
             options: BaseModel) -> SplitDataset:
        return open_dataset(root, split, label_kinds=label_kinds, **_encodings(options))

    def split_label_kinds(self, root: Path, split: str, *,
                          options: BaseModel) -> tuple[str, ...] | None:
        return split_label_kinds(root, split,
                                 depth_encoding=_encodings(options)["depth_encoding"])

    def ready(self, root: Path, *, options: BaseModel) -> bool:
        return (root / "meta.json").exists()

    def check(self, root: Path, splits: Sequence[str], *, options: BaseModel,
              workers: int | None = None) -> dict[str, Any]:
        from pipeline.data.check import check_dataset

        return check_dataset(root, tuple(splits), workers=workers, **_encodings(options))


class SyntheticFormat(FolderFormat):
    name = "synthetic"
    summary = "the built-in synthetic world, rendered into data.root by prepare (densepipe's layout)"
    Options: ClassVar[type[BaseModel]] = NoFormatOptions  # prepare writes mm depth, index PNGs


class CocoFormat(FolderFormat):
    name = "coco"
    summary = ("COCO 2017 as published: <split>2017/ and annotations/{instances,person_keypoints,"
               "panoptic}_<split>2017.json (+ panoptic_<split>2017/); semantic from panoptic")
    Options: ClassVar[type[BaseModel]] = NoFormatOptions  # no depth or semantic PNGs to decode

    def open(self, root: Path, split: str, *, label_kinds: Iterable[str] | None = None,
             options: BaseModel) -> SplitDataset:
        return CocoDataset.from_coco2017(root, split, label_kinds=label_kinds)

    def ready(self, root: Path, *, options: BaseModel) -> bool:
        return (root / "annotations").is_dir()


@hookimpl
def densepipe_register_dataset_formats() -> list[DatasetFormat]:
    return [SyntheticFormat(), FolderFormat(), CocoFormat()]
