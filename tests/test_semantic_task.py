"""The semantic task's own pieces: class weighting, loss with missing labels, visualisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError
from plugins.semantic.task import SemanticOptions, SemanticTask


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
    vis = SemanticTask().visualize(image, pred, card=card, options=SemanticOptions())
    assert vis.shape[0] >= 64 and vis.shape[1] > 64 and vis.dtype == np.uint8
    left = vis[:64, :32].reshape(-1, 3)
    assert (left == (np.array(card.palette()[0]) * 0.6).astype(np.uint8)).all(axis=1).mean() > 0.9


def test_the_loss_is_selectable_and_checked_at_config_time(card: DatasetCard) -> None:
    from pipeline.nn.dense_losses import cross_entropy, soft_dice

    task = SemanticTask()
    torch.manual_seed(0)
    logits = torch.randn(2, card.num_classes, 8, 8)
    target = torch.randint(0, card.num_classes, (2, 8, 8))
    target[0, :2] = 255
    combined = {"loss": "combined", "loss_options": {"weights": {"cross_entropy": 1.0, "soft_dice": 0.5}}}
    opts = task.resolve_options(task.parse_options(combined), card=card)
    got = task.losses(logits, {"semantic": target}, options=opts)
    expected = cross_entropy(logits, target) + 0.5 * soft_dice(logits, target)
    assert list(got) == ["combined"] and float(got["combined"]) == pytest.approx(float(expected), rel=1e-6)
    focal = task.resolve_options(task.parse_options({"loss": "focal", "loss_options": {"gamma": 0.0}}),
                                 card=card)
    # focal with gamma 0 is cross-entropy
    assert float(task.losses(logits, {"semantic": target}, options=focal)["focal"]) == pytest.approx(
        float(task.losses(logits, {"semantic": target}, options=task.parse_options({}))["ce"]), rel=1e-5)
    with pytest.raises(ConfigError, match=r"model.heads.semantic.loss=dice: unknown dense loss 'dice'; "
                                          r"allowed: combined, cross_entropy, focal, soft_dice"):
        task.resolve_options(task.parse_options({"loss": "dice"}), card=card)
    with pytest.raises(ConfigError, match=r"loss=focal: loss 'focal' got unknown options \['gama'\]"):
        task.resolve_options(task.parse_options({"loss": "focal", "loss_options": {"gama": 2}}), card=card)
    with pytest.raises(ConfigError, match="class_weights apply to loss cross_entropy"):
        task.resolve_options(task.parse_options({"loss": "soft_dice", "class_weights": [1.0] * 7}), card=card)
