"""Example third-party task plugin: predict each pixel's brightness (luma in [0, 1]).

Self-supervised like colorization (``requires = ()``: it needs no label), so every sample teaches
it. It shows the whole Task contract in one page: options, a head built from the backbone's
feature spec with a shared decoder, a loss, postprocessing, an evaluator and a visualisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline.data.card import DatasetCard
from pipeline.hookspecs import hookimpl
from pipeline.nn.fpn_heads import SemanticFPNHead
from pipeline.task import Batch, FeatureSpec, Task


class BrightnessOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conv_dims: int = Field(32, ge=8)


def luma(images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W uint8 -> B x H x W float luma in [0, 1] (BT.601)."""
    w = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 * w).sum(dim=1)


class BrightnessHead(nn.Module):
    def __init__(self, feature_spec: FeatureSpec, conv_dims: int) -> None:
        super().__init__()
        self.decoder = SemanticFPNHead(feature_spec, num_outputs=1, conv_dims=conv_dims)

    def forward(self, features: dict[str, torch.Tensor], *, image_size: tuple[int, int],
                batch: Batch | None = None) -> torch.Tensor:
        return torch.sigmoid(self.decoder(features, output_size=image_size)[:, 0])


class BrightnessEvaluator:
    def reset(self) -> None:
        self.abs_error, self.pixels = 0.0, 0

    def process(self, batch: Batch, predictions: list[torch.Tensor]) -> None:
        target = luma(batch["image"])
        for pred, truth in zip(predictions, target, strict=True):
            self.abs_error += float((pred - truth).abs().sum())
            self.pixels += truth.numel()

    def compute(self) -> dict[str, float]:
        return {"mae": self.abs_error / max(self.pixels, 1)}


class BrightnessTask(Task[BrightnessOptions]):
    name = "brightness"
    requires = ()
    input_view = "rgb"
    Options = BrightnessOptions

    def build_head(self, *, feature_spec: FeatureSpec, card: DatasetCard,
                   options: BrightnessOptions) -> nn.Module:
        return BrightnessHead(feature_spec, options.conv_dims)

    def losses(self, output: torch.Tensor, batch: Batch, *,
               options: BrightnessOptions) -> dict[str, torch.Tensor]:
        return {"l1": F.l1_loss(output, luma(batch["image"]).to(output.device))}

    def postprocess(self, output: torch.Tensor, *, batch: Batch,
                    predictions: dict[str, list[Any]], options: BrightnessOptions) -> list[torch.Tensor]:
        return list(output.detach().cpu())

    def evaluator(self, *, card: DatasetCard, options: BrightnessOptions) -> BrightnessEvaluator:
        return BrightnessEvaluator()

    def visualize(self, image: np.ndarray, prediction: torch.Tensor, *,
                  card: DatasetCard, options: BrightnessOptions) -> np.ndarray:
        gray = (prediction.clamp(0, 1).numpy() * 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)


@hookimpl
def densepipe_register_tasks() -> list[Task]:
    return [BrightnessTask()]
