"""Depth and normals tasks (issue 6): the masked regression losses on hand-computed values, missing
and non-unit labels, flip consistency, postprocessing, evaluators against the metric functions,
file round trips through the reader's decoding, drawings, config errors, and a tiny model whose
losses go down."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.card import ClassInfo, DatasetCard
from pipeline.data.reader import _decode_normals, read_label
from pipeline.data.transforms import hflip_sample
from pipeline.errors import ConfigError
from pipeline.model import build_model
from pipeline.nn.regression_losses import (
    angular_loss,
    berhu,
    build_regression_loss,
    channel_norm,
    cosine_loss,
    log_gradient_matching,
    masked_l1,
    masked_l2,
    scale_invariant_log,
    unit_channels,
)
from pipeline.registry import default_registry
from pipeline.viz import colorize_depth, depth_colorbar, turbo, viridis
from plugins.depth.metrics import depth_metrics
from plugins.depth.task import DepthOptions, DepthTask, depth_offset, to_depth
from plugins.normals.metrics import normals_metrics
from plugins.normals.task import NormalsOptions, NormalsTask

CARD = DatasetCard("toy", [ClassInfo(1, "floor", (128, 64, 0), False),
                           ClassInfo(2, "box", (0, 0, 255), True)])
EIGEN_KEYS = {"abs_rel", "sq_rel", "rmse", "rmse_log", "delta1", "delta2", "delta3"}
NORMALS_KEYS = {"mean_angle", "median_angle", "rmse_angle", "within_11.25", "within_22.5", "within_30"}


def _t(values: list, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


# --------------------------------------------------------------------------------------------
# losses on hand-computed values


def test_masked_l1_and_l2_skip_invalid_pixels() -> None:
    pred = _t([1.0, 2.0, 3.0, 4.0], (1, 1, 2, 2))
    target = _t([1.5, 0.0, 2.0, float("nan")], (1, 1, 2, 2))
    valid = torch.tensor([[[True, False], [True, False]]])
    assert float(masked_l1(pred, target, valid)) == pytest.approx((0.5 + 1.0) / 2)
    assert float(masked_l2(pred, target, valid)) == pytest.approx((0.25 + 1.0) / 2)
    # vectors: the per-pixel error sums the channels
    p3, t3 = torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    t3[0, :, 0, 0] = torch.tensor([1.0, -2.0, 0.5])
    assert float(masked_l1(p3, t3, torch.tensor([[[True, False]]]))) == pytest.approx(3.5)


def test_berhu_threshold_from_the_valid_pixels_and_both_branches() -> None:
    target = _t([1.0, 2.0, 3.0, 0.0], (1, 1, 1, 4))
    pred = target + _t([0.1, -1.0, 0.5, 100.0], (1, 1, 1, 4))  # the last pixel is invalid
    valid = torch.tensor([[[True, True, True, False]]])
    # c = 0.2 * 1.0; 0.1 <= c: |x|; 1.0 and 0.5 > c: (x^2 + c^2) / 2c
    expected = (0.1 + (1.0 + 0.04) / 0.4 + (0.25 + 0.04) / 0.4) / 3
    assert float(berhu(pred, target, valid)) == pytest.approx(expected, rel=1e-5)
    # threshold 1: c = max |x|, every residual takes the L1 branch
    assert float(berhu(pred, target, valid, threshold=1.0)) == pytest.approx((0.1 + 1.0 + 0.5) / 3, rel=1e-5)
    # a perfect prediction: c = 0, loss 0, finite gradient
    p = target.clone().requires_grad_(True)
    loss = berhu(p, target, valid)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(p.grad).all()


def test_silog_per_image_hand_value() -> None:
    target = torch.full((2, 1, 1, 3), 2.0)
    pred = target * _t([math.e, math.e, 1.0, 5.0, 5.0, 5.0], (2, 1, 1, 3))
    valid = torch.tensor([[[True, True, True]], [[False, False, False]]])  # image 2 has no valid pixel
    # image 1: d = (1, 1, 0): mean d^2 = 2/3, mean d = 2/3
    assert float(scale_invariant_log(pred, target, valid)) == pytest.approx(2 / 3 - 0.5 * 4 / 9, rel=1e-5)
    assert float(scale_invariant_log(pred, target, valid, lam=1.0)) == pytest.approx(2 / 9, rel=1e-5)
    # two images are averaged per image, not per pixel
    valid2 = torch.tensor([[[True, True, True]], [[True, False, False]]])
    image2 = math.log(5.0) ** 2 * (1 - 0.5)
    assert float(scale_invariant_log(pred, target, valid2)) == pytest.approx((4 / 9 + image2) / 2, rel=1e-5)
    # lam = 1: a global scale costs nothing
    assert float(scale_invariant_log(3.0 * target, target, valid2, lam=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_cosine_and_angular_hand_values() -> None:
    pred = torch.zeros(1, 3, 1, 4)
    target = torch.zeros(1, 3, 1, 4)
    pred[0, :, 0, 0], target[0, :, 0, 0] = torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0])  # 90 deg
    pred[0, :, 0, 1], target[0, :, 0, 1] = torch.tensor([2.0, 0, 0]), torch.tensor([1.0, 0, 0])  # 0 deg
    pred[0, :, 0, 2], target[0, :, 0, 2] = torch.tensor([1.0, 1, 0]), torch.tensor([1.0, 0, 0])  # 45 deg
    pred[0, :, 0, 3] = torch.tensor([float("nan"), 0, 0])  # invalid pixel (target 0)
    valid = torch.tensor([[[True, True, True, False]]])
    cosine = (1 + 0 + 1 - 1 / math.sqrt(2)) / 3
    assert float(cosine_loss(pred, target, valid)) == pytest.approx(cosine, rel=1e-5)
    angle = (math.pi / 2 + 0 + math.pi / 4) / 3
    assert float(angular_loss(pred, target, valid)) == pytest.approx(angle, abs=1e-3)


def test_unit_channels_matches_f_normalize_with_finite_gradients_at_zero() -> None:
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    x[0, :, 1, 2] = 0.0  # a zero vector
    assert torch.allclose(channel_norm(x), x.norm(dim=1))
    assert torch.allclose(unit_channels(x), torch.nn.functional.normalize(x, dim=1))
    assert torch.equal(unit_channels(x)[0, :, 1, 2], torch.zeros(3, dtype=torch.float64))
    assert unit_channels(x.half()).dtype == torch.float32  # half inputs are lengthened in float32
    weights = torch.randn_like(x)
    grads = []
    for normalise in (unit_channels, lambda t: torch.nn.functional.normalize(t, dim=1)):
        leaf = x.clone().requires_grad_(True)
        (normalise(leaf) * weights).sum().backward()
        grads.append(leaf.grad)
    assert torch.isfinite(grads[0]).all() and torch.allclose(grads[0], grads[1])
    lengths = channel_norm(unit_channels(x))
    assert torch.allclose(lengths[x.abs().sum(1) > 0], torch.ones((), dtype=torch.float64))


@pytest.mark.parametrize("name", ["l1", "l2", "berhu", "silog", "cosine", "angular", "log_gradient"])
def test_no_valid_pixel_gives_a_connected_zero(name: str) -> None:
    channels = 1 if name in ("l1", "berhu", "silog", "log_gradient") else 3
    pred = torch.randn(2, channels, 3, 3, requires_grad=True)
    target = torch.full((2, channels, 3, 3), float("nan"))
    loss = build_regression_loss(name)(pred, target, torch.zeros(2, 3, 3, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and pred.grad is not None and float(pred.grad.abs().sum()) == 0.0


def test_regression_loss_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"^unknown regression loss 'mse'; allowed: angular, berhu, "):
        build_regression_loss("mse")
    with pytest.raises(ConfigError, match=r"^loss 'silog' got unknown option 'lambda'; allowed: lam$"):
        build_regression_loss("silog", **{"lambda": 0.5})
    with pytest.raises(ConfigError, match=r"option lam: expected a value in \[0, 1\], got 1.5"):
        build_regression_loss("silog", lam=1.5)


def test_log_gradient_matching_hand_values_and_scale_invariance() -> None:
    target = torch.full((1, 1, 2, 3), 2.0)
    pred = target * _t([1.0, 1.0, math.e, 1.0, 1.0, math.e], (1, 1, 2, 3))  # R = [[0, 0, 1], [0, 0, 1]]
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    # 4 horizontal pairs (two of them cross the step of 1), 3 vertical pairs with no change
    assert float(log_gradient_matching(pred, target, valid, scales=1)) == pytest.approx(2 / 7, rel=1e-5)
    # pixel (0, 2) unknown: its pairs leave, so 1 horizontal pair in row 0, 2 in row 1, 2 vertical
    valid[0, 0, 2] = False
    pred[0, 0, 0, 2] = float("nan")  # never read
    assert float(log_gradient_matching(pred, target, valid, scales=1)) == pytest.approx(1 / 5, rel=1e-5)
    # a second scale sees pixels (0, 0) and (0, 2) only, one unknown: no pair, so it does not count
    assert float(log_gradient_matching(pred, target, valid, scales=2)) == pytest.approx(1 / 5, rel=1e-5)
    valid[0, 0, 2] = True
    pred[0, 0, 0, 2] = 2.0 * math.e  # now a pair there, with a step of 1: (2/7 + 1/1) / 2
    two_scales = float(log_gradient_matching(pred, target, valid, scales=2))
    assert two_scales == pytest.approx((2 / 7 + 1) / 2, rel=1e-5)
    depth = torch.rand(2, 1, 8, 8) + 0.5
    assert float(log_gradient_matching(3.0 * depth, depth, torch.ones(2, 8, 8, dtype=torch.bool))) \
        == pytest.approx(0.0, abs=1e-6)


def test_depth_gradient_weight_adds_a_weighted_term() -> None:
    task = DepthTask()
    target = torch.rand(2, 4, 4) + 1
    output = torch.randn(2, 1, 4, 4, requires_grad=True)
    batch = {"depth": target, "has": {"depth": torch.tensor([True, True])}}
    plain = task.losses(output, batch, options=task.resolve_options(task.parse_options({}), card=CARD))
    assert list(plain) == ["silog"]
    opts = task.resolve_options(task.parse_options({"gradient_weight": 0.5}), card=CARD)
    terms = task.losses(output, batch, options=opts)
    expected = 0.5 * log_gradient_matching(to_depth(output, "log"), target[:, None], target > 0)
    got, expected = float(terms["log_gradient"].detach()), float(expected.detach())
    assert got == pytest.approx(expected, rel=1e-6) and expected > 0
    assert float(terms["silog"].detach()) == pytest.approx(float(plain["silog"].detach()))
    sum(terms.values()).backward()
    assert torch.isfinite(output.grad).all()
    with pytest.raises(ConfigError, match="gradient_weight"):
        build_model(load_config(None, ["model.tasks=[depth]", "model.heads.depth.gradient_weight=-1"]), CARD)


# --------------------------------------------------------------------------------------------
# depth task


def test_depth_all_unknown_gives_zero_finite_loss() -> None:
    task = DepthTask()
    for loss in ("silog", "berhu", "l1"):
        opts = task.resolve_options(task.parse_options({"loss": loss}), card=CARD)
        output = torch.randn(2, 1, 4, 4, requires_grad=True)
        batches = [
            {"depth": torch.zeros(2, 4, 4), "has": {"depth": torch.tensor([False, False])}},
            {"depth": torch.rand(2, 4, 4) + 1, "has": {"depth": torch.tensor([False, False])}},
            {"has": {"depth": torch.tensor([False, False])}},
        ]
        for batch in batches:
            value = task.losses(output, batch, options=opts)[loss]
            value.backward()
            assert float(value.detach()) == 0.0 and torch.isfinite(output.grad).all()


def test_depth_loss_uses_only_labelled_samples_and_pixels() -> None:
    task = DepthTask()
    opts = task.parse_options({"loss": "l1", "init_depth": 1.0})
    output = torch.zeros(2, 1, 1, 2)  # log-depth 0 -> 1 m everywhere
    batch = {"depth": _t([3.0, 0.0, 5.0, 5.0], (2, 1, 2)), "has": {"depth": torch.tensor([True, False])}}
    assert float(task.losses(output, batch, options=opts)["l1"]) == pytest.approx(2.0)


def test_depth_output_transform_offset_and_postprocess() -> None:
    for kind in ("log", "softplus"):
        assert float(to_depth(torch.tensor(depth_offset(kind, 3.0)), kind)) == pytest.approx(3.0, rel=1e-6)
    task = DepthTask()
    opts = task.parse_options({})
    preds = task.postprocess(torch.randn(2, 1, 5, 7) * 3, batch={}, predictions={}, options=opts)
    assert len(preds) == 2 and all(p.shape == (5, 7) and p.dtype == torch.float32 and (p > 0).all()
                                   for p in preds)
    soft = task.parse_options({"output": "softplus"})
    preds = task.postprocess(torch.full((1, 1, 2, 2), -30.0), batch={}, predictions={}, options=soft)
    assert (preds[0] > 0).all()


def test_depth_evaluator_equals_depth_metrics() -> None:
    torch.manual_seed(0)
    target = torch.rand(2, 6, 6) * 10 + 1
    target[0, 0] = 0.0  # unknown row
    pred = target * (1 + 0.2 * torch.randn(2, 6, 6)).abs()
    batch = {"depth": target, "has": {"depth": torch.tensor([True, False])}}  # image 2 lacks depth
    task = DepthTask()
    ev = task.evaluator(card=CARD, options=task.parse_options({}))
    ev.reset()
    ev.process(batch, list(pred))
    got = ev.compute()
    expected = depth_metrics(pred[0], target[0])
    assert set(got) == EIGEN_KEYS
    assert all(got[k] == pytest.approx(expected[k], rel=1e-9) for k in EIGEN_KEYS)
    scaled = task.evaluator(card=CARD, options=task.parse_options({"median_scaling": True, "max_depth": 8.0}))
    scaled.process(batch, list(pred))
    got = scaled.compute()
    expected = depth_metrics(pred[0], target[0], median_scaling=True, max_depth=8.0)
    assert set(got) == EIGEN_KEYS | {"median_scale"}  # stated in the output
    assert all(got[k] == pytest.approx(expected[k], rel=1e-9) for k in got)


def test_main_metrics_and_their_direction() -> None:
    from pipeline.metrics.multitask import metric_goal

    tasks = [DepthTask(), NormalsTask()]
    assert (DepthTask.main_metric, NormalsTask.main_metric) == ("rmse", "mean_angle")
    goals = [metric_goal(m, tasks) for m in ("depth/rmse", "depth/abs_rel", "depth/delta1")]
    assert goals == ["min", "min", "max"]
    assert [metric_goal(m, tasks) for m in ("normals/median_angle", "normals/within_30")] == ["min", "max"]


def test_depth_config_errors_name_the_key() -> None:
    task = DepthTask()
    with pytest.raises(ConfigError, match=r"^model\.heads\.depth\.loss: .*'silog'") as info:
        task.parse_options({"loss": "mse"})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^model\.heads\.depth\.loss_options: loss 'silog' got unknown "):
        task.resolve_options(task.parse_options({"loss_options": {"lambda": 1}}), card=CARD)
    with pytest.raises(ConfigError, match=r"^model\.heads\.depth\.min_depth: expected less than max_depth"):
        task.resolve_options(task.parse_options({"min_depth": 5, "max_depth": 2}), card=CARD)
    registry = default_registry()  # the entry points register depth and normals
    cfg = load_config(None, ["model.tasks=[depth]", "model.fpn_channels=8", "tracking.enabled=false",
                             "model.heads={depth: {loss: mse}}"])
    with pytest.raises(ConfigError, match=r"^model\.heads\.depth\.loss: "):
        build_model(cfg, CARD, registry=registry)


def test_depth_visualisation_has_viridis_and_a_colour_bar() -> None:
    pred = torch.linspace(1.0, 14.0, 32).repeat(32, 1)
    vis = DepthTask().visualize(np.zeros((32, 32, 3), np.uint8), pred, card=CARD, options=DepthOptions())
    assert vis.dtype == np.uint8 and vis.shape[0] == 32 and vis.shape[1] > 32 and vis.shape[2] == 3
    assert tuple(vis[5, 0]) == tuple(viridis(0.0)) and tuple(vis[5, 31]) == tuple(viridis(1.0))
    assert tuple(viridis(0.0)) == (68, 1, 84) and tuple(viridis(1.0)) == (253, 231, 37)


def test_viz_cmap_keeps_turbo_callable() -> None:
    d = np.array([[1.0, 2.0], [3.0, 0.0]], np.float32)
    old = colorize_depth(d, cmap="turbo")
    assert np.array_equal(old[0, 0], turbo(0.0)) and np.array_equal(old[1, 0], turbo(1.0))
    assert (old[1, 1] == 0).all() and np.array_equal(colorize_depth(d)[1, 0], viridis(1.0))
    assert depth_colorbar(1.0, 3.0, height=40, cmap="turbo").shape[0] == 40
    with pytest.raises(ValueError, match="cmap: expected one of viridis, turbo"):
        colorize_depth(d, cmap="jet")


def test_depth_png_round_trip_through_the_reader(tmp_path: Path) -> None:
    pred = torch.rand(5, 7) * 13 + 1
    pred[0, 0] = 1e-5  # still known after saving (1 mm)
    (path,) = DepthTask().save_prediction(pred, str(tmp_path / "img"), card=CARD, options=DepthOptions())
    assert path == str(tmp_path / "img_depth.png")
    metres = read_label(Path(path), "depth", (5, 7)).astype(np.float32) * np.float32(0.001)
    assert np.abs(metres - pred.numpy())[1:].max() <= 0.0005 + 1e-6 and metres[0, 0] == np.float32(0.001)


# --------------------------------------------------------------------------------------------
# normals task


def _normals_batch() -> dict:
    n = torch.zeros(1, 3, 2, 2)
    n[0, :, 0, 0] = torch.tensor([1.0, 0, 0])
    n[0, :, 0, 1] = torch.tensor([0.0, 1, 0])
    n[0, :, 1, 0] = torch.tensor([0.0, 0, 2.0])  # not unit length
    n[0, :, 1, 1] = torch.tensor([0.6, 0.8, 0])
    return {"normals": n, "has": {"normals": torch.tensor([True])}}


def test_non_unit_labels_warn_once_and_are_renormalised_or_ignored() -> None:
    output = torch.zeros(1, 3, 2, 2)
    output[0, 2] = 1.0  # predicts +z everywhere: right at the bad pixel, 90 degrees elsewhere
    for mode, expected in (("renormalize", 3 / 4), ("ignore", 3 / 3)):
        task = NormalsTask()
        opts = task.parse_options({"bad_labels": mode})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = task.losses(output, _normals_batch(), options=opts)["cosine"]
            second = task.losses(output, _normals_batch(), options=opts)["cosine"]
        assert len(caught) == 1
        done = "renormalised" if mode == "renormalize" else "ignored"
        assert str(caught[0].message).startswith(f"normals: 25.0% of labelled pixels in this batch are "
                                                 f"not unit length (|n| off by > 0.01); {done}")
        assert float(first) == pytest.approx(expected) and float(second) == float(first)


def test_normals_postprocess_unit_vectors_and_empty_batches() -> None:
    task = NormalsTask()
    opts = task.parse_options({})
    preds = task.postprocess(torch.randn(2, 3, 5, 7), batch={}, predictions={}, options=opts)
    assert len(preds) == 2 and preds[0].shape == (3, 5, 7) and preds[0].dtype == torch.float32
    assert torch.allclose(preds[1].norm(dim=0), torch.ones(5, 7), atol=1e-5)
    output = torch.randn(2, 3, 4, 4, requires_grad=True)
    for loss in ("cosine", "angular", "l2"):
        o = task.parse_options({"loss": loss})
        for batch in ({"normals": torch.zeros(2, 3, 4, 4)}, {},
                      {"normals": torch.randn(2, 3, 4, 4), "has": {"normals": torch.tensor([False, False])}}):
            value = task.losses(output, batch, options=o)[loss]
            value.backward()
            assert float(value.detach()) == 0.0 and torch.isfinite(output.grad).all()


def _unit_field(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-3)


def test_normals_flip_consistency() -> None:
    g = torch.Generator().manual_seed(0)
    target = _unit_field(g, (3, 6, 8))
    target[:, 0, :3] = 0.0  # unknown
    sample = {"image": torch.randint(0, 256, (3, 6, 8), dtype=torch.uint8, generator=g), "normals": target}
    flipped = hflip_sample(sample)
    raw = torch.randn(1, 3, 6, 8, generator=g)
    raw_flipped = raw.flip(-1) * torch.tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    task = NormalsTask()
    for loss in ("cosine", "angular", "l2"):
        opts = task.parse_options({"loss": loss})
        a = task.losses(raw, {"normals": target[None]}, options=opts)[loss]
        b = task.losses(raw_flipped, {"normals": flipped["normals"][None]}, options=opts)[loss]
        wrong = task.losses(raw.flip(-1), {"normals": flipped["normals"][None]}, options=opts)[loss]
        assert float(a) == pytest.approx(float(b), rel=1e-6) and abs(float(wrong) - float(a)) > 1e-3
    opts = task.parse_options({})
    metrics = []
    for out, lab in ((raw, target), (raw_flipped, flipped["normals"])):
        ev = task.evaluator(card=CARD, options=opts)
        ev.process({"normals": lab[None]}, task.postprocess(out, batch={}, predictions={}, options=opts))
        metrics.append(ev.compute())
    assert set(metrics[0]) == NORMALS_KEYS
    assert all(metrics[0][k] == pytest.approx(metrics[1][k], abs=1e-4) for k in NORMALS_KEYS)


def test_normals_evaluator_equals_normals_metrics() -> None:
    g = torch.Generator().manual_seed(1)
    target = _unit_field(g, (2, 3, 5, 5))
    target[0, :, 0] = 0.0
    pred = _unit_field(g, (2, 3, 5, 5))
    task = NormalsTask()
    ev = task.evaluator(card=CARD, options=task.parse_options({}))
    ev.reset()
    ev.process({"normals": target, "has": {"normals": torch.tensor([True, False])}}, list(pred))
    got = ev.compute()
    expected = normals_metrics(pred[0], target[0])
    assert set(got) == NORMALS_KEYS
    for k in NORMALS_KEYS:
        assert got[k] == pytest.approx(expected[k], abs=0.005 if k == "median_angle" else 1e-9)


def test_normals_png_round_trip_and_drawing(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    pred = _unit_field(g, (3, 5, 7))
    (path,) = NormalsTask().save_prediction(pred, str(tmp_path / "img"), card=CARD,
                                            options=NormalsOptions())
    assert path == str(tmp_path / "img_normals.png")
    back = _decode_normals(read_label(Path(path), "normals", (5, 7)))
    cos = (back * pred.numpy()).sum(0)
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 0.5  # 8-bit quantisation
    vis = NormalsTask().visualize(np.zeros((5, 7, 3), np.uint8), pred, card=CARD, options=NormalsOptions())
    assert vis.shape == (5, 7, 3) and vis.dtype == np.uint8


# --------------------------------------------------------------------------------------------
# a tiny model learns


def _toy_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    h = w = 32
    ys = torch.linspace(0, 1, h)[:, None].expand(h, w)
    depth = (1.0 + 13.0 * ys).expand(2, h, w).clone()
    depth[1] = depth[1].flip(0)
    depth[:, :4] = 0.0  # sky: unknown
    normals = torch.zeros(2, 3, h, w)
    normals[:, 1, h // 2:] = -1.0  # floor faces up (y down)
    normals[:, 2, : h // 2] = -1.0  # wall faces the camera
    image = (depth[:, None] * 18).clamp(0, 255).to(torch.uint8).expand(2, 3, h, w).clone()
    image[:, 0] = torch.randint(0, 256, (2, h, w), generator=g, dtype=torch.uint8)
    return {"image": image, "depth": depth, "normals": normals,
            "has": {"depth": torch.tensor([True, True]), "normals": torch.tensor([True, True])}}


def test_a_tiny_model_lowers_both_losses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    registry = default_registry()  # the entry points register depth and normals
    cfg = load_config(None, ["model.tasks=[depth, normals]", "model.backbone=resnet18",
                             "model.fpn_channels=8",
                             "model.heads={depth: {conv_dims: 8}, normals: {conv_dims: 8}}",
                             "tracking.enabled=false", f"train.out_dir={tmp_path}"])
    model = build_model(cfg, CARD, registry=registry).train()
    batch = _toy_batch()
    with torch.no_grad():
        first = model.predict(batch)["depth"]
    assert all(abs(float(p.median()) - 3.0) < 0.3 for p in first)  # init_depth
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(15):
        terms = model.losses(model(batch), batch)
        history.append({k: float(v.detach()) for k, v in terms.items()})
        optimizer.zero_grad()
        model.total_loss(terms).backward()
        optimizer.step()
    assert set(history[0]) == {"depth/silog", "normals/cosine"}
    for key in history[0]:
        assert history[-1][key] < 0.7 * history[0][key], (key, history[0][key], history[-1][key])
