"""A third-party-style task plugin that brings its own dense label kind: ``edges``.

``edges/<split>/<stem>.png``: uint8 HxW, 0 = no edge, 1 = edge, 255 = unknown. The task ``edges``
requires it; its head is a 1x1 conv on p2 upsampled to the input, its loss a BCE over the known
pixels of the samples that have the map. Used by ``tests/test_label_kind_registry.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.card import DatasetCard
from pipeline.data.label_kinds import DenseLabelKind
from pipeline.data.reader import read_png
from pipeline.errors import DataError
from pipeline.hookspecs import hookimpl
from pipeline.task import Batch, FeatureSpec, NoOptions, Task

UNKNOWN = 255


def decode_edges(path: Path, hw: tuple[int, int] | None, options: Mapping[str, Any]) -> np.ndarray:
    arr, mode = read_png(path, "edges PNG")
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise DataError(path, f"expected a uint8 single-channel edges PNG, got mode {mode}")
    return arr


EDGES = DenseLabelKind("edges", dtype=torch.uint8, unknown=UNKNOWN, decode=decode_edges)


class EdgesHead(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, features: dict[str, torch.Tensor], *, image_size: tuple[int, int],
                batch: Batch | None = None) -> torch.Tensor:
        logits = self.conv(features["p2"])
        return F.interpolate(logits, size=tuple(image_size), mode="bilinear",
                             align_corners=False)[:, 0]


class EdgesEvaluator:
    def reset(self) -> None:
        self.right, self.known = 0, 0

    def process(self, batch: Batch, predictions: list[torch.Tensor]) -> None:
        if "edges" not in batch:
            return
        for pred, truth in zip(predictions, batch["edges"], strict=True):
            known = truth != UNKNOWN
            self.right += int(((pred > 0.5) == (truth == 1))[known].sum())
            self.known += int(known.sum())

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.right / max(self.known, 1)}


class EdgesTask(Task[NoOptions]):
    name = "edges"
    requires = ("edges",)
    main_metric = "accuracy"

    def build_head(self, *, feature_spec: FeatureSpec, card: DatasetCard,
                   options: NoOptions) -> nn.Module:
        return EdgesHead(feature_spec["p2"].channels)

    def losses(self, output: torch.Tensor, batch: Batch, *,
               options: NoOptions) -> dict[str, torch.Tensor]:
        has = batch["has"].get("edges")
        if has is None or not bool(has.any()):
            return {"bce": output.sum() * 0}
        target = batch["edges"].to(output.device)
        known = (target != UNKNOWN) & has.to(output.device)[:, None, None]
        if not bool(known.any()):
            return {"bce": output.sum() * 0}
        return {"bce": F.binary_cross_entropy_with_logits(output[known], target[known].float())}

    def postprocess(self, output: torch.Tensor, *, batch: Batch,
                    predictions: dict[str, list[Any]], options: NoOptions) -> list[torch.Tensor]:
        return list(torch.sigmoid(output).detach().cpu())

    def evaluator(self, *, card: DatasetCard, options: NoOptions) -> EdgesEvaluator:
        return EdgesEvaluator()

    def visualize(self, image: np.ndarray, prediction: torch.Tensor, *,
                  card: DatasetCard, options: NoOptions) -> np.ndarray:
        return image


@hookimpl
def densepipe_register_label_kinds() -> list[DenseLabelKind]:
    return [EDGES]


@hookimpl
def densepipe_register_tasks() -> list[Task]:
    return [EdgesTask()]
