"""The built-in dataset formats: ``synthetic``, ``folder`` and ``coco``.

``folder`` reads densepipe's own layout (``meta.json``, ``images/<split>/``, label folders; see
docs/own-data.md) or, when there is none, a COCO 2017 folder; ``coco`` reads only COCO 2017's
(``<split>2017/`` + ``annotations/{instances,person_keypoints,panoptic}_<split>2017.json``);
``synthetic`` is the folder ``prepare`` renders (densepipe's layout)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.data.formats import DatasetFormat, SplitDataset
from pipeline.hookspecs import hookimpl


class FolderFormat(DatasetFormat):
    name = "folder"
    summary = "densepipe's layout (meta.json, images/<split>/, label PNG folders) or a COCO 2017 folder"

    def open(self, root: Path, split: str, *, label_kinds: Iterable[str] | None = None,
             options: BaseModel) -> SplitDataset:
        from pipeline.data.reader import open_dataset

        return open_dataset(root, split, label_kinds=label_kinds)

    def split_label_kinds(self, root: Path, split: str, *,
                          options: BaseModel) -> tuple[str, ...] | None:
        from pipeline.data.reader import split_label_kinds

        return split_label_kinds(root, split)

    def ready(self, root: Path, *, options: BaseModel) -> bool:
        return (root / "meta.json").exists()

    def check(self, root: Path, splits: Sequence[str], *, options: BaseModel,
              workers: int | None = None) -> dict[str, Any]:
        from pipeline.data.check import check_dataset

        return check_dataset(root, tuple(splits), workers=workers)


class SyntheticFormat(FolderFormat):
    name = "synthetic"
    summary = "the built-in synthetic world, rendered into data.root by prepare (densepipe's layout)"


class CocoFormat(FolderFormat):
    name = "coco"
    summary = ("COCO 2017 as published: <split>2017/ and annotations/{instances,person_keypoints,"
               "panoptic}_<split>2017.json (+ panoptic_<split>2017/); semantic from panoptic")

    def open(self, root: Path, split: str, *, label_kinds: Iterable[str] | None = None,
             options: BaseModel) -> SplitDataset:
        from pipeline.data.reader import CocoDataset

        return CocoDataset.from_coco2017(root, split, label_kinds=label_kinds)

    def ready(self, root: Path, *, options: BaseModel) -> bool:
        return (root / "annotations").is_dir()


@hookimpl
def densepipe_register_dataset_formats() -> list[DatasetFormat]:
    return [SyntheticFormat(), FolderFormat(), CocoFormat()]
