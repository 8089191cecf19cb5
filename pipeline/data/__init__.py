"""Data: sample contract, dataset card, COCO-format reader, joint transforms, synthetic world.

The public names below are re-exported lazily, so ``import pipeline.data.card`` stays light
(no torch import) while ``from pipeline.data import CocoDataset`` works.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.data.card import IGNORE_INDEX, ClassInfo, DatasetCard, KeypointSpec
    from pipeline.data.reader import LABEL_KINDS, CocoDataset, open_dataset, read_image, read_png
    from pipeline.data.sample import DENSE_KEYS, LABEL_KEYS, UNKNOWN_VALUE
    from pipeline.data.show import draw_sample, show_sample
    from pipeline.data.transforms import (
        Batch,
        ColorJitter,
        Compose,
        Normalize,
        RandomHorizontalFlip,
        RandomScaleCrop,
        Resize,
        build_transforms,
        collate,
        crop_sample,
        hflip_sample,
        resize_sample,
    )

_EXPORTS = {
    "pipeline.data.card": ("IGNORE_INDEX", "ClassInfo", "DatasetCard", "KeypointSpec"),
    "pipeline.data.sample": ("DENSE_KEYS", "LABEL_KEYS", "UNKNOWN_VALUE"),
    "pipeline.data.reader": ("LABEL_KINDS", "CocoDataset", "open_dataset", "read_image",
                             "read_png"),
    "pipeline.data.transforms": (
        "Batch", "ColorJitter", "Compose", "Normalize", "RandomHorizontalFlip", "RandomScaleCrop",
        "Resize", "build_transforms", "collate", "crop_sample", "hflip_sample", "resize_sample",
    ),
    "pipeline.data.show": ("draw_sample", "show_sample"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = [
    "DENSE_KEYS", "IGNORE_INDEX", "LABEL_KEYS", "LABEL_KINDS", "UNKNOWN_VALUE",
    "Batch", "ClassInfo", "CocoDataset", "ColorJitter", "Compose", "DatasetCard", "KeypointSpec",
    "Normalize", "RandomHorizontalFlip", "RandomScaleCrop", "Resize", "build_transforms",
    "collate", "crop_sample", "draw_sample", "hflip_sample", "open_dataset", "read_image",
    "read_png", "resize_sample", "show_sample",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
