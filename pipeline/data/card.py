"""The dataset card (``meta.json``): what a dataset's labels mean.

One card describes the class list (the index space of semantic maps *and* instance labels), which
classes are things and which stuff, the keypointed categories (names, skeleton, flip map, OKS
sigmas) and, for datasets that have one, the camera. The synthetic world writes it; for a real
COCO folder it is derived from the JSON categories (``DatasetCard.from_coco_categories``).

Index conventions:
- ``class index`` (0..num_classes-1): position in ``classes``; semantic PNGs store it, 255 = ignore;
  ``instances["labels"]`` use it too.
- ``category id``: the COCO ``category_id`` of that class (``classes[i].id``), used in JSON files.
- ``skeleton`` pairs are 1-based keypoint numbers, as in COCO.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import DataError
from pipeline.io import atomic_write_json
import colorsys

IGNORE_INDEX = 255

# COCO's published per-keypoint OKS sigmas for the 17 person keypoints.
COCO_PERSON_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)  # fmt: skip


@dataclass(frozen=True)
class ClassInfo:
    """One class: COCO category id, name, display colour (RGB 0..255), thing or stuff."""

    id: int
    name: str
    color: tuple[int, int, int]
    isthing: bool


@dataclass(frozen=True)
class KeypointSpec:
    """Keypoints of one category (COCO conventions)."""

    category_id: int
    names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]  # 1-based keypoint numbers
    flip_map: tuple[tuple[str, str], ...]  # (left name, right name) pairs
    oks_sigmas: tuple[float, ...]

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    def flip_permutation(self) -> list[int]:
        """``perm[k]`` = index of the keypoint that keypoint ``k`` becomes after a horizontal flip."""
        index = {n: i for i, n in enumerate(self.names)}
        perm = list(range(len(self.names)))
        for a, b in self.flip_map:
            perm[index[a]], perm[index[b]] = index[b], index[a]
        return perm


@dataclass
class DatasetCard:
    name: str
    classes: list[ClassInfo]
    keypoints: list[KeypointSpec] = field(default_factory=list)
    camera: dict[str, float] | None = None  # fx, fy, cx, cy (pixels), width, height
    ignore_index: int = IGNORE_INDEX
    extra: dict[str, Any] = field(default_factory=dict)

    # -- lookups -------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def thing_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c.isthing]

    @property
    def stuff_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if not c.isthing]

    def index_of_category(self, category_id: int) -> int:
        """Class index of a COCO category id; raises KeyError for an unknown id."""
        lookup = self.__dict__.get("_cat_index")
        if lookup is None:
            lookup = {c.id: i for i, c in enumerate(self.classes)}
            self.__dict__["_cat_index"] = lookup
        return lookup[category_id]

    def keypoints_for(self, category_id: int) -> KeypointSpec | None:
        for spec in self.keypoints:
            if spec.category_id == category_id:
                return spec
        return None

    def palette(self) -> list[tuple[int, int, int]]:
        return [c.color for c in self.classes]

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": [
                {"id": c.id, "name": c.name, "color": list(c.color), "isthing": int(c.isthing)}
                for c in self.classes
            ],
            "thing_classes": [self.classes[i].name for i in self.thing_indices],
            "stuff_classes": [self.classes[i].name for i in self.stuff_indices],
            "keypoints": [
                {
                    "category_id": k.category_id,
                    "names": list(k.names),
                    "skeleton": [list(p) for p in k.skeleton],
                    "flip_map": [list(p) for p in k.flip_map],
                    "oks_sigmas": list(k.oks_sigmas),
                }
                for k in self.keypoints
            ],
            "camera": self.camera,
            "ignore_index": self.ignore_index,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, source: str = "meta.json") -> DatasetCard:
        """A card from its JSON: ``classes`` (each ``id`` and ``name``; ``color`` defaults to a
        spread palette, ``isthing`` to 1) is required, every other key optional."""
        try:
            classes = [
                ClassInfo(int(c["id"]), str(c["name"]),
                          tuple(int(v) for v in c.get("color") or _fallback_color(int(c["id"]))),  # type: ignore[arg-type]
                          bool(c.get("isthing", 1)))
                for c in obj["classes"]
            ]
            keypoints = [
                KeypointSpec(
                    category_id=int(k["category_id"]),
                    names=tuple(k["names"]),
                    skeleton=tuple((int(a), int(b)) for a, b in k["skeleton"]),
                    flip_map=tuple((str(a), str(b)) for a, b in k["flip_map"]),
                    oks_sigmas=tuple(float(s) for s in k["oks_sigmas"]),
                )
                for k in obj.get("keypoints", [])
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(source, f"not a densepipe dataset card ({type(e).__name__}: {e}); "
                                    'expected at least {"classes": [{"id": 0, "name": "road"}, '
                                    '...]} (docs/own-data.md, section "Dataset card (meta.json)")'
                            ) from e
        return cls(
            name=str(obj.get("name", "dataset")),
            classes=classes,
            keypoints=keypoints,
            camera=obj.get("camera"),
            ignore_index=int(obj.get("ignore_index", IGNORE_INDEX)),
            extra=dict(obj.get("extra", {})),
        )

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> DatasetCard:
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise DataError(path, "dataset card not found (run `densepipe prepare`?)") from e
        except json.JSONDecodeError as e:
            raise DataError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from e
        return cls.from_json(obj, source=str(path))

    @classmethod
    def from_coco_categories(cls, categories: list[dict[str, Any]], *, name: str = "coco") -> DatasetCard:
        """Card for a COCO dataset: classes in category-id order, keypoints where declared.

        ``isthing`` defaults to 1 (instances JSON has no stuff); a flip map is derived from
        ``left_*``/``right_*`` keypoint names; OKS sigmas are COCO's for the 17 person keypoints,
        else 0.05 each (override them in your own card)."""
        classes: list[ClassInfo] = []
        keypoints: list[KeypointSpec] = []
        for c in sorted(categories, key=lambda c: c["id"]):
            color = tuple(c.get("color") or _fallback_color(int(c["id"])))
            classes.append(ClassInfo(int(c["id"]), str(c["name"]), color, bool(c.get("isthing", 1))))  # type: ignore[arg-type]
            if c.get("keypoints"):
                names = tuple(c["keypoints"])
                pairs = tuple(
                    (n, "right_" + n[5:]) for n in names
                    if n.startswith("left_") and ("right_" + n[5:]) in names
                )
                sigmas = COCO_PERSON_SIGMAS if len(names) == 17 else (0.05,) * len(names)
                keypoints.append(KeypointSpec(int(c["id"]), names,
                                              tuple((int(a), int(b)) for a, b in c.get("skeleton", [])),
                                              pairs, tuple(sigmas)))
        return cls(name=name, classes=classes, keypoints=keypoints)


def _fallback_color(i: int) -> tuple[int, int, int]:
    """Deterministic, well-spread colour for class ``i`` (golden-ratio hue walk)."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)
