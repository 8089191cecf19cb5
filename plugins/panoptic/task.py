"""Built-in task ``panoptic``: Panoptic FPN's combination of the ``semantic`` and ``instance`` tasks.

No head, no loss, no backbone work: ``postprocess`` combines the two tasks' predictions of each
image with ``plugins.panoptic.fusion.combine_semantic_and_instances`` (instances by score,
dropped above an overlap share, stuff from the semantic map above an area). Metrics: PQ, SQ, RQ
for all classes, things (``_th``) and stuff (``_st``), and per class, as panopticapi computes them
(``plugins.panoptic.metrics``). ``densepipe evaluate`` exports the predictions in COCO panoptic
format (``panoptic_pred.json`` + ``panoptic_pred/``).

Options (``model.heads.panoptic``): ``overlap_threshold``, ``stuff_area_limit`` (pixels at the
input resolution) and ``score_threshold``; detectron2's defaults (0.5, 4096, 0.5) suit COCO-sized
inputs, small images need a smaller area limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError
from pipeline.hookspecs import hookimpl
from pipeline.io import atomic_write_json
from pipeline.task import Batch, FeatureSpec, PredictedImage, Task
from plugins.panoptic.draw import draw_panoptic
from plugins.panoptic.evaluator import (
    PanopticEvaluator,
    panoptic_categories_json,
    segment_info,
)
from plugins.panoptic.files import write_panoptic_json, write_panoptic_png
from plugins.panoptic.fusion import combine_semantic_and_instances


class PanopticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overlap_threshold: float = Field(0.5, ge=0, le=1)
    """Drop an instance when more than this share of its mask is already taken."""
    stuff_area_limit: int = Field(4096, ge=0)
    """Stuff regions with fewer free pixels than this (at the input resolution) become VOID."""
    score_threshold: float = Field(0.5, ge=0, le=1)
    """Instances scoring below this are left out."""


class ResolvedPanopticOptions(PanopticOptions):
    """The options with what ``postprocess`` needs from the dataset card (set by the task)."""

    stuff_classes: tuple[int, ...]
    category_ids: tuple[int, ...]  # COCO category id of each class index


class PanopticTask(Task[ResolvedPanopticOptions]):
    name = "panoptic"
    export_refusal = "semantic and instance predictions are fused in Python, no graph of its own"
    main_metric = "PQ"
    metrics = tuple(f"{m}{s}" for s in ("", "_th", "_st", "/*") for m in ("PQ", "SQ", "RQ"))
    requires = ("panoptic",)
    depends_on = ("semantic", "instance")
    input_view = "rgb"
    Options = PanopticOptions

    def resolve_options(self, options: PanopticOptions, *,  # the parse model, a base of OptionsT
                        card: DatasetCard) -> ResolvedPanopticOptions:
        if not card.stuff_indices:
            raise ConfigError(f"task panoptic: the dataset card of {card.name} has no stuff classes "
                              "(isthing 0); panoptic segmentation needs things and stuff")
        return ResolvedPanopticOptions(**options.model_dump(), stuff_classes=tuple(card.stuff_indices),
                                       category_ids=tuple(c.id for c in card.classes))

    def build_head(self, *, feature_spec: FeatureSpec, card: DatasetCard,
                   options: ResolvedPanopticOptions) -> None:
        return None

    def losses(self, output: Any, batch: Batch, *,
               options: ResolvedPanopticOptions) -> dict[str, torch.Tensor]:
        return {}

    def postprocess(self, output: Any, *, batch: Batch, predictions: dict[str, list[Any]],
                    options: ResolvedPanopticOptions) -> list[dict[str, Any]]:
        """Per image ``{"ids": HxW int64 (0 = VOID), "segments": [{"id", "label", "category_id",
        "isthing", "area", "score"?}]}``."""
        out = []
        for semantic, inst in zip(predictions["semantic"], predictions["instance"], strict=True):
            ids, segments = combine_semantic_and_instances(
                semantic, inst["masks"], inst["scores"], inst["labels"], stuff_classes=options.stuff_classes,
                overlap_threshold=options.overlap_threshold, stuff_area_limit=options.stuff_area_limit,
                score_threshold=options.score_threshold)
            for s in segments:
                s["category_id"] = options.category_ids[s["label"]]
            out.append({"ids": ids, "segments": segments})
        return out

    def evaluator(self, *, card: DatasetCard, options: ResolvedPanopticOptions) -> PanopticEvaluator:
        return PanopticEvaluator(card)

    def visualize(self, image: np.ndarray, prediction: dict[str, Any], *, card: DatasetCard,
                  options: ResolvedPanopticOptions) -> np.ndarray:
        return draw_panoptic(image, prediction["ids"], prediction["segments"], card)

    def save_prediction(self, prediction: dict[str, Any], path_stem: str, *, card: DatasetCard,
                        options: ResolvedPanopticOptions) -> list[str]:
        png = Path(f"{path_stem}_panoptic.png")
        ids = prediction["ids"].cpu().numpy()
        write_panoptic_png(png, ids)
        info = Path(f"{path_stem}_panoptic.json")
        segments = segment_info(ids, prediction["segments"])
        atomic_write_json(info, {"file_name": png.name, "segments_info": segments})
        return [str(png), str(info)]

    def write_dataset_predictions(self, items: Iterable[PredictedImage], out_dir: str, *,
                                  card: DatasetCard) -> list[str]:
        """COCO panoptic predictions: ``panoptic_pred/<name stem>.png`` (RGB-encoded ids) and
        ``panoptic_pred.json`` (``images``, ``annotations`` with ``segments_info``, ``categories``),
        what ``densepipe panoptic-eval --pred-json ... --pred-dir ...`` reads (and ``evaluate``
        writes under the same names)."""
        folder = Path(out_dir) / "panoptic_pred"
        annotations, images, written = [], [], []
        for item in items:
            file_name = str(PurePosixPath(item.name).with_suffix(".png"))
            ids = item.prediction["ids"].cpu().numpy()
            written.append(str(write_panoptic_png(folder / file_name, ids)))
            annotations.append({"image_id": item.image_id, "file_name": file_name,
                                "segments_info": segment_info(ids, item.prediction["segments"])})
            images.append({"id": item.image_id, "file_name": item.name, "height": item.height,
                           "width": item.width})
        path = write_panoptic_json(Path(out_dir) / "panoptic_pred.json", annotations,
                                   panoptic_categories_json(card), images)
        return [*written, str(path)]


@hookimpl
def densepipe_register_tasks() -> list[Task]:
    return [PanopticTask()]

