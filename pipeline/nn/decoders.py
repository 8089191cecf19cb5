"""Dense decoders, registered by name: backbone features in, per-pixel outputs at the input size.

Contract of every decoder ``forward(features, *, output_size)``:

- ``features``: the backbone's output dict (``p2``..``p6``, ``c1``..``c5``, pooling indices; see
  :mod:`pipeline.nn.backbones`); ``output_size`` = (H, W), the input image's size (any, odd
  included).
- returns float Bx``num_outputs``xHxW logits (one channel per class for semantic segmentation,
  one for depth, three for normals; any count >= 1).

Built-ins (``DECODERS``):

- ``fcn32s``, ``fcn16s``, ``fcn8s`` (Long et al., 2015): a 1x1 score layer on ``c5`` (after an
  optional 3x3 ``head_channels`` conv, FCN's fc6/fc7), fused by summation with zero-initialised
  score layers on ``c4`` (16s) and ``c3`` (8s); every upsampling is a learnable transposed conv
  initialised to bilinear interpolation (the ``transposed`` upsampler), cropped to the skip's
  size (FCN's crop layer).
- ``unet`` (Ronneberger et al., 2015): from ``c5`` down to the finest body level, each step
  up-convolves (``transposed`` upsampler, halving to the skip's width), concatenates the skip and
  applies two 3x3 conv-norm-ReLU; the expansion is symmetric to the encoder (stage widths = skip
  widths). A 1x1 classifier at the finest level, then bilinear to the input size.
- ``segnet`` (Badrinarayanan et al., 2017; DeconvNet, Noh et al., 2015): mirror of an encoder that
  returns its max-pooling indices (``vgg11_bn``, ``vgg16_bn``): each stage max-unpools with the
  encoder's indices (``max_unpool`` upsampler, to the exact pre-pooling size) then applies
  ``convs_per_stage`` 3x3 conv-norm-ReLU, the last one narrowing to the next stage's width.
- ``context_basic``, ``context_large`` (Yu and Koltun, 2016): a 1x1 score layer on ``c5`` (the
  front-end's classifier) then the context module: seven 3x3 convs with dilations 1, 1, 2, 4, 8,
  16, 1 (each followed by ReLU) and a 1x1 conv; widths C (basic) or 2C, 2C, 4C, 8C, 16C, 32C, 32C
  (large), C = ``num_outputs``. Identity initialisation: at init the module passes its
  (non-negative) input through unchanged. Meant for a dilated front-end (output stride 8).
- ``aspp`` (DeepLabv3, Chen et al., 2017): atrous spatial pyramid pooling on ``c5`` of a dilated
  backbone (output stride 16 or 8): a 1x1 conv, one 3x3 conv per atrous rate (default 6, 12, 18
  at stride 16, doubled at stride 8) and image pooling (global average, 1x1 conv, upsampled),
  concatenated, projected by a 1x1 conv, then a 3x3 conv and a 1x1 classifier.
- ``psp`` (PSPNet, Zhao et al., 2017): pyramid pooling on ``c5`` (average pooling to 1x1, 2x2,
  3x3, 6x6 bins, 1x1 conv each, upsampled), concatenated with ``c5``, a 3x3 conv and a classifier.
- ``panoptic_fpn`` (Kirillov et al., 2019; the default): :class:`SemanticFPNHead` over p2..p5
  (``upsample: convex``: RAFT's learned convex upsampling of its stride-4 output).
- ``hypercolumns`` (Hariharan et al., 2015): several levels upsampled to the finest one's size
  and concatenated (a hypercolumn per pixel), then a per-pixel classifier (two 1x1 convs).

A task plugin selects its decoder from its options with ``build_task_decoder`` (as the
semantic task does with its ``decoder`` and ``decoder_options``).
``build_decoder(name, feature_spec=..., num_outputs=..., backbone=..., **options)`` checks the
name, the options and the backbone's capabilities (:class:`BackboneInfo`, by default
``feature_spec.info``) and raises a one-line :class:`ConfigError` before anything trains. Add a
decoder with ``@register_decoder("name")`` on a builder
``(feature_spec, *, num_outputs, backbone, **options) -> nn.Module``.

Every decoder with convolutions takes ``norm``: ``"GN"`` (GroupNorm, ``gcd(32, channels)``
groups; works at any batch size), ``"BN"`` or ``"none"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.named_registry import NamedRegistry
from pipeline.nn.backbones import BackboneInfo, FeatureLevel, dilatable_backbones
from pipeline.nn.fpn_heads import SemanticFPNHead, norm_layer
from pipeline.nn.resize import crop_to, upsample_to
from pipeline.nn.upsample import build_upsampler

DECODER_NORMS = ("GN", "BN", "none", "")
CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
"""Dilations of the context module's seven 3x3 layers (Yu and Koltun, Table 1)."""
CONTEXT_LARGE_WIDTHS = (2, 2, 4, 8, 16, 32, 32)
"""Widths of the large context module's seven 3x3 layers, in multiples of C."""

DecoderBuilder = Callable[..., nn.Module]
DECODERS: NamedRegistry[DecoderBuilder] = NamedRegistry(
    "decoder", positional=("feature_spec",), required=("num_outputs", "backbone"))


def register_decoder(name: str) -> Callable[[DecoderBuilder], DecoderBuilder]:
    """Decorator registering ``builder(feature_spec, *, num_outputs, backbone, **options)``."""
    return DECODERS.register(name)


def decoder_options(name: str) -> list[str]:
    """The keyword options the registered decoder ``name`` accepts."""
    return sorted(DECODERS.options(name))


def build_decoder(
    name: str,
    *,
    feature_spec: Mapping[str, FeatureLevel],
    num_outputs: int,
    backbone: BackboneInfo | None = None,
    **options: Any,
) -> nn.Module:
    """Build the registered decoder ``name`` over a backbone with ``feature_spec``.

    Args:
        name: a key of :data:`DECODERS`.
        feature_spec: the backbone's ``{level: FeatureLevel(channels, stride)}``.
        num_outputs: output channels (>= 1).
        backbone: the backbone's capabilities; default ``feature_spec.info`` (a
            :class:`BackboneSpec`), else inferred from the strides (no pooling indices).
        options: the decoder's own options (see each builder).

    Raises:
        ConfigError (one line): unknown ``name`` (listing the registered ones), an option the
            decoder does not take (listing those it takes), a bad value, or a backbone the decoder
            cannot run on (naming decoder, backbone and the fix).
    """
    builder = DECODERS.lookup(name)
    accepted = decoder_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"decoder {name!r} got unknown option {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(accepted) or 'none'}")
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ConfigError(f"decoder {name!r}: num_outputs must be an integer >= 1, got {num_outputs!r}")
    info = backbone or getattr(feature_spec, "info", None) or _infer_info(feature_spec)
    try:
        return builder(feature_spec, num_outputs=num_outputs, backbone=info, **options)
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"decoder {name!r}: {message}") from exc


def build_task_decoder(
    task: str,
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    feature_spec: Mapping[str, FeatureLevel],
    num_outputs: int,
    defaults: Mapping[str, Any] | None = None,
) -> nn.Module:
    """What a dense task plugin calls in ``build_head``: decoder ``name`` (the task's ``decoder``
    option) with ``defaults`` (the task's own settings, e.g. its ``norm``; those the decoder
    does not take are dropped) updated by the user's ``options`` (``decoder_options``). Errors are
    one-line ``ConfigError``s prefixed ``model.heads.<task>.decoder=<name>: ``."""
    kwargs: dict[str, Any] = {}
    if name in DECODERS:
        accepted = set(decoder_options(name))
        kwargs.update((k, v) for k, v in (defaults or {}).items() if k in accepted)
    kwargs.update(options or {})
    try:
        return build_decoder(name, feature_spec=feature_spec, num_outputs=num_outputs, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"model.heads.{task}.decoder={name}: {exc}") from None


def _infer_info(feature_spec: Mapping[str, FeatureLevel]) -> BackboneInfo:
    body = body_levels(feature_spec)
    stride = feature_spec[body[-1]].stride if body else 32
    return BackboneInfo(output_stride=stride, output_strides=(stride,))


# ---------------------------------------------------------------------------------------------
# helpers


def body_levels(feature_spec: Mapping[str, FeatureLevel]) -> list[str]:
    """The body levels ``c<k>`` of ``feature_spec``, finest first."""
    names = [k for k in feature_spec if re.fullmatch(r"c\d+", k)]
    return sorted(names, key=lambda k: int(k[1:]))


def _need_levels(decoder: str, feature_spec: Mapping[str, FeatureLevel], levels: Sequence[str],
                 info: BackboneInfo) -> None:
    missing = [k for k in levels if k not in feature_spec]
    if missing:
        raise ConfigError(f"decoder {decoder!r} needs backbone levels {', '.join(missing)}, which "
                          f"backbone {info.name!r} does not provide (it has {', '.join(feature_spec)})")


def _check_norm(norm: str) -> None:
    if norm not in DECODER_NORMS:
        raise ValueError(f"norm must be one of GN, BN, none; got {norm!r}")


def conv_norm_relu(in_ch: int, out_ch: int, kernel_size: int = 3, *, dilation: int = 1,
                   norm: str = "GN") -> nn.Sequential:
    """``kernel_size`` conv (same padding, no bias when normalised), norm, ReLU."""
    has_norm = norm in ("GN", "BN")
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=dilation * (kernel_size // 2),
                  dilation=dilation, bias=not has_norm),
        norm_layer(norm, out_ch),
        nn.ReLU(inplace=True),
    )


def _positive_ints(name: str, values: Any, *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(values, int | str) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of positive integers, got {values!r}")
    out = tuple(values)
    if (not out and not allow_empty) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in out
    ):
        raise ValueError(f"{name} must be a list of positive integers, got {list(out)!r}")
    return out


def _positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _stride_ratio(coarse: FeatureLevel, fine: FeatureLevel, what: str) -> int:
    if coarse.stride % fine.stride:
        raise ValueError(f"{what}: stride {coarse.stride} is not a multiple of {fine.stride}")
    return coarse.stride // fine.stride


def _init_convs(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _classifier(in_ch: int, num_outputs: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, num_outputs, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def receptive_fields(module: nn.Module) -> list[int]:
    """Receptive field after each ``Conv2d`` of a sequential ``module`` (in module order):
    ``rf += (k - 1) * dilation * jump``, ``jump *= stride``, starting from rf = 1, jump = 1."""
    rf, jump, out = 1, 1, []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            rf += (m.kernel_size[0] - 1) * m.dilation[0] * jump
            jump *= m.stride[0]
            out.append(rf)
    return out


# ---------------------------------------------------------------------------------------------
# FCN


class FCNDecoder(nn.Module):
    """FCN-32s / 16s / 8s over body levels ``levels`` (coarsest first, e.g. c5, c4, c3).

    ``score[c5]`` (after the optional ``head``) is upsampled by the stride ratio to the next
    level (transposed conv, bilinear init), cropped to its size and summed with that level's
    score; the result at the finest level is upsampled by its stride to the input and cropped.
    """

    def __init__(self, feature_spec: Mapping[str, FeatureLevel], *, levels: Sequence[str],
                 num_outputs: int, head_channels: int = 0) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.num_outputs = num_outputs
        top = feature_spec[self.levels[0]]
        head_channels = _positive_int("head_channels", head_channels, minimum=0)
        if head_channels:
            self.head: nn.Module = nn.Sequential(nn.Conv2d(top.channels, head_channels, 3, padding=1),
                                                 nn.ReLU(inplace=True))
            _init_convs(self.head)
        else:
            self.head = nn.Identity()
        self.score = nn.ModuleDict()
        self.score[self.levels[0]] = _classifier(head_channels or top.channels, num_outputs)
        self.up = nn.ModuleDict()
        for coarse, fine in zip(self.levels, self.levels[1:], strict=False):
            score = nn.Conv2d(feature_spec[fine].channels, num_outputs, 1)
            nn.init.zeros_(score.weight)  # FCN: skip score layers start at zero
            nn.init.zeros_(score.bias)
            self.score[fine] = score
            factor = _stride_ratio(feature_spec[coarse], feature_spec[fine], f"FCN skip {coarse}->{fine}")
            self.up[fine] = self._upsampler(factor)
        self.final_up = self._upsampler(feature_spec[self.levels[-1]].stride)

    def _upsampler(self, factor: int) -> nn.Module:
        if factor == 1:
            return nn.Identity()
        return build_upsampler("transposed", in_channels=self.num_outputs, out_channels=self.num_outputs,
                               factor=factor, bilinear_init=True)

    def forward(self, features: Mapping[str, Tensor], *, output_size: Sequence[int]) -> Tensor:
        x = self.score[self.levels[0]](self.head(features[self.levels[0]]))
        for fine in self.levels[1:]:
            skip = self.score[fine](features[fine])
            x = crop_to(self.up[fine](x), skip.shape[-2:]) + skip
        return crop_to(self.final_up(x), output_size)


def _fcn(name: str, levels: tuple[str, ...]) -> DecoderBuilder:
    def builder(feature_spec: Mapping[str, FeatureLevel], *, num_outputs: int, backbone: BackboneInfo,
                head_channels: int = 0) -> nn.Module:
        _need_levels(name, feature_spec, levels, backbone)
        return FCNDecoder(feature_spec, levels=levels, num_outputs=num_outputs, head_channels=head_channels)

    builder.__doc__ = (f"{name}: score layers on {', '.join(levels)} fused by summation, learnable "
                       "bilinear-initialised transposed-conv upsampling. ``head_channels``: width of "
                       "a 3x3 conv + ReLU before the c5 score layer (0 = none).")
    return builder


register_decoder("fcn32s")(_fcn("fcn32s", ("c5",)))
register_decoder("fcn16s")(_fcn("fcn16s", ("c5", "c4")))
register_decoder("fcn8s")(_fcn("fcn8s", ("c5", "c4", "c3")))


# ---------------------------------------------------------------------------------------------
# U-Net


class UNetDecoder(nn.Module):
    """Symmetric expansion over ``levels`` (coarsest first): up-conv to ``widths[i]`` channels,
    crop, concatenate the skip, two 3x3 conv-norm-ReLU; 1x1 classifier; bilinear to the input."""

    def __init__(self, feature_spec: Mapping[str, FeatureLevel], *, levels: Sequence[str],
                 widths: Sequence[int], num_outputs: int, norm: str) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.up = nn.ModuleDict()
        self.blocks = nn.ModuleDict()
        ch = feature_spec[self.levels[0]].channels
        steps = zip(self.levels, self.levels[1:], strict=False)
        for (coarse, fine), width in zip(steps, widths, strict=True):
            factor = _stride_ratio(feature_spec[coarse], feature_spec[fine], f"U-Net step {coarse}->{fine}")
            self.up[fine] = build_upsampler("transposed", in_channels=ch, out_channels=width, factor=factor)
            self.blocks[fine] = nn.Sequential(
                conv_norm_relu(width + feature_spec[fine].channels, width, norm=norm),
                conv_norm_relu(width, width, norm=norm),
            )
            ch = width
        _init_convs(self.blocks)
        self.classifier = _classifier(ch, num_outputs)

    def forward(self, features: Mapping[str, Tensor], *, output_size: Sequence[int]) -> Tensor:
        x = features[self.levels[0]]
        for fine in self.levels[1:]:
            skip = features[fine]
            x = crop_to(self.up[fine](x), skip.shape[-2:])
            x = self.blocks[fine](torch.cat([x, skip], dim=1))
        return upsample_to(self.classifier(x), output_size)


@register_decoder("unet")
def unet(feature_spec: Mapping[str, FeatureLevel], *, num_outputs: int, backbone: BackboneInfo,
         levels: Sequence[str] | None = None, widths: Sequence[int] | None = None,
         norm: str = "GN") -> nn.Module:
    """U-Net expansion from the coarsest to the finest of ``levels`` (default every body level,
    c1..c5 where present); ``widths``: channels of each expansion stage, coarse to fine (default
    the skip's channels: symmetric to the encoder)."""
    _check_norm(norm)
    levels = tuple(levels) if levels is not None else tuple(reversed(body_levels(feature_spec)))
    if len(levels) < 2:
        raise ConfigError(f"decoder 'unet' needs at least two body levels; backbone {backbone.name!r} "
                          f"provides {', '.join(body_levels(feature_spec)) or 'none'}")
    _need_levels("unet", feature_spec, levels, backbone)
    levels = tuple(sorted(levels, key=lambda k: -feature_spec[k].stride))
    if widths is None:
        widths = [feature_spec[k].channels for k in levels[1:]]
    widths = _positive_ints("widths", widths)
    if len(widths) != len(levels) - 1:
        raise ValueError(f"widths needs {len(levels) - 1} values (one per expansion stage), "
                         f"got {len(widths)}")
    return UNetDecoder(feature_spec, levels=levels, widths=widths, num_outputs=num_outputs, norm=norm)


# ---------------------------------------------------------------------------------------------
# SegNet / DeconvNet


class SegNetDecoder(nn.Module):
    """Mirror of a pooling encoder: per pooling k (last first) ``max_unpool`` with
    ``pool{k}_indices`` to the pre-pooling size ``ceil(H / 2**(k-1))``, then ``convs_per_stage``
    3x3 conv-norm-ReLU ending at the width of pooling k-1's map; a 1x1 classifier at full size."""

    def __init__(self, feature_spec: Mapping[str, FeatureLevel], *, pools: Sequence[str], top: str,
                 num_outputs: int, convs_per_stage: int, norm: str) -> None:
        super().__init__()
        self.pools = tuple(reversed(pools))  # deepest first
        self.top = top
        self.unpool = nn.ModuleDict()
        self.blocks = nn.ModuleDict()
        self.pre_pool_strides: dict[str, int] = {}
        widths = [feature_spec[p].channels for p in self.pools]
        for i, pool in enumerate(self.pools):
            ch = widths[i]
            out = widths[i + 1] if i + 1 < len(widths) else widths[i]
            self.unpool[pool] = build_upsampler("max_unpool", in_channels=ch, out_channels=ch)
            convs = [conv_norm_relu(ch, ch if j < convs_per_stage - 1 else out, norm=norm)
                     for j in range(convs_per_stage)]
            self.blocks[pool] = nn.Sequential(*convs)
            self.pre_pool_strides[pool] = feature_spec[pool].stride // 2
        _init_convs(self.blocks)
        self.classifier = _classifier(widths[-1], num_outputs)

    def forward(self, features: Mapping[str, Tensor], *, output_size: Sequence[int]) -> Tensor:
        h, w = int(output_size[-2]), int(output_size[-1])
        x = features[self.top]
        for pool in self.pools:
            s = self.pre_pool_strides[pool]
            x = self.unpool[pool](x, features[pool], output_size=(-(-h // s), -(-w // s)))
            x = self.blocks[pool](x)
        return self.classifier(x)


@register_decoder("segnet")
def segnet(feature_spec: Mapping[str, FeatureLevel], *, num_outputs: int, backbone: BackboneInfo,
           convs_per_stage: int = 2, norm: str = "GN") -> nn.Module:
    """SegNet / DeconvNet decoder: max unpooling with the encoder's indices (needs a backbone with
    ``pool_indices``, e.g. vgg11_bn / vgg16_bn); ``convs_per_stage`` 3x3 convs after each."""
    if not backbone.pool_indices:
        index_backbones = "vgg11_bn or vgg16_bn"
        raise ConfigError(f"decoder 'segnet' needs an encoder that returns its max-pooling indices; "
                          f"backbone {backbone.name!r} does not (use model.backbone={index_backbones})")
    _check_norm(norm)
    convs_per_stage = _positive_int("convs_per_stage", convs_per_stage)
    pools = sorted(backbone.pool_indices, key=lambda k: feature_spec[k].stride)
    _need_levels("segnet", feature_spec, pools, backbone)
    for pool in pools:
        if feature_spec[pool].stride < 2 or feature_spec[pool].stride & (feature_spec[pool].stride - 1):
            raise ValueError(f"pooling indices {pool!r} must have a power-of-two stride >= 2")
    last = feature_spec[pools[-1]]
    top = next((k for k in body_levels(feature_spec) if feature_spec[k] == last), None)
    if top is None:
        raise ValueError(f"no body level matches the last pooling {pools[-1]!r}")
    return SegNetDecoder(feature_spec, pools=pools, top=top, num_outputs=num_outputs,
                         convs_per_stage=convs_per_stage, norm=norm)


# ---------------------------------------------------------------------------------------------
# Context module (Yu and Koltun, "Multi-Scale Context Aggregation by Dilated Convolutions")


def _identity_weight(out_ch: int, in_ch: int, kernel_size: int, channels: int, noise: float) -> Tensor:
    """Yu and Koltun's identity initialisation (their Eq. 5) for a layer from ``in_ch`` to
    ``out_ch`` channels of a module over ``channels`` (C) score maps: the centre tap from input
    a to output b is ``C / out_ch`` when ``floor(a C / in_ch) == floor(b C / out_ch)`` (the same
    score map), else 0; plus N(0, (``noise`` * C / out_ch)^2) everywhere, which breaks the symmetry
    between copies of a map in the large module."""
    weight = torch.zeros(out_ch, in_ch, kernel_size, kernel_size)
    a = torch.arange(in_ch) * channels // in_ch
    b = torch.arange(out_ch) * channels // out_ch
    same = (b[:, None] == a[None, :]).float()
    weight[:, :, kernel_size // 2, kernel_size // 2] = same * (channels / out_ch)
    if noise > 0:
        weight += torch.randn_like(weight) * noise * channels / out_ch
    return weight


class ContextModule(nn.Module):
    """The context module on C score maps: ``layers`` holds seven 3x3 convs with dilations
    :data:`CONTEXT_DILATIONS` (ReLU after each) and the final 1x1 conv (no ReLU). Basic: every
    layer C wide; large: :data:`CONTEXT_LARGE_WIDTHS` times C. Identity-initialised: with
    ``init_noise=0`` the output equals the input wherever the input is >= 0 (the ReLUs truncate
    negative values, as in the paper); biases start at zero."""

    def __init__(self, channels: int, *, large: bool = False, init_noise: float = 0.0) -> None:
        super().__init__()
        widths = [m * channels for m in CONTEXT_LARGE_WIDTHS] if large else [channels] * 7
        layers: list[nn.Module] = []
        in_ch = channels
        for width, dilation in zip(widths, CONTEXT_DILATIONS, strict=True):
            conv = nn.Conv2d(in_ch, width, 3, padding=dilation, dilation=dilation)
            layers += [conv, nn.ReLU()]
            in_ch = width
        layers.append(nn.Conv2d(in_ch, channels, 1))
        self.layers = nn.Sequential(*layers)
        with torch.no_grad():
            for m in self.layers:
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_(_identity_weight(m.out_channels, m.in_channels, m.kernel_size[0],
                                                    channels, init_noise))
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ContextDecoder(nn.Module):
    """Front-end score layer (1x1 conv on ``in_feature``) -> context module -> bilinear upsampling."""

    def __init__(self, in_channels: int, *, in_feature: str, num_outputs: int, large: bool,
                 init_noise: float) -> None:
        super().__init__()
        self.in_feature = in_feature
        self.score = nn.Conv2d(in_channels, num_outputs, 1)
        self.context = ContextModule(num_outputs, large=large, init_noise=init_noise)

    def forward(self, features: Mapping[str, Tensor], *, output_size: Sequence[int]) -> Tensor:
        return upsample_to(self.context(self.score(features[self.in_feature])), output_size)


def _context(name: str, large: bool) -> DecoderBuilder:
    def builder(feature_spec: Mapping[str, FeatureLevel], *, num_outputs: int, backbone: BackboneInfo,
                in_feature: str = "c5", init_noise: float = 1e-3 if large else 0.0) -> nn.Module:
        _need_levels(name, feature_spec, [in_feature], backbone)
        if isinstance(init_noise, bool) or not isinstance(init_noise, int | float) or init_noise < 0:
            raise ValueError(f"init_noise must be a number >= 0, got {init_noise!r}")
        return ContextDecoder(feature_spec[in_feature].channels, in_feature=in_feature,
                              num_outputs=num_outputs, large=large, init_noise=float(init_noise))

    builder.__doc__ = (f"{name}: score layer on ``in_feature`` then the {'large' if large else 'basic'} "
                       "context module (identity init; ``init_noise`` relative std of Eq. 5's noise).")
    return builder


register_decoder("context_basic")(_context("context_basic", large=False))
register_decoder("context_large")(_context("context_large", large=True))


# ---------------------------------------------------------------------------------------------
# DeepLabv3 ASPP


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 conv, one 3x3 conv per rate, image pooling; concatenated
    and projected by a 1x1 conv (norm, ReLU, dropout)."""

    def __init__(self, in_ch: int, *, rates: Sequence[int], channels: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_norm_relu(in_ch, channels, 1, norm=norm)])
        self.branches.extend(conv_norm_relu(in_ch, channels, 3, dilation=r, norm=norm) for r in rates)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                        conv_norm_relu(in_ch, channels, 1, norm=norm))
        self.project = nn.Sequential(conv_norm_relu((len(rates) + 2) * channels, channels, 1, norm=norm),
                                     nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(upsample_to(self.image_pool(x), x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class ASPPDecoder(nn.Module):
    """DeepLabv3 head: ASPP on ``in_feature``, 3x3 conv-norm-ReLU, 1x1 classifier, bilinear."""

    def __init__(self, in_ch: int, *, in_feature: str, num_outputs: int, rates: Sequence[int],
                 channels: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.in_feature = in_feature
        self.rates = tuple(rates)
        self.aspp = ASPP(in_ch, rates=rates, channels=channels, norm=norm, dropout=dropout)
        self.conv = conv_norm_relu(channels, channels, norm=norm)
        _init_convs(self)
        self.classifier = _classifier(channels, num_outputs)

    def forward(self, features: Mapping[str, Tensor], *, output_size: Sequence[int]) -> Tensor:
        return upsample_to(self.classifier(self.conv(self.aspp(features[self.in_feature]))), output_size)


def _check_dropout(dropout: Any) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


@register_decoder("aspp")
def aspp(feature_spec: Mapping[str, FeatureLevel], *, num_outputs: int, backbone: BackboneInfo,
         rates: Sequence[int] | None = None, channels: int = 256, in_feature: str = "c5",
         norm: str = "GN", dropout: float = 0.1) -> nn.Module:
    """DeepLabv3 ASPP over a dilated backbone (model.output_stride 16 or 8). ``rates``: atrous
    rates of the 3x3 branches (default 6, 12, 18 at stride 16; 12, 24, 36 at stride 8);
    ``channels`` of every branch and of the head; ``dropout`` after the projection."""
    _need_levels("aspp", feature_spec, [in_feature], backbone)
    stride = feature_spec[in_feature].stride
    if stride > 16:
        if backbone.can_dilate:
            fix = "set model.output_stride=16 or 8"
        else:
            fix = (f"it cannot dilate; use a dilatable backbone ({', '.join(dilatable_backbones())}) "
                   "with model.output_stride=16 or 8")
        raise ConfigError(f"decoder 'aspp' needs a dilated backbone (output stride 16 or 8); backbone "
                          f"{backbone.name!r} has {in_feature} at stride {stride}: {fix}")
    _check_norm(norm)
    rates = _positive_ints("rates", rates if rates is not None else [r * 16 // stride for r in (6, 12, 18)])
    channels = _positive_int("channels", channels)
    return ASPPDecoder(feature_spec[in_feature].channels, in_feature=in_feature, num_outputs=num_outputs,
                       rates=rates, channels=channels, norm=norm, dropout=_check_dropout(dropout))


# ---------------------------------------------------------------------------------------------
# PSPNet


class PyramidPooling(nn.Module):
    """Average pooling to each ``bins`` x ``bins`` grid, 1x1 conv-norm-ReLU, bilinear back to the
    input size, concatenated after the input (PSPNet's pyramid pooling module)."""

    def __init__(self, in_ch: int, *, bins: Sequence[int], channels: int, norm: str) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_norm_relu(in_ch, channels, 1, norm=norm))
            for b in bins
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, *(upsample_to(stage(x), x.shape[-2:]) for stage in self.stages)], dim=1)


class PSPDecoder(nn.Module):
    """Pyramid pooling on ``in_feature``, 3x3 conv-norm-ReLU, dropout, 1x1 classifier, bilinear."""

    def __init__(self, in_ch: int, *, in_feature: str, num_outputs: int, bins: Sequence[int],
                 channels: int, conv_dims: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.in_feature = in_feature
        self.ppm = PyramidPooling(in_ch, bins=bins, channels=channels, norm=norm)
        self.conv = nn.Sequential(conv_norm_relu(in_ch + len(bins) * channels, conv_dims, norm=norm),
                                  nn.Dropout(dropout))
        _init_convs(self)
        self.classifier = _classifier(conv_dims, num_outputs)

    def forward(self, features: Mapping[str, Tensor], *, output_size: Sequence[int]) -> Tensor:
        return upsample_to(self.classifier(self.conv(self.ppm(features[self.in_feature]))), output_size)


@register_decoder("psp")
def psp(feature_spec: Mapping[str, FeatureLevel], *, num_outputs: int, backbone: BackboneInfo,
        bins: Sequence[int] = (1, 2, 3, 6), channels: int | None = None, conv_dims: int = 256,
        in_feature: str = "c5", norm: str = "GN", dropout: float = 0.1) -> nn.Module:
    """PSPNet pyramid pooling on ``in_feature``; ``channels`` per bin (default in / len(bins), as
    PSPNet), ``conv_dims`` of the 3x3 conv after concatenation."""
    _need_levels("psp", feature_spec, [in_feature], backbone)
    _check_norm(norm)
    bins = _positive_ints("bins", bins)
    in_ch = feature_spec[in_feature].channels
    channels = _positive_int("channels", channels if channels is not None else max(1, in_ch // len(bins)))
    conv_dims = _positive_int("conv_dims", conv_dims)
    return PSPDecoder(in_ch, in_feature=in_feature, num_outputs=num_outputs, bins=bins, channels=channels,
                      conv_dims=conv_dims, norm=norm, dropout=_check_dropout(dropout))


# ---------------------------------------------------------------------------------------------
# Panoptic FPN semantic branch


@register_decoder("panoptic_fpn")
def panoptic_fpn(feature_spec: Mapping[str, FeatureLevel], *, num_outputs: int, backbone: BackboneInfo,
                 in_features: Sequence[str] = ("p2", "p3", "p4", "p5"), conv_dims: int = 128,
                 common_stride: int = 4, norm: str = "GN", upsample: str = "bilinear") -> nn.Module:
    """The Panoptic FPN semantic branch (:class:`SemanticFPNHead`, returned as is: its parameter
    names are those of every existing checkpoint); ``upsample``: ``bilinear`` (Panoptic FPN) or
    ``convex`` (RAFT's learned, edge-preserving upsampling from ``common_stride``)."""
    _check_norm(norm)
    _need_levels("panoptic_fpn", feature_spec, list(in_features), backbone)
    return SemanticFPNHead(feature_spec, in_features=tuple(in_features), num_outputs=num_outputs,
                           conv_dims=_positive_int("conv_dims", conv_dims), common_stride=common_stride,
                           norm="" if norm == "none" else norm, upsample=upsample)


# ---------------------------------------------------------------------------------------------
# Hypercolumns


class HypercolumnDecoder(nn.Module):
    """Levels ``in_features`` bilinearly upsampled to the finest one's size and concatenated,
    then a per-pixel classifier (1x1 conv-norm-ReLU to ``channels``, 1x1 conv), bilinear."""

    def __init__(self, feature_spec: Mapping[str, FeatureLevel], *, in_features: Sequence[str],
                 num_outputs: int, channels: int, norm: str) -> None:
        super().__init__()
        self.in_features = tuple(sorted(in_features, key=lambda k: feature_spec[k].stride))
        total = sum(feature_spec[k].channels for k in self.in_features)
        self.hidden = conv_norm_relu(total, channels, 1, norm=norm)
        _init_convs(self.hidden)
        self.classifier = _classifier(channels, num_outputs)

    def forward(self, features: Mapping[str, Tensor], *, output_size: Sequence[int]) -> Tensor:
        size = features[self.in_features[0]].shape[-2:]
        column = torch.cat([upsample_to(features[k], size) for k in self.in_features], dim=1)
        return upsample_to(self.classifier(self.hidden(column)), output_size)


@register_decoder("hypercolumns")
def hypercolumns(feature_spec: Mapping[str, FeatureLevel], *, num_outputs: int, backbone: BackboneInfo,
                 in_features: Sequence[str] | None = None, channels: int = 128,
                 norm: str = "GN") -> nn.Module:
    """Hypercolumns over ``in_features`` (default the body levels c2..c5)."""
    _check_norm(norm)
    if in_features is None:
        in_features = [k for k in body_levels(feature_spec) if k != "c1"]
    if isinstance(in_features, str):
        raise ValueError(f"in_features must be a list of level names, got {in_features!r}")
    in_features = tuple(in_features)
    if not in_features:
        raise ConfigError(f"decoder 'hypercolumns' needs levels; backbone {backbone.name!r} provides "
                          f"no body levels (give in_features)")
    _need_levels("hypercolumns", feature_spec, in_features, backbone)
    return HypercolumnDecoder(feature_spec, in_features=in_features, num_outputs=num_outputs,
                              channels=_positive_int("channels", channels), norm=norm)


__all__ = [
    "CONTEXT_DILATIONS",
    "CONTEXT_LARGE_WIDTHS",
    "DECODERS",
    "ASPPDecoder",
    "ContextDecoder",
    "ContextModule",
    "FCNDecoder",
    "HypercolumnDecoder",
    "PSPDecoder",
    "SegNetDecoder",
    "UNetDecoder",
    "body_levels",
    "build_decoder",
    "build_task_decoder",
    "decoder_options",
    "receptive_fields",
    "register_decoder",
]
