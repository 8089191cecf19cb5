"""Dense classification losses: agreement with PyTorch and hand-computed values, ignore handling,
the all-ignored edge case and the registry."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.nn.dense_losses import (
    DENSE_LOSSES,
    build_dense_loss,
    combined,
    cross_entropy,
    focal,
    soft_dice,
)

SINGLE_LOSSES = ("cross_entropy", "soft_dice", "focal")


def _batch(seed: int = 0, *, k: int = 4, ignore_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, k, (2, 5, 6), generator=gen)
    target[torch.rand(target.shape, generator=gen) < ignore_fraction] = 255
    return logits, target


def _confident(target: torch.Tensor, k: int, scale: float = 50.0) -> torch.Tensor:
    """Logits putting almost all mass on ``target`` (ignored pixels: class 0)."""
    labels = target.where(target != 255, 0)
    return (F.one_hot(labels, k).permute(0, 3, 1, 2).double() * 2 - 1) * scale


# ---------------------------------------------------------------------------------------------
# cross-entropy


def test_cross_entropy_matches_torch_with_ignore() -> None:
    logits, target = _batch()
    torch.testing.assert_close(
        cross_entropy(logits, target), F.cross_entropy(logits, target, ignore_index=255)
    )


def test_cross_entropy_matches_torch_with_weights() -> None:
    logits, target = _batch(1)
    weights = [0.5, 2.0, 1.0, 0.1]
    ours = cross_entropy(logits, target, class_weights=weights)
    ref = F.cross_entropy(logits, target, weight=torch.tensor(weights, dtype=torch.float64), ignore_index=255)
    torch.testing.assert_close(ours, ref)


def test_cross_entropy_other_ignore_index() -> None:
    logits, target = _batch(2)
    target = target.where(target != 255, -1)
    ref = F.cross_entropy(logits, target, ignore_index=-1)
    torch.testing.assert_close(cross_entropy(logits, target, ignore_index=-1), ref)


def test_cross_entropy_zero_weight_everywhere_is_zero() -> None:
    logits, target = _batch(3)
    loss = cross_entropy(logits, target, class_weights=[0.0] * 4)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------
# soft Dice


def test_soft_dice_perfect_prediction_is_zero() -> None:
    _, target = _batch(4)
    loss = soft_dice(_confident(target, 4), target)
    assert loss.item() == pytest.approx(0.0, abs=1e-9)


def test_soft_dice_completely_wrong_is_near_one() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.int64)
    target[:, :, 4:] = 1
    wrong = 1 - target  # every pixel predicted as the other class
    loss = soft_dice(_confident(wrong, 2), target)
    # each class: (0 + 1) / (32 + 32 + 1) -> 1 - 1/65
    assert loss.item() == pytest.approx(1 - 1 / 65, abs=1e-9)
    assert loss.item() > 0.98


def test_soft_dice_hand_computed_2x2() -> None:
    # probabilities per pixel (class 0, class 1), target [[0, 1], [1, ignore]]
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.5, 0.5]], dtype=torch.float64)
    logits = probs.log().T.reshape(1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [1, 255]]])
    # valid pixels 0..2. class 0: y = (1, 0, 0), p = (.8, .4, .3)
    #   sum y p = .8, sum y^2 = 1, sum p^2 = .64 + .16 + .09 = .89
    # class 1: y = (0, 1, 1), p = (.2, .6, .7): sum y p = 1.3, sum y^2 = 2, sum p^2 = .04 + .36 + .49 = .89
    d0 = 1 - (2 * 0.8 + 1) / (1 + 0.89 + 1)
    d1 = 1 - (2 * 1.3 + 1) / (2 + 0.89 + 1)
    assert soft_dice(logits, target).item() == pytest.approx((d0 + d1) / 2, abs=1e-12)
    d0_raw, d1_raw = 1 - 1.6 / 1.89, 1 - 2.6 / 2.89
    assert soft_dice(logits, target, eps=0.0).item() == pytest.approx((d0_raw + d1_raw) / 2, abs=1e-12)


def test_soft_dice_averages_over_target_or_predicted_classes() -> None:
    # K = 3; class 2 is neither labelled nor argmax anywhere -> skipped; class 1 is predicted on
    # pixel 1 but never labelled -> counted (a false positive class costs).
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]], dtype=torch.float64)
    logits = probs.log().T.reshape(1, 3, 1, 2)
    target = torch.zeros(1, 1, 2, dtype=torch.int64)
    d0 = 1 - (2 * 1.0 + 0) / (2 + 0.49 + 0.09)
    d1 = 1 - 0 / (0 + 0.04 + 0.36)
    assert soft_dice(logits, target, eps=0.0).item() == pytest.approx((d0 + d1) / 2, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# focal


def test_focal_gamma_zero_is_cross_entropy() -> None:
    logits, target = _batch(5)
    torch.testing.assert_close(
        focal(logits, target, gamma=0.0), F.cross_entropy(logits, target, ignore_index=255)
    )


def test_focal_alpha_weights_pixels_by_class() -> None:
    logits, target = _batch(6)
    alpha = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    nll = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    valid = target != 255
    expected = (alpha[target.where(valid, 0)] * nll * valid).sum() / valid.sum()
    torch.testing.assert_close(focal(logits, target, gamma=0.0, alpha=alpha), expected)


def test_focal_down_weights_easy_pixels() -> None:
    target = torch.tensor([[[0]]])
    easy = torch.tensor([[[[3.0]], [[0.0]]]], dtype=torch.float64)  # p_0 = 0.9526
    hard = torch.tensor([[[[0.0]], [[1.0]]]], dtype=torch.float64)  # p_0 = 0.2689
    ce_easy, ce_hard = cross_entropy(easy, target), cross_entropy(hard, target)
    fl_easy, fl_hard = focal(easy, target, gamma=2.0), focal(hard, target, gamma=2.0)
    assert fl_easy < ce_easy and fl_hard < ce_hard
    p = torch.sigmoid(torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(fl_easy, (1 - p) ** 2 * ce_easy)
    assert fl_easy / ce_easy < 0.01 < fl_hard / ce_hard  # easy pixels are scaled down far more


def test_focal_fractional_gamma_has_finite_gradient_when_certain() -> None:
    target = torch.tensor([[[0]]])
    logits = torch.tensor([[[[200.0]], [[0.0]]]], dtype=torch.float64, requires_grad=True)
    focal(logits, target, gamma=0.5).backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------
# all-ignored targets, combined, registry


@pytest.mark.parametrize("name", SINGLE_LOSSES)
def test_all_ignored_gives_connected_finite_zero(name: str) -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255, dtype=torch.int64)
    loss = build_dense_loss(name)(logits, target)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and not logits.grad.any()


def test_all_ignored_combined_is_connected_zero() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), 255, dtype=torch.int64)
    loss = combined(logits, target, weights={"cross_entropy": 1.0, "soft_dice": 0.5, "focal": 2.0})
    loss.backward()
    assert loss.item() == 0 and not logits.grad.any()


def test_combined_is_weighted_sum() -> None:
    logits, target = _batch(7)
    weights = {"cross_entropy": 1.0, "soft_dice": 0.5, "focal": 2.0}
    loss = combined(logits, target, weights=weights, options={"focal": {"gamma": 1.0}})
    expected = (
        cross_entropy(logits, target)
        + 0.5 * soft_dice(logits, target)
        + 2.0 * focal(logits, target, gamma=1.0)
    )
    torch.testing.assert_close(loss, expected)
    built = build_dense_loss("combined", weights=weights, options={"focal": {"gamma": 1.0}})
    torch.testing.assert_close(built(logits, target), expected)


def test_build_passes_options() -> None:
    logits, target = _batch(8)
    torch.testing.assert_close(
        build_dense_loss("focal", gamma=0.0)(logits, target), cross_entropy(logits, target)
    )
    assert set(DENSE_LOSSES) == {*SINGLE_LOSSES, "combined"}


def test_unknown_loss_lists_available() -> None:
    with pytest.raises(ConfigError, match="unknown dense loss 'lovasz'") as info:
        build_dense_loss("lovasz")
    for name in DENSE_LOSSES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("focal", {"eps": 1.0}, r"loss 'focal' got unknown options \['eps'\]; allowed: alpha, gamma"),
        ("combined", {}, "combined loss needs weights"),
        ("combined", {"weights": {}}, "non-empty weights"),
        ("combined", {"weights": {"dice": 1.0}}, r"unknown losses \['dice'\]; allowed: cross_entropy"),
        ("combined", {"weights": {"combined": 1.0}}, r"unknown losses \['combined'\]"),
        ("combined", {"weights": {"focal": 1.0}, "options": {"soft_dice": {}}}, "have no weight"),
        ("combined", {"weights": {"focal": 1.0}, "options": {"focal": {"eps": 1}}}, "unknown options"),
    ],
)
def test_bad_options_raise_config_error(name: str, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_dense_loss(name, **options)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda lg, t: cross_entropy(lg[0], t), r"logits must be BxKxHxW, got shape \(4, 5, 6\)"),
        (lambda lg, t: cross_entropy(lg, t[:, :4]), r"target shape \(2, 4, 6\) must be \(2, 5, 6\)"),
        (lambda lg, t: soft_dice(lg, t.int()), "target must be int64 labels, got torch.int32"),
        (lambda lg, t: focal(lg, t, ignore_index=2), r"ignore_index 2 must lie outside \[0, 4\)"),
        (lambda lg, t: focal(lg, t, gamma=-1.0), "gamma must be >= 0, got -1.0"),
        (lambda lg, t: focal(lg, t, alpha=[1.0, 2.0]), r"alpha must hold one value per class \(4\)"),
        (lambda lg, t: soft_dice(lg, t, eps=-0.5), "eps must be >= 0, got -0.5"),
        (lambda lg, t: cross_entropy(lg, t, class_weights=[1, -1, 1, 1]), "class_weights must be >= 0"),
    ],
)
def test_bad_inputs_raise_value_error(call: Callable[..., torch.Tensor], match: str) -> None:
    logits, target = _batch(9)
    with pytest.raises(ValueError, match=match):
        call(logits, target)


def test_half_precision_logits_are_finite() -> None:
    logits = (torch.randn(1, 3, 4, 4) * 30).half().requires_grad_()
    target = torch.randint(0, 3, (1, 4, 4))
    for name in ("soft_dice", "focal"):
        loss = build_dense_loss(name)(logits, target)
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())
