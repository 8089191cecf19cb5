"""Upsampling operators for dense decoders, registered by name.

Every operator maps Bx``in_channels``xHxW to Bx``out_channels``x(f*H)x(f*W) for an integer factor
``f >= 1``, for any H, W >= 1 (odd sizes included):

- ``nearest``, ``bilinear``: ``F.interpolate`` (bilinear with ``align_corners=False``); a 1x1 conv
  only when the channel counts differ, applied *before* resizing. Both resizes are per-channel
  convex combinations, so they commute exactly with a 1x1 conv (bias included) and the conv is
  f^2 times cheaper at the input resolution.
- ``bed_of_nails``: zero insertion; each input value lands at the top-left of its fxf cell.
- ``max_unpool``: each value goes back to the argmax position recorded by the encoder's pooling
  (``forward(x, indices, output_size=None)``).
- ``transposed``: ``ConvTranspose2d`` with kernel ``2f - f % 2``, stride ``f``, padding ``f // 2``
  (output exactly f*H), optionally initialised to bilinear interpolation (Long et al., FCN).
- ``resize_conv``: nearest or bilinear resize, then a kxk conv (Odena et al., 2016, "Deconvolution
  and Checkerboard Artifacts"): no checkerboard on constant inputs, whatever the weights.
- ``pixel_shuffle``: a kxk conv to ``out_channels * f**2`` channels, then ``PixelShuffle(f)``
  (Shi et al., 2016, ESPCN).

Build one with ``build_upsampler(name, in_channels=..., out_channels=..., factor=..., **options)``;
add one with ``@register_upsampler("name")`` on a builder taking those keywords.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.named_registry import NamedRegistry

RESIZE_MODES = ("nearest", "bilinear")

UpsamplerBuilder = Callable[..., nn.Module]
UPSAMPLERS: NamedRegistry[UpsamplerBuilder] = NamedRegistry(
    "upsampler", required=("in_channels", "out_channels", "factor"))


def register_upsampler(name: str) -> Callable[[UpsamplerBuilder], UpsamplerBuilder]:
    """Decorator registering ``builder(*, in_channels, out_channels, factor, **options)``."""
    return UPSAMPLERS.register(name)


def build_upsampler(
    name: str, *, in_channels: int, out_channels: int, factor: int = 2, **options: Any
) -> nn.Module:
    """Build the registered upsampler ``name`` (see the module docstring for the built-ins).

    Raises:
        ConfigError: unknown ``name`` (listing the registered ones), an option the upsampler does
            not take, or a bad value (channels, factor, mode, kernel size).
    """
    builder = UPSAMPLERS.lookup(name)
    accepted = set(UPSAMPLERS.options(name))
    unknown = sorted(set(options) - accepted)
    if unknown:
        allowed = ", ".join(sorted(accepted)) or "none"
        raise ConfigError(f"upsampler {name!r} got unknown options {unknown}; allowed: {allowed}")
    try:
        return builder(in_channels=in_channels, out_channels=out_channels, factor=factor, **options)
    except ValueError as exc:
        raise ConfigError(f"upsampler {name!r}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# helpers


def transposed_kernel_size(factor: int) -> int:
    """Kernel ``2f - f % 2`` of the ``transposed`` upsampler; with stride f, padding f // 2 the
    output is exactly f times the input (``(H - 1) f - 2 (f // 2) + k = f H``)."""
    _check_factor(factor)
    return 2 * factor - factor % 2


def bilinear_kernel(channels: int, factor: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """ConvTranspose2d weight (``channels`` x ``channels`` x k x k, k = ``2f - f % 2``) that
    upsamples by ``factor`` with bilinear interpolation, each channel on its own.

    The 2-D kernel is the outer product of the 1-D tent ``1 - |i - c| / f`` (c the kernel centre,
    i = 0..k-1), FCN's ``upsample_filt``; it sits on the diagonal (channel i -> channel i), every
    off-diagonal kernel is zero. With stride f and padding ``f // 2`` it reproduces
    ``F.interpolate(mode="bilinear", align_corners=False)`` except within f pixels of the border,
    where the transposed conv sees zeros outside the input while ``interpolate`` clamps to the edge.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    size = transposed_kernel_size(factor)
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(size, dtype=torch.float64) - centre).abs() / factor
    weight = torch.zeros(channels, channels, size, size, dtype=torch.float64)
    weight[range(channels), range(channels)] = torch.outer(taps, taps)
    return weight.to(dtype)


def _check_factor(factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")


def _check_channels(in_channels: int, out_channels: int) -> None:
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels, out_channels must be >= 1; got {in_channels}, {out_channels}")


def _check_kernel(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1 (same padding), got {kernel_size}")


def _check_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")


def _projection(in_channels: int, out_channels: int, *, bias: bool = True) -> nn.Module:
    """A 1x1 conv when the channel counts differ, else the identity."""
    if in_channels == out_channels:
        return nn.Identity()
    return nn.Conv2d(in_channels, out_channels, 1, bias=bias)


def _resize(x: Tensor, factor: int, mode: str) -> Tensor:
    if mode == "bilinear":
        return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    return F.interpolate(x, scale_factor=factor, mode="nearest")


class _Upsampler(nn.Module):
    """Shared arguments and checks; ``in_channels``, ``out_channels``, ``factor`` attributes."""

    def __init__(self, *, in_channels: int, out_channels: int, factor: int) -> None:
        super().__init__()
        _check_channels(in_channels, out_channels)
        _check_factor(factor)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.factor = factor

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, factor={self.factor}"


# ---------------------------------------------------------------------------------------------
# fixed resizes


@register_upsampler("nearest")
class NearestUpsample(_Upsampler):
    """Nearest-neighbour resize (each value fills its fxf cell); 1x1 conv first if channels differ."""

    def __init__(self, *, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, factor=factor)
        self.proj = _projection(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Bx C_in x H x W -> Bx C_out x fH x fW."""
        return _resize(self.proj(x), self.factor, "nearest")


@register_upsampler("bilinear")
class BilinearUpsample(_Upsampler):
    """Bilinear resize (``align_corners=False``, edge-clamped); 1x1 conv first if channels differ."""

    def __init__(self, *, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, factor=factor)
        self.proj = _projection(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Bx C_in x H x W -> Bx C_out x fH x fW."""
        return _resize(self.proj(x), self.factor, "bilinear")


@register_upsampler("bed_of_nails")
class BedOfNails(_Upsampler):
    """Zero insertion: ``out[..., f*i, f*j] = x[..., i, j]``, zeros elsewhere.

    When channels differ, a 1x1 conv (with bias) runs first, at the input resolution, so the
    inserted zeros stay exactly zero.
    """

    def __init__(self, *, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, factor=factor)
        self.proj = _projection(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Bx C_in x H x W -> Bx C_out x fH x fW."""
        x = self.proj(x)
        b, c, h, w = x.shape
        f = self.factor
        out = x.new_zeros(b, c, h * f, w * f)
        out[..., ::f, ::f] = x
        return out


@register_upsampler("max_unpool")
class MaxUnpool(_Upsampler):
    """Max unpooling (SegNet): every value returns to the position its encoder pooling took it from.

    Needs the indices of an encoder pooling ``F.max_pool2d(kernel_size=f, stride=f,
    return_indices=True)`` (or ``nn.MaxPool2d(f, f, return_indices=True)``) over ``in_channels``
    channels; other positions are zero. When channels differ, a 1x1 conv without bias runs after
    unpooling (the indices address ``in_channels`` maps), so positions where no channel received a
    value stay zero.
    """

    def __init__(self, *, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, factor=factor)
        self.unpool = nn.MaxUnpool2d(kernel_size=factor, stride=factor)
        self.proj = _projection(in_channels, out_channels, bias=False)

    def forward(self, x: Tensor, indices: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        """Bx C_in x H x W values and same-shape int64 ``indices`` (flat positions in the encoder's
        map) -> Bx C_out x fH x fW, or x ``output_size`` = (H', W'), which must be given when the
        encoder's input was not a multiple of f (e.g. pooled with ``ceil_mode=True``)."""
        if indices.shape != x.shape:
            raise ValueError(f"indices shape {tuple(indices.shape)} must equal x shape {tuple(x.shape)}")
        size = None if output_size is None else (int(output_size[-2]), int(output_size[-1]))
        return self.proj(self.unpool(x, indices, output_size=size))


# ---------------------------------------------------------------------------------------------
# learned


@register_upsampler("transposed")
class TransposedConvUpsample(_Upsampler):
    """``ConvTranspose2d(kernel=2f - f % 2, stride=f, padding=f // 2)``: output exactly fH x fW.

    It is the adjoint of the ``Conv2d`` with the same weight, stride and padding. Randomly
    initialised (PyTorch's default) it produces a period-f pattern on constant inputs
    (checkerboard): each output phase sums a different subset of kernel taps.

    Args:
        bilinear_init: initialise the weight to :func:`bilinear_kernel` and the bias to zero (FCN);
            needs ``in_channels == out_channels``.
        bias: learn an additive bias.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        factor: int = 2,
        bilinear_init: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, factor=factor)
        if bilinear_init and in_channels != out_channels:
            raise ValueError(
                f"bilinear_init needs in_channels == out_channels, got {in_channels}, {out_channels}"
            )
        self.conv = nn.ConvTranspose2d(
            in_channels,
            out_channels,
            kernel_size=transposed_kernel_size(factor),
            stride=factor,
            padding=factor // 2,
            bias=bias,
        )
        if bilinear_init:
            with torch.no_grad():
                self.conv.weight.copy_(bilinear_kernel(in_channels, factor))
                if self.conv.bias is not None:
                    self.conv.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Bx C_in x H x W -> Bx C_out x fH x fW."""
        return self.conv(x)


@register_upsampler("resize_conv")
class ResizeConv(_Upsampler):
    """Resize (``mode`` ``"nearest"`` or ``"bilinear"``) then a ``kernel_size`` conv, same padding.

    On a constant input the resize is constant, so the conv output is constant away from the
    zero-padded border (``kernel_size // 2`` pixels): no checkerboard by construction.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        factor: int = 2,
        mode: str = "nearest",
        kernel_size: int = 3,
    ) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, factor=factor)
        _check_mode(mode)
        _check_kernel(kernel_size)
        self.mode = mode
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        """Bx C_in x H x W -> Bx C_out x fH x fW."""
        return self.conv(_resize(x, self.factor, self.mode))


@register_upsampler("pixel_shuffle")
class PixelShuffleUpsample(_Upsampler):
    """Sub-pixel convolution: a ``kernel_size`` conv to ``out_channels * f**2`` channels at the input
    resolution, then ``PixelShuffle(f)`` arranges each group of f^2 channels into an fxf cell."""

    def __init__(self, *, in_channels: int, out_channels: int, factor: int = 2, kernel_size: int = 3) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, factor=factor)
        _check_kernel(kernel_size)
        self.conv = nn.Conv2d(in_channels, out_channels * factor**2, kernel_size, padding=kernel_size // 2)
        self.shuffle = nn.PixelShuffle(factor)

    def forward(self, x: Tensor) -> Tensor:
        """Bx C_in x H x W -> Bx C_out x fH x fW."""
        return self.shuffle(self.conv(x))


__all__ = [
    "RESIZE_MODES",
    "UPSAMPLERS",
    "BedOfNails",
    "BilinearUpsample",
    "MaxUnpool",
    "NearestUpsample",
    "PixelShuffleUpsample",
    "ResizeConv",
    "TransposedConvUpsample",
    "bilinear_kernel",
    "build_upsampler",
    "register_upsampler",
    "transposed_kernel_size",
]
