"""Depth, normals and colorization metrics and the sRGB <-> Lab conversion, on hand-computed arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from plugins.colorization.color import lab_to_rgb, rgb_to_lab, srgb8_to_lab
from plugins.colorization.metrics import ab_accuracy, ab_error_auc, ab_errors, psnr
from plugins.depth.metrics import EPS, DepthMetricAccumulator, depth_metrics
from plugins.normals.metrics import NormalsMetricAccumulator, normals_metrics

# ---------------------------------------------------------------------------------------------- depth

# Valid pixels (target, pred): (2, 1), (4, 6), (3, 3); invalid: target 0, NaN, -1 (pred ignored there).
TARGET = np.array([[2.0, 4.0, 3.0], [0.0, np.nan, -1.0]])
PRED = np.array([[1.0, 6.0, 3.0], [5.0, 7.0, np.nan]])


def test_depth_hand_computed() -> None:
    m = depth_metrics(PRED, TARGET)
    # |d - d*| / d* = 0.5, 0.5, 0; (d - d*)^2 / d* = 0.5, 1, 0; (d - d*)^2 = 1, 4, 0.
    assert m["abs_rel"] == pytest.approx(1 / 3)
    assert m["sq_rel"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert m["rmse_log"] == pytest.approx(math.sqrt((math.log(2) ** 2 + math.log(1.5) ** 2) / 3))
    # max ratios 2, 1.5, 1: < 1.25 -> 1 pixel; < 1.5625 -> 2; < 1.953125 -> 2 (2 is not below).
    assert m["delta1"] == pytest.approx(1 / 3)
    assert m["delta2"] == pytest.approx(2 / 3)
    assert m["delta3"] == pytest.approx(2 / 3)
    assert m["median_scale"] == 1.0
    assert m["num_pixels"] == 3.0
    assert all(isinstance(v, float) for v in m.values())


def test_depth_torch_equals_numpy() -> None:
    assert depth_metrics(torch.tensor(PRED, dtype=torch.float32), torch.tensor(TARGET)) == pytest.approx(
        depth_metrics(PRED, TARGET)
    )


def test_depth_median_scaling_fixes_scale() -> None:
    target = np.array([[1.0, 2.0], [3.0, 0.0]])
    pred = 2 * target + np.array([[0.0, 0.0], [0.0, 9.0]])  # the invalid pixel holds junk
    off = depth_metrics(pred, target)
    on = depth_metrics(pred, target, median_scaling=True)
    assert off["abs_rel"] == pytest.approx(1.0)
    assert on["abs_rel"] == pytest.approx(0.0, abs=1e-15)
    assert on["rmse"] == pytest.approx(0.0, abs=1e-15)
    assert on["delta1"] == 1.0
    assert on["median_scale"] == pytest.approx(0.5)


def test_depth_nonpositive_pred_clamped_to_eps() -> None:
    m = depth_metrics(np.array([0.0, -3.0]), np.array([1.0, 2.0]))
    assert m["abs_rel"] == pytest.approx(((1 - EPS) / 1 + (2 - EPS) / 2) / 2)
    assert math.isfinite(m["rmse_log"])
    assert m["delta3"] == 0.0


def test_depth_min_max_caps() -> None:
    target = np.array([0.5, 2.0, 10.0, 90.0])
    pred = np.array([0.5, 100.0, 10.0, 90.0])
    m = depth_metrics(pred, target, min_depth=1.0, max_depth=80.0)
    # Valid: 2 and 10 (0.5 below min, 90 above max); pred 100 clipped to 80.
    assert m["num_pixels"] == 2.0
    assert m["abs_rel"] == pytest.approx((78 / 2 + 0) / 2)


def test_depth_empty_and_errors() -> None:
    assert depth_metrics(np.ones((2, 2)), np.zeros((2, 2))) == {}
    assert depth_metrics(np.ones(2), np.array([np.nan, np.inf])) == {}
    with pytest.raises(ValueError, match="pred: expected the shape of target"):
        depth_metrics(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="pred: expected finite"):
        depth_metrics(np.array([np.nan]), np.array([1.0]))
    with pytest.raises(ValueError, match="min_depth"):
        depth_metrics(np.ones(1), np.ones(1), min_depth=5.0, max_depth=1.0)
    assert DepthMetricAccumulator().compute() == {}


def _random_depth(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    target = rng.uniform(0.5, 20.0, size=(n, 1, 6, 7))
    target[rng.random(target.shape) < 0.2] = 0.0
    pred = target * rng.uniform(0.5, 1.6, size=target.shape)
    return pred, target


def test_depth_accumulator_equals_single_call() -> None:
    rng = np.random.default_rng(0)
    pairs = [_random_depth(rng, n) for n in (1, 3, 2)]
    acc = DepthMetricAccumulator(max_depth=15.0)
    for pred, target in pairs:
        acc.update(torch.from_numpy(pred), target)
    all_pred = np.concatenate([p.ravel() for p, _ in pairs])
    all_target = np.concatenate([t.ravel() for _, t in pairs])
    everything = depth_metrics(all_pred, all_target, max_depth=15.0)
    got = acc.compute()
    assert got.keys() == everything.keys()
    for key, value in everything.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_depth_accumulator_median_scaling_is_per_image() -> None:
    target = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 4.0)])
    pred = np.stack([3 * target[0], 0.5 * target[1]])  # each image off by its own factor
    acc = DepthMetricAccumulator(median_scaling=True)
    acc.update(pred, target)
    got = acc.compute()
    assert got["abs_rel"] == pytest.approx(0.0, abs=1e-15)
    assert got["median_scale"] == pytest.approx((1 / 3 + 2) / 2)
    assert got["num_pixels"] == 8.0
    # One global factor cannot fix both images.
    assert depth_metrics(pred, target, median_scaling=True)["abs_rel"] > 0.1


# -------------------------------------------------------------------------------------------- normals


def _normals_case() -> tuple[np.ndarray, np.ndarray]:
    """Four pixels (3x1x4): 0 deg, 90 deg, invalid target, zero pred (counts as 90 deg)."""
    target = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T[:, None, :]
    pred = np.array([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]).T[:, None, :]
    return pred, target


def test_normals_hand_computed() -> None:
    pred, target = _normals_case()
    m = normals_metrics(pred, target)
    # Angles over the 3 valid pixels: 0, 90, 90.
    assert m["num_pixels"] == 3.0
    assert m["mean_angle"] == pytest.approx(60.0)
    assert m["median_angle"] == pytest.approx(90.0)
    assert m["rmse_angle"] == pytest.approx(math.sqrt(2 * 90.0**2 / 3))
    assert m["within_11.25"] == pytest.approx(1 / 3)
    assert m["within_22.5"] == pytest.approx(1 / 3)
    assert m["within_30"] == pytest.approx(1 / 3)


def test_normals_thresholds_are_strict() -> None:
    pred, target = _normals_case()
    m = normals_metrics(torch.from_numpy(pred), torch.from_numpy(target), thresholds=(90.0, 90.5))
    assert m["within_90"] == pytest.approx(1 / 3)  # the two 90-degree pixels are not < 90
    assert m["within_90.5"] == 1.0


def test_normals_opposite_and_errors() -> None:
    t = np.array([0.0, 0.0, 1.0]).reshape(3, 1, 1)
    assert normals_metrics(-t, t)["mean_angle"] == pytest.approx(180.0)
    assert normals_metrics(t, np.zeros_like(t)) == {}
    with pytest.raises(ValueError, match="target: expected 3xHxW"):
        normals_metrics(np.ones((2, 4, 4)), np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="pred: expected the shape of target"):
        normals_metrics(np.ones((3, 4, 4)), np.ones((3, 4, 5)))


def test_normals_accumulator() -> None:
    rng = np.random.default_rng(1)
    batches = []
    for n in (2, 1, 3):
        target = rng.normal(size=(n, 3, 5, 6))
        target[:, :, 0, :] = 0.0  # unknown row
        batches.append((target + rng.normal(scale=0.4, size=target.shape), target))
    acc = NormalsMetricAccumulator()
    for pred, target in batches:
        acc.update(pred, target)
    everything = normals_metrics(
        np.concatenate([p for p, _ in batches]), np.concatenate([t for _, t in batches])
    )
    got = acc.compute()
    assert got.keys() == everything.keys()
    for key, value in everything.items():
        tol = 0.0051 if key == "median_angle" else 1e-12 * max(1.0, abs(value))
        assert got[key] == pytest.approx(value, abs=tol), key
    assert NormalsMetricAccumulator().compute() == {}


# ---------------------------------------------------------------------------------------------- color

KNOWN_LAB = [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0), 1e-4),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1e-12),
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032), 1e-3),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793), 1e-3),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602), 1e-3),
    ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0), 1e-3),
]


@pytest.mark.parametrize(("rgb", "lab", "tol"), KNOWN_LAB)
def test_rgb_to_lab_known_values(rgb: tuple, lab: tuple, tol: float) -> None:
    assert rgb_to_lab(np.array(rgb)) == pytest.approx(np.array(lab), abs=tol)


def test_lab_round_trip_and_layouts() -> None:
    rng = np.random.default_rng(2)
    rgb = rng.random((2, 3, 8, 9))
    rgb[0, :, 0, 0] = [0.04045, 0.0404500001, 0.0]  # at the companding knee
    rgb[1, :, 0, 0] = [0.04044999, 0.0031, 1.0]
    lab = rgb_to_lab(rgb, channels_first=True)
    assert lab.shape == rgb.shape and lab.dtype == np.float64
    assert np.abs(lab_to_rgb(lab, channels_first=True) - rgb).max() < 1e-9
    # Channels last gives the same numbers; torch in -> float64 torch out.
    last = rgb_to_lab(torch.from_numpy(np.moveaxis(rgb, 1, -1)))
    assert isinstance(last, torch.Tensor) and last.dtype == torch.float64
    np.testing.assert_allclose(last.numpy(), np.moveaxis(lab, 1, -1), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="rgb: expected"):
        rgb_to_lab(np.ones((4, 4)))
    with pytest.raises(ValueError, match="lab: expected 3xHxW"):
        lab_to_rgb(np.ones((4, 4, 3)), channels_first=True)


def test_srgb8_to_lab_equals_the_float_conversion() -> None:
    # every third 8-bit level per channel, plus 255 (the knee, 10/255 < 0.04045 < 11/255, included)
    levels = torch.cat([torch.arange(0, 256, 3), torch.tensor([10, 11, 255])])
    r, g, b = torch.meshgrid(levels, levels, levels, indexing="ij")
    rgb8 = torch.stack([r, g, b], dim=-1).reshape(-1, 3).to(torch.uint8)
    lab = srgb8_to_lab(rgb8)
    assert lab.dtype == torch.float64 and torch.equal(lab, rgb_to_lab(rgb8.double() / 255.0))
    image = rgb8[:24].T.reshape(1, 3, 4, 6)
    assert torch.equal(srgb8_to_lab(image, channels_first=True),
                       rgb_to_lab(image.double() / 255.0, channels_first=True))
    assert srgb8_to_lab(torch.tensor([255, 0, 0], dtype=torch.uint8)).tolist() == pytest.approx(
        list(KNOWN_LAB[-4][1]), abs=1e-3)
    with pytest.raises(ValueError, match="image: expected a uint8 tensor, got torch.float32"):
        srgb8_to_lab(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="image: expected 3xHxW"):
        srgb8_to_lab(torch.zeros(2, 2, 2, dtype=torch.uint8), channels_first=True)


def test_lab_to_rgb_out_of_gamut() -> None:
    out = lab_to_rgb(np.array([50.0, 120.0, -120.0]))
    assert np.isfinite(out).all() and (out.min() < 0 or out.max() > 1)
    clipped = lab_to_rgb(np.array([50.0, 120.0, -120.0]), clip=True)
    assert clipped.min() >= 0 and clipped.max() <= 1


# --------------------------------------------------------------------------------------- colorization


def test_psnr_hand_computed() -> None:
    target = np.zeros((2, 2, 3))
    pred = np.full((2, 2, 3), 0.1)  # MSE 0.01 -> 20 dB
    assert psnr(pred, target) == pytest.approx(20.0)
    assert psnr(pred * 255, target, data_range=255.0) == pytest.approx(20.0)
    # Batch: mean of per-image PSNR (20 and 40 dB -> 30), not the PSNR of the pooled MSE.
    batch_pred = np.stack([np.full((3, 2, 2), 0.1), np.full((3, 2, 2), 0.01)])
    assert psnr(torch.from_numpy(batch_pred), np.zeros((2, 3, 2, 2))) == pytest.approx(30.0)
    assert psnr(target, target) == math.inf
    with pytest.raises(ValueError, match="pred_rgb: expected the shape of target_rgb"):
        psnr(np.zeros((2, 2, 3)), np.zeros((2, 3, 2)))


# ab pairs with errors 0, 5 (3-4-5), 10, 200.
AB_PRED = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [0.0, 200.0]])
AB_TARGET = np.zeros((4, 2))


def test_ab_errors_accuracy_auc() -> None:
    assert ab_errors(AB_PRED, AB_TARGET) == pytest.approx([0.0, 5.0, 10.0, 200.0])
    assert ab_accuracy(AB_PRED, AB_TARGET) == pytest.approx(3 / 4)  # 10 <= 10 counts
    assert ab_accuracy(AB_PRED, AB_TARGET, threshold=9.99) == pytest.approx(2 / 4)
    # 1 - e/150 clipped at 0: 1, 145/150, 140/150, 0.
    assert ab_error_auc(AB_PRED, AB_TARGET) == pytest.approx((1 + 145 / 150 + 140 / 150 + 0) / 4)
    chw_pred = torch.from_numpy(AB_PRED.T.reshape(2, 2, 2).copy())
    assert ab_error_auc(chw_pred, np.zeros((2, 2, 2)), channels_first=True) == pytest.approx(
        ab_error_auc(AB_PRED, AB_TARGET)
    )
    with pytest.raises(ValueError, match="target_ab: expected"):
        ab_accuracy(np.zeros((4, 3)), np.zeros((4, 3)))


def test_ab_auc_matches_numeric_integration() -> None:
    rng = np.random.default_rng(3)
    pred = rng.uniform(-110, 110, size=(500, 2))
    target = rng.uniform(-110, 110, size=(500, 2))
    e = ab_errors(pred, target)
    ts = np.linspace(0.0, 150.0, 150_001)
    curve = np.searchsorted(np.sort(e), ts, side="right") / e.size  # share of errors <= t
    numeric = np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(ts)) / 150.0
    assert ab_error_auc(pred, target) == pytest.approx(numeric, abs=1e-4)
