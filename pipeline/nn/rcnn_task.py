"""``RCNNTask``: the Task methods that the R-CNN tasks (``instance``, ``keypoints``) share.

Their heads return an ``RCNNOutput``: the loss terms are computed inside the head (the RoI
sampler needs the targets), predictions are its ``predictions()``, drawings show boxes, masks and
skeletons, and ``densepipe predict`` writes the detections as COCO results JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from pipeline.data.card import DatasetCard
from pipeline.metrics.coco_evaluator import save_detections_json
from pipeline.nn.rcnn import RCNNOutput
from pipeline.task import Batch, Task
from pipeline.viz import draw_detections


class RCNNTask(Task):
    """Base of tasks whose head returns an ``RCNNOutput`` (subclasses add head and evaluator)."""

    def losses(self, output: RCNNOutput, batch: Batch, *, options: BaseModel) -> dict[str, torch.Tensor]:
        return output.losses

    def postprocess(self, output: RCNNOutput, *, batch: Batch, predictions: dict[str, list[Any]],
                    options: BaseModel) -> list[dict[str, torch.Tensor]]:
        return output.predictions()

    def visualize(self, image: np.ndarray, prediction: dict[str, torch.Tensor], *,
                  card: DatasetCard) -> np.ndarray:
        return draw_detections(image, prediction, card)

    def save_prediction(self, prediction: dict[str, torch.Tensor], path_stem: str, *,
                        card: DatasetCard) -> list[str]:
        return save_detections_json(prediction, Path(f"{path_stem}_{self.name}.json"), card)
