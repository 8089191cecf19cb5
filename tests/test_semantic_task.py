"""The semantic task's own pieces: class weighting, loss with missing labels, visualisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError
from plugins.semantic import SemanticTask


@pytest.fixture(scope="module")
def card(tiny_dataset: Path) -> DatasetCard:
    return DatasetCard.load(tiny_dataset / "meta.json")


def test_median_frequency_weights_from_the_card(card: DatasetCard) -> None:
    task = SemanticTask()
    fractions = card.extra["class_pixel_fraction"]["train"]
    assert len(fractions) == card.num_classes and sum(fractions) == pytest.approx(1.0, abs=1e-5)
    opts = task.resolve_options(task.parse_options({"class_weights": "median_frequency"}), card=card)
    weights = np.array(opts.class_weights)
    present = np.array(fractions) > 0
    assert np.median(np.array(fractions)[present]) == pytest.approx(
        (np.array(fractions)[present] * weights[present])[0], rel=1e-3)  # w_c * f_c = median
    assert weights[np.argmax(fractions)] < 1.0 < weights[present][np.argmin(np.array(fractions)[present])]


def test_class_weight_errors(card: DatasetCard) -> None:
    task = SemanticTask()
    with pytest.raises(ConfigError, match=r"class_weights: expected 7 values .* got 2"):
        task.resolve_options(task.parse_options({"class_weights": [1.0, 2.0]}), card=card)
    bare = DatasetCard(card.name, card.classes)
    with pytest.raises(ConfigError, match="has no class_pixel_fraction"):
        task.resolve_options(task.parse_options({"class_weights": "median_frequency"}), card=bare)


def test_loss_is_zero_and_connected_without_labels(card: DatasetCard) -> None:
    task = SemanticTask()
    opts = task.parse_options({})
    logits = torch.randn(2, card.num_classes, 8, 8, requires_grad=True)
    batch = {"semantic": torch.full((2, 8, 8), 255)}
    loss = task.losses(logits, batch, options=opts)["ce"]
    assert float(loss.detach()) == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None


def test_visualisation_has_overlay_and_legend(card: DatasetCard) -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    pred = torch.zeros(64, 64, dtype=torch.int64)
    pred[:, 32:] = 4
    vis = SemanticTask().visualize(image, pred, card=card)
    assert vis.shape[0] >= 64 and vis.shape[1] > 64 and vis.dtype == np.uint8
    left = vis[:64, :32].reshape(-1, 3)
    assert (left == (np.array(card.palette()[0]) * 0.6).astype(np.uint8)).all(axis=1).mean() > 0.9
