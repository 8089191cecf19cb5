"""``PanopticEvaluator``: PQ over an evaluation pass, image by image, with COCO panoptic export.

Predictions are the panoptic task's: ``{"ids": HxW int64 (0 = VOID), "segments": [{"id",
"category_id", "isthing", ...}]}`` at the input resolution; the ground truth is the batch's
``panoptic`` label at the same resolution. PQ is computed there, per image as it arrives (nothing
is kept but the per-category counts), with ``plugins.panoptic.metrics``.

With ``export_to(out_dir, name)`` called before the first batch, each prediction is also written as
a COCO panoptic PNG at the image's original size (``meta["orig_size"]``, nearest resize) into a
temporary folder; ``save`` then writes ``<name>_pred.json`` and moves the folder to
``<name>_pred/`` (replacing an older one only then), the layout panopticapi and ``densepipe
panoptic-eval`` expect.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.card import DatasetCard
from pipeline.io import atomic_dir
from pipeline.metrics.merge import check_mergeable, check_same_options
from plugins.panoptic.files import write_panoptic_json, write_panoptic_png
from plugins.panoptic.metrics import PanopticCategories, PQStats, pq_image_stats


def panoptic_categories_json(card: DatasetCard) -> list[dict[str, Any]]:
    """COCO panoptic ``categories`` of a dataset card."""
    return [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "color": list(c.color)}
            for c in card.classes]


def segment_info(ids: np.ndarray, segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO ``segments_info`` of the segments still present in ``ids``: area and bbox recomputed."""
    out = []
    for s in segments:
        ys, xs = np.nonzero(ids == s["id"])
        if len(ys) == 0:
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        info = {"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": 0,
                "isthing": int(bool(s.get("isthing"))), "area": int(len(ys)),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]}
        if "score" in s:
            info["score"] = round(float(s["score"]), 5)
        out.append(info)
    return out


def resize_ids(ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of an ``HxW`` id map (a no-op at the same size)."""
    if tuple(ids.shape) == tuple(size):
        return ids
    return F.interpolate(ids[None, None].double(), size=size, mode="nearest-exact")[0, 0].to(ids.dtype)


class PanopticEvaluator:
    def __init__(self, card: DatasetCard) -> None:
        self.card = card
        self.categories = PanopticCategories.from_card(card)
        self.stats = PQStats(len(self.categories))
        self.annotations: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self._export: contextlib.ExitStack | None = None
        self._export_dir: Path | None = None

    def reset(self) -> None:
        self.stats = PQStats(len(self.categories))
        self.annotations, self.images = [], []

    def export_to(self, out_dir: str | Path, name: str) -> None:
        """Also write the predictions as COCO panoptic PNGs (see the module doc)."""
        self._export = contextlib.ExitStack()
        self._export_dir = self._export.enter_context(atomic_dir(Path(out_dir) / f"{name}_pred"))

    def process(self, batch: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
        has = batch.get("has", {}).get("panoptic")
        for i, pred in enumerate(predictions):
            image_id = batch["image_ids"][i]
            if self._export_dir is not None:
                self._write(batch, i, pred)
            if has is None or not bool(has[i]):
                continue
            gt = batch["panoptic"][i]
            pq_image_stats(gt["ids"], gt["segments"], pred["ids"], pred["segments"], self.categories,
                           where=f"image_id {image_id}", stats=self.stats)

    def _write(self, batch: dict[str, Any], i: int, pred: dict[str, Any]) -> None:
        assert self._export_dir is not None
        image_id = batch["image_ids"][i]
        height, width = pred["ids"].shape
        orig = tuple(int(v) for v in batch["meta"][i].get("orig_size", (height, width)))
        ids = resize_ids(pred["ids"], orig).cpu().numpy()  # type: ignore[arg-type]
        stem = Path(str(batch["file_names"][i] or image_id)).stem
        file_name = f"{stem}.png"
        write_panoptic_png(self._export_dir / file_name, ids)
        self.annotations.append({"image_id": image_id, "file_name": file_name,
                                 "segments_info": segment_info(ids, pred["segments"])})
        self.images.append({"id": image_id, "file_name": batch["file_names"][i],
                            "height": orig[0], "width": orig[1]})

    def merge(self, other: PanopticEvaluator) -> None:
        """Add ``other``'s per-category counts (another shard, same categories) and append its
        exported ``annotations`` / ``images``: TP/FP/FN exact, the IoU sums up to float summation
        order."""
        check_mergeable(self, other)
        check_same_options(self, other, ("categories",))
        self.stats += other.stats
        self.annotations += other.annotations
        self.images += other.images

    def compute(self) -> dict[str, float]:
        return self.stats.summarize(self.categories).named()

    def save(self, out_dir: str | Path, name: str) -> list[Path]:
        """Write ``<name>_pred.json`` and publish ``<name>_pred/`` (only after ``export_to``)."""
        if self._export is None:
            return []
        self._export.close()  # renames the temporary folder to <name>_pred
        folder = Path(out_dir) / f"{name}_pred"
        path = write_panoptic_json(Path(out_dir) / f"{name}_pred.json", self.annotations,
                                   panoptic_categories_json(self.card), self.images)
        self._export, self._export_dir = None, None
        return [path, folder]
