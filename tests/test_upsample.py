"""Upsampling operators: shapes, registry errors, and the theory they rest on (adjointness of
transposed convolution, bilinear initialisation, checkerboard artifacts, unpooling)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.nn.convex_upsample import (
    BILINEAR_FLOOR,
    ConvexUpsample,
    bilinear_neighbour_weights,
    convex_combine,
    fit_to,
)
from pipeline.nn.upsample import (
    UPSAMPLERS,
    MaxUnpool,
    bilinear_kernel,
    build_upsampler,
    transposed_kernel_size,
)

BUILT_INS = (
    "nearest",
    "bed_of_nails",
    "max_unpool",
    "transposed",
    "bilinear",
    "resize_conv",
    "pixel_shuffle",
)


def _run(name: str, module: torch.nn.Module, x: torch.Tensor, factor: int) -> torch.Tensor:
    """Forward ``x`` through ``module``; ``max_unpool`` gets indices from pooling a f-times larger map."""
    if name != "max_unpool":
        return module(x)
    b, c, h, w = x.shape
    _, indices = F.max_pool2d(torch.randn(b, c, h * factor, w * factor), factor, factor, return_indices=True)
    return module(x, indices)


# ---------------------------------------------------------------------------------------------
# registry and shapes


def test_all_built_ins_registered() -> None:
    assert set(BUILT_INS) <= set(UPSAMPLERS)


@pytest.mark.parametrize("name", BUILT_INS)
@pytest.mark.parametrize("size", [(7, 9), (1, 1)])
@pytest.mark.parametrize(("in_ch", "out_ch", "factor"), [(3, 5, 2), (4, 4, 2), (2, 3, 3)])
def test_output_shape(name: str, size: tuple[int, int], in_ch: int, out_ch: int, factor: int) -> None:
    kwargs = {"bilinear_init": True} if name == "transposed" and in_ch == out_ch else {}
    module = build_upsampler(name, in_channels=in_ch, out_channels=out_ch, factor=factor, **kwargs)
    x = torch.randn(2, in_ch, *size)
    out = _run(name, module, x, factor)
    assert out.shape == (2, out_ch, size[0] * factor, size[1] * factor)


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5])
def test_transposed_kernel_gives_exact_factor(factor: int) -> None:
    k = transposed_kernel_size(factor)
    assert k == 2 * factor - factor % 2
    for h in (1, 6, 7):
        assert (h - 1) * factor - 2 * (factor // 2) + k == h * factor


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ConfigError, match="unknown upsampler 'lanczos'") as info:
        build_upsampler("lanczos", in_channels=1, out_channels=1)
    for name in BUILT_INS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("nearest", {"mode": "bilinear"}, r"unknown options \['mode'\]; allowed: none"),
        ("resize_conv", {"mode": "bicubic"}, "mode must be one of"),
        ("resize_conv", {"kernel_size": 2}, "kernel_size must be odd"),
        ("transposed", {"factor": 0}, "factor must be an integer >= 1, got 0"),
        ("transposed", {"factor": 1.5}, "factor must be an integer"),
        ("bilinear", {"out_channels": 0}, "in_channels, out_channels must be >= 1"),
    ],
)
def test_bad_options_raise_config_error(name: str, kwargs: dict, match: str) -> None:
    args = {"in_channels": 2, "out_channels": 2, **kwargs}
    with pytest.raises(ConfigError, match=match):
        build_upsampler(name, **args)


def test_bilinear_init_needs_equal_channels() -> None:
    with pytest.raises(ConfigError, match="bilinear_init needs in_channels == out_channels, got 2, 3"):
        build_upsampler("transposed", in_channels=2, out_channels=3, bilinear_init=True)


# ---------------------------------------------------------------------------------------------
# transposed convolution is the adjoint of convolution


@pytest.mark.parametrize("kernel", [3, 4])
@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_transposed_conv_is_adjoint_of_conv(kernel: int, size: tuple[int, int]) -> None:
    """<conv(x, W), y> == <x, conv_transpose(y, W)>: conv_transpose2d applies the transpose of the
    linear map conv2d (same W, stride, padding); output_padding only picks the size among those
    the strided conv maps to the same output size."""
    gen = torch.Generator().manual_seed(0)
    stride, padding = 2, 1
    weight = torch.randn(5, 3, kernel, kernel, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    conv_x = F.conv2d(x, weight, stride=stride, padding=padding)
    y = torch.randn(conv_x.shape, generator=gen, dtype=torch.float64)
    out_pad = [
        s - ((o - 1) * stride - 2 * padding + kernel) for s, o in zip(size, conv_x.shape[-2:], strict=True)
    ]
    assert all(0 <= p < stride for p in out_pad)
    adj_y = F.conv_transpose2d(y, weight, stride=stride, padding=padding, output_padding=tuple(out_pad))
    assert adj_y.shape == x.shape
    lhs, rhs = (conv_x * y).sum(), (x * adj_y).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factor", [2, 3])
def test_transposed_upsampler_is_adjoint_of_strided_conv(factor: int) -> None:
    """The registered operator is the adjoint of Conv2d(k, stride f, padding f // 2) on fH x fW."""
    torch.manual_seed(0)
    up = build_upsampler("transposed", in_channels=3, out_channels=2, factor=factor, bias=False).double()
    weight = up.conv.weight  # in x out x k x k for the transpose = out x in for the forward conv
    y = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    x = torch.randn(1, 2, 4 * factor, 5 * factor, dtype=torch.float64)
    conv_x = F.conv2d(x, weight, stride=factor, padding=factor // 2)
    assert conv_x.shape == y.shape
    with torch.no_grad():
        torch.testing.assert_close((conv_x * y).sum(), (x * up(y)).sum(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# bilinear initialisation


def test_bilinear_kernel_values() -> None:
    w = bilinear_kernel(2, 2, dtype=torch.float64)
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=torch.float64)
    assert w.shape == (2, 2, 4, 4)
    torch.testing.assert_close(w[0, 0], torch.outer(taps, taps))
    torch.testing.assert_close(w[1, 1], torch.outer(taps, taps))
    assert not w[0, 1].any() and not w[1, 0].any()
    odd = bilinear_kernel(1, 3, dtype=torch.float64)[0, 0, 2]
    torch.testing.assert_close(odd, torch.tensor([1, 2, 3, 2, 1], dtype=torch.float64) / 3)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_bilinear_kernel_matches_interpolate_in_interior(factor: int) -> None:
    """Equal to F.interpolate(bilinear, align_corners=False) except near the border: there the
    transposed conv sums taps over zeros outside the input (implicit zero padding), while
    interpolate clamps the sample position to the edge pixel (replicate)."""
    weight = bilinear_kernel(3, factor, dtype=torch.float64)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    ours = F.conv_transpose2d(x, weight, stride=factor, padding=factor // 2)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    m = max(2, factor)
    torch.testing.assert_close(ours[..., m:-m, m:-m], ref[..., m:-m, m:-m], rtol=1e-12, atol=1e-12)
    # the border does differ, by the missing taps: on ones the corner is below 1
    ones = torch.ones(1, 3, 6, 7, dtype=torch.float64)
    assert F.conv_transpose2d(ones, weight, stride=factor, padding=factor // 2)[0, 0, 0, 0] < 1


@pytest.mark.parametrize("factor", [2, 3])
def test_bilinear_init_upsampler_matches_interpolate_in_interior(factor: int) -> None:
    """The module (float32 weights) with ``bilinear_init=True``: same comparison, float32 tolerance."""
    up = build_upsampler("transposed", in_channels=3, out_channels=3, factor=factor, bilinear_init=True)
    torch.testing.assert_close(up.conv.weight.detach(), bilinear_kernel(3, factor))
    assert not up.conv.bias.any()
    x = torch.randn(1, 3, 5, 6)
    with torch.no_grad():
        ours = up(x)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    m = max(2, factor)
    torch.testing.assert_close(ours[..., m:-m, m:-m], ref[..., m:-m, m:-m], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# checkerboard artifacts


def _interior(y: torch.Tensor, margin: int = 2) -> torch.Tensor:
    return y[..., margin:-margin, margin:-margin]


@pytest.mark.parametrize("kernel", [3, 4])
def test_random_transposed_conv_checkerboards_constant_input(kernel: int) -> None:
    """Stride 2 splits the output into 4 phases; each sums a different subset of the (random) taps,
    so a constant input becomes a period-2 pattern. Kernel 3 (uneven overlap: 1, 2 or 4 taps per
    output) and kernel 4 (even overlap: always 4 taps, but different ones) both show it."""
    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose2d(4, 4, kernel, stride=2, padding=1, output_padding=kernel % 2).double()
    with torch.no_grad():
        out = _interior(conv(torch.ones(1, 4, 8, 8, dtype=torch.float64)))
    assert out.var(dim=(-2, -1)).min() > 1e-3
    torch.testing.assert_close(out[..., 2:, :], out[..., :-2, :], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[..., :, 2:], out[..., :, :-2], rtol=0, atol=1e-12)


def test_registered_transposed_random_init_checkerboards() -> None:
    torch.manual_seed(1)
    up = build_upsampler("transposed", in_channels=4, out_channels=4).double()
    with torch.no_grad():
        out = _interior(up(torch.ones(1, 4, 8, 8, dtype=torch.float64)))
    assert out.var(dim=(-2, -1)).min() > 1e-3


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resize_conv", {"mode": "nearest"}),
        ("resize_conv", {"mode": "bilinear"}),
        ("transposed", {"bilinear_init": True}),
    ],
)
def test_constant_input_gives_constant_interior(name: str, kwargs: dict) -> None:
    """Resize-convolution: the resize of a constant is constant, and a conv of a constant is
    constant away from its zero padding. A bilinear-initialised transposed conv ties the taps so
    that every phase sums to 1."""
    torch.manual_seed(0)
    up = build_upsampler(name, in_channels=4, out_channels=4, **kwargs).double()
    with torch.no_grad():
        out = _interior(up(torch.full((1, 4, 8, 8), 3.0, dtype=torch.float64)))
    assert out.var(dim=(-2, -1)).max() < 1e-20


# ---------------------------------------------------------------------------------------------
# unpooling and zero insertion


def test_max_unpool_restores_argmax_positions() -> None:
    x = torch.randn(2, 3, 4, 6)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    out = MaxUnpool(in_channels=3, out_channels=3)(pooled, indices)
    expected = torch.zeros_like(x)
    for i in range(2):
        for j in range(3):
            cell = x[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            peak = cell == cell.amax(dim=(-2, -1), keepdim=True)
            expected[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = torch.where(peak, cell, 0.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out != 0).sum() == pooled.numel()


def test_max_unpool_odd_encoder_size_needs_output_size() -> None:
    x = torch.randn(1, 2, 7, 9)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True, ceil_mode=True)  # 4x5
    out = MaxUnpool(in_channels=2, out_channels=2)(pooled, indices, output_size=x.shape[-2:])
    assert out.shape == x.shape
    torch.testing.assert_close(out.flatten(2).gather(2, indices.flatten(2)), pooled.flatten(2))


def test_max_unpool_rejects_mismatched_indices() -> None:
    with pytest.raises(ValueError, match=r"indices shape \(1, 2, 2, 2\) must equal x shape \(1, 2, 3, 3\)"):
        MaxUnpool(in_channels=2, out_channels=2)(
            torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 2, 2, dtype=torch.int64)
        )


@pytest.mark.parametrize("factor", [2, 3])
def test_bed_of_nails_keeps_top_left(factor: int) -> None:
    x = torch.randn(2, 3, 3, 5)
    out = build_upsampler("bed_of_nails", in_channels=3, out_channels=3, factor=factor)(x)
    torch.testing.assert_close(out[..., ::factor, ::factor], x, rtol=0, atol=0)
    rest = out.clone()
    rest[..., ::factor, ::factor] = 0
    assert not rest.any()


def test_bed_of_nails_projection_keeps_zeros() -> None:
    up = build_upsampler("bed_of_nails", in_channels=3, out_channels=2)
    out = up(torch.randn(1, 3, 3, 4))
    rest = out.detach().clone()
    rest[..., ::2, ::2] = 0
    assert not rest.any()


def test_upsamplers_are_differentiable() -> None:
    for name in BUILT_INS:
        module = build_upsampler(name, in_channels=2, out_channels=3)
        x = torch.randn(1, 2, 3, 3, requires_grad=True)
        _run(name, module, x, 2).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), name


# ---------------------------------------------------------------------------------------------
# convex upsampling (RAFT)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_bilinear_neighbour_weights_are_bilinear_interpolation(factor: int) -> None:
    w = bilinear_neighbour_weights(factor)
    assert w.shape == (9, factor, factor)
    assert torch.allclose(w.sum(0), torch.ones(factor, factor, dtype=torch.float64))
    # exact weights, summed over the 3x3 neighbourhood, give F.interpolate on a one-hot map
    values = torch.rand(1, 1, 6, 5, dtype=torch.float64)
    logits = w.clamp_min(1e-300).log().reshape(1, -1, 1, 1).expand(1, -1, 6, 5)
    ours = convex_combine(values, logits, factor)
    reference = F.interpolate(values, scale_factor=factor, mode="bilinear", align_corners=False)
    assert torch.allclose(ours, reference, atol=1e-12)  # borders too: replicate = clamping


def test_convex_upsample_starts_as_bilinear_and_keeps_sizes() -> None:
    torch.manual_seed(0)
    up = ConvexUpsample(8, factor=4)
    values, features = torch.rand(2, 3, 5, 7), torch.randn(2, 8, 5, 7)
    out = up(values, features)
    assert out.shape == (2, 3, 20, 28)
    reference = F.interpolate(values, scale_factor=4, mode="bilinear", align_corners=False)
    assert (out - reference).abs().max() < 10 * BILINEAR_FLOOR  # only the floored zeros leak
    assert fit_to(out, (18, 26), 4).shape == (2, 3, 18, 26)  # ceil padding cropped
    assert torch.equal(fit_to(out, (18, 26), 4), out[..., :18, :26])
    assert fit_to(out, (9, 9), 4).shape == (2, 3, 9, 9)  # any other size: resized


def test_convex_weights_keep_an_edge_that_bilinear_blurs() -> None:
    """A step at a coarse-pixel boundary: weights that take every output pixel from its own coarse
    pixel reproduce it exactly, bilinear does not, and every output stays in its 3x3 range."""
    f = 4
    values = torch.tensor([[1.0, 1.0, 10.0, 10.0]]).reshape(1, 1, 1, 4).expand(1, 1, 3, 4).contiguous()
    own = torch.full((1, 9, f, f, 3, 4), -30.0)
    own[:, 4] = 30.0  # all weight on the centre neighbour
    sharp = convex_combine(values, own.reshape(1, 9 * f * f, 3, 4), f)
    assert torch.allclose(sharp, values.repeat_interleave(f, -1).repeat_interleave(f, -2))
    blurred = F.interpolate(values, scale_factor=f, mode="bilinear", align_corners=False)
    assert ((blurred > 1.0) & (blurred < 10.0)).any()
    torch.manual_seed(1)
    random = convex_combine(values, torch.randn(1, 9 * f * f, 3, 4) * 5, f)
    assert random.min() >= 1.0 - 1e-5 and random.max() <= 10.0 + 1e-5  # float32 rounding


def test_convex_upsample_learns_a_sharp_edge() -> None:
    """Trained against the sharp target of a step, the weight predictor beats its bilinear start."""
    torch.manual_seed(0)
    f = 4
    coarse = torch.tensor([[0.0, 0.0, 3.0, 3.0]]).reshape(1, 1, 1, 4).expand(4, 1, 4, 4).contiguous()
    target = coarse.repeat_interleave(f, -1).repeat_interleave(f, -2)
    features = torch.cat([coarse, (coarse > 0).float()], 1)
    up = ConvexUpsample(2, factor=f, hidden=8)
    opt = torch.optim.Adam(up.parameters(), lr=0.05)
    start = F.l1_loss(up(coarse, features), target).item()
    for _ in range(60):
        opt.zero_grad()
        loss = F.l1_loss(up(coarse, features), target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * start


def test_convex_combine_rejects_mismatched_weights() -> None:
    with pytest.raises(ValueError, match=r"weight_logits: expected shape \(1, 36, 2, 2\), "
                                         r"got \(1, 9, 2, 2\)"):
        convex_combine(torch.zeros(1, 1, 2, 2), torch.zeros(1, 9, 2, 2), 2)
