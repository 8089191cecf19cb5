"""Backbones with a feature pyramid: image in, body levels ``c1``..``c5`` and FPN levels out.

A backbone is a *body* (a torchvision classification network cut by ``IntermediateLayerGetter``,
or the VGG encoder below) returning ``c1``..``c5`` (``c1`` where the body has a stride-2 map)
followed by ``torchvision.ops``' ``FeaturePyramidNetwork`` over ``c2``..``c5`` with
``LastLevelMaxPool`` (``p6``, for an RPN).

Contract of every backbone's ``forward(x)``:

- ``x``: float Bx3xHxW, already normalized; any H, W >= 1 (odd sizes included).
- returns an ``OrderedDict``: first the FPN levels ``p2``..``p6`` (Bx``fpn_channels``xhxw), then
  the body levels ``c1``..``c5`` (their own channels), then, for encoders that record them, the
  max-pooling indices ``pool1_indices``.. (int64, see :class:`BackboneInfo`). Every stride-2
  layer pads so its output is ``ceil(size / 2)``, hence a level of stride ``s`` has
  ``h = ceil(H / s)``, ``w = ceil(W / s)`` (e.g. 97x131 gives p2 25x33, p3 13x17, p4 7x9, p5 4x5,
  p6 2x3).
- ``backbone.feature_spec`` describes exactly those outputs, in that order (channels and the true
  stride of each); ``backbone.feature_spec.info`` (also ``backbone.info``) the capabilities that
  decoders check: registered name, output stride, supported output strides, pooling-index keys.

Output stride: ``build_backbone(..., output_stride=16 or 8)`` replaces the stride of the last one
or two stages by dilation (DeepLab). ``c4``/``c5`` (and ``p4``..``p6``) then have stride
``min(16 or 32, output_stride)`` (``p6`` twice ``p5``'s): feature_spec reports those true strides.
A dilated backbone is meant for dense decoders; the R-CNN heads assume FPN strides 4..64.
Supported: resnet18/34/50 (8, 16, 32), mobilenet_v3_large (16, 32), vgg11_bn/vgg16_bn (32 only).

Builders are registered by name (``@register_backbone("name", output_strides=(...))``) and built
with ``build_backbone(name, weights=..., fpn_channels=..., norm=..., output_stride=...)``.
Builders never download: torchvision models are built with ``weights=None``. Pretrained weights
come from a local file (``weights``) or by name (``pretrained``, :mod:`pipeline.nn.pretrained`):
read from torchvision's / timm's cache, downloaded only when allowed. ``timm:<model>`` builds a
timm ``features_only`` network as the body (``TimmBody``), with the same FPN.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.errors import ConfigError
from pipeline.named_registry import NamedRegistry

# Imports inside functions: timm is the `timm` extra's; pipeline.nn.pretrained imports this
# module.

NORMS = ("bn", "frozen_bn", "gn")
BODY_LEVELS = ("c2", "c3", "c4", "c5")  # the FPN's inputs, at strides 4, 8, 16, 32 (undilated)
FPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")  # backbone outputs at strides 4, 8, 16, 32, 64 (undilated)
OUTPUT_STRIDES = (8, 16, 32)
_SHOWN_KEYS = 3  # how many mismatching keys an error message names
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureLevel:
    """One output level: ``channels`` of the map and its ``stride`` in input pixels."""

    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneInfo:
    """What a backbone can do, for decoders to check before anything trains.

    Attributes:
        name: the registered name (``"unregistered"`` for a ``Backbone`` built by hand).
        output_stride: stride of the deepest body level (32, or 16 / 8 when dilated).
        output_strides: the output strides this backbone can be built with (``(32,)``: it
            cannot dilate).
        pool_indices: keys of the max-pooling indices among the outputs, in pooling order; empty
            for most backbones. Each comes from a 2x2, stride-2 ``MaxPool2d(ceil_mode=True,
            return_indices=True)``: ``pool{k}_indices`` (int64, the shape of the pooled map
            ``c{k}``, stride ``2**k``) holds flat positions in the pooling's input, of stride
            ``2**(k-1)``, so its size is ``ceil(H / 2**(k-1))`` x ``ceil(W / 2**(k-1))``: the
            ``output_size`` to give ``MaxUnpool2d`` for odd sizes.
    """

    name: str = "unregistered"
    output_stride: int = 32
    output_strides: tuple[int, ...] = (32,)
    pool_indices: tuple[str, ...] = ()

    @property
    def can_dilate(self) -> bool:
        return any(s < 32 for s in self.output_strides)


class BackboneSpec(dict[str, FeatureLevel]):
    """``{level: FeatureLevel}`` (a plain dict to every existing consumer) plus ``info``: the
    backbone's :class:`BackboneInfo`, so a task's ``build_head`` can check compatibility."""

    def __init__(self, levels: Mapping[str, FeatureLevel] = (), *, info: BackboneInfo | None = None):
        super().__init__(levels)
        self.info = info or BackboneInfo()

    def __reduce__(self):  # keep ``info`` through copy / pickle
        return (self.__class__, (dict(self),), {"info": self.info})


KeyMap = Callable[[str], "str | None"]


class Backbone(nn.Module):
    """A body returning ``c2``..``c5`` (and optionally ``c1`` and pooling indices) followed by an
    FPN over ``c2``..``c5`` returning ``p2``..``p6``.

    Args:
        body: module mapping Bx3xHxW to a dict with at least the keys ``c2``..``c5``.
        body_channels: channels of ``c2``..``c5``, in that order.
        fpn_channels: channels of every FPN level.
        classifier_key_map: maps a key of the source classification network's state dict to the
            body's key, or ``None`` for keys the body does not use (the classifier head); used by
            :func:`load_backbone_weights`.
        body_spec: every body output passed on (``c1``..``c5``, ``pool{k}_indices``) with its
            channels and true stride, in output order; default ``c2``..``c5`` at strides 4..32.
        pool_indices: which keys of ``body_spec`` are pooling indices (see :class:`BackboneInfo`).
    """

    def __init__(
        self,
        *,
        body: nn.Module,
        body_channels: tuple[int, int, int, int],
        fpn_channels: int,
        classifier_key_map: KeyMap,
        body_spec: Mapping[str, FeatureLevel] | None = None,
        pool_indices: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if len(body_channels) != len(BODY_LEVELS):
            raise ValueError(f"body_channels needs {len(BODY_LEVELS)} values, got {body_channels}")
        if body_spec is None:
            body_spec = {k: FeatureLevel(c, 2 ** (i + 2)) for i, (k, c) in
                         enumerate(zip(BODY_LEVELS, body_channels, strict=True))}
        missing = [k for k in (*BODY_LEVELS, *pool_indices) if k not in body_spec]
        if missing:
            raise ValueError(f"body_spec lacks {missing}")
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=list(body_channels),
            out_channels=fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        self.classifier_key_map = classifier_key_map
        self.pretrained_source: str | None = None
        """What ``model.pretrained`` resolved to (e.g. ``ResNet50_Weights.IMAGENET1K_V2
        (resnet50-11ad3fa6.pth)``), ``None`` without it."""
        self.body_levels = tuple(body_spec)
        strides = [body_spec[k].stride for k in BODY_LEVELS]
        fpn_spec = {name: FeatureLevel(channels=fpn_channels, stride=s)
                    for name, s in zip(FPN_LEVELS, [*strides, 2 * strides[-1]], strict=True)}
        info = BackboneInfo(output_stride=strides[-1], output_strides=(strides[-1],),
                            pool_indices=tuple(pool_indices))
        self.feature_spec = BackboneSpec({**fpn_spec, **body_spec}, info=info)

    @property
    def info(self) -> BackboneInfo:
        """Capabilities (name, output stride, pooling indices); see :class:`BackboneInfo`."""
        return self.feature_spec.info

    @info.setter
    def info(self, value: BackboneInfo) -> None:
        self.feature_spec.info = value

    @property
    def output_stride(self) -> int:
        """Stride of the deepest body level ``c5``: 32, or 16 / 8 when dilated."""
        return self.info.output_stride

    @property
    def pool_indices(self) -> tuple[str, ...]:
        """Output keys holding max-pooling indices (empty unless the encoder records them)."""
        return self.info.pool_indices

    @property
    def out_channels(self) -> int:
        """Channels of every FPN level (``fpn_channels``)."""
        return self.feature_spec["p2"].channels

    activation_checkpointing: bool = False
    """Recompute the body's activations in the backward pass
    (``train.activation_checkpointing``): one ``torch.utils.checkpoint`` segment per returned
    level of an ``IntermediateLayerGetter`` body (the stem goes with ``c2``), the whole body for
    another; only while training with gradients. Weights and outputs unchanged."""

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Bx3xHxW normalized image -> ``{"p2": ..., "p6": ..., "c1": ..., "c5": ...}`` (see
        the module docstring)."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            feats = self._checkpointed_body(x)
        else:
            feats = self.body(x)
        pyramid = self.fpn(OrderedDict((k, feats[k]) for k in BODY_LEVELS))
        # FPN keeps the body's names and appends "pool" for the max-pooled level.
        out = OrderedDict(zip(FPN_LEVELS, pyramid.values(), strict=True))
        out.update((k, feats[k]) for k in self.body_levels)
        return out


    def _checkpointed_body(self, x: Tensor) -> dict[str, Tensor]:
        if not isinstance(self.body, IntermediateLayerGetter):
            return checkpoint(self.body, x, use_reentrant=False)
        out: dict[str, Tensor] = {}
        segment: list[nn.Module] = []  # the modules up to the next returned level: one segment
        for name, module in self.body.items():
            segment.append(module)
            if name in self.body.return_layers:
                x = checkpoint(nn.Sequential(*segment), x, use_reentrant=False)
                out[self.body.return_layers[name]] = x
                segment = []
        return out


class BackboneBuilder(Protocol):
    def __call__(self, *, fpn_channels: int, norm: str) -> Backbone: ...


TIMM_PREFIX = "timm:"
BACKBONES: NamedRegistry[BackboneBuilder] = NamedRegistry(
    "backbone", allowed_suffix=f", {TIMM_PREFIX}<timm model name>", required=("fpn_channels", "norm"))
BACKBONE_OUTPUT_STRIDES: dict[str, tuple[int, ...]] = {}
"""Output strides each registered backbone supports (``(32,)`` unless registered otherwise)."""


def register_backbone(
    name: str, *, output_strides: Iterable[int] = (32,)
) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator registering ``builder(*, fpn_channels, norm) -> Backbone`` under ``name``.

    ``output_strides``: the strides it can be built with; a builder supporting more than 32 also
    takes ``output_stride`` (passed only when it is not 32).
    """
    strides = tuple(sorted(set(output_strides)))
    if 32 not in strides or not set(strides) <= set(OUTPUT_STRIDES):
        raise ValueError(f"output_strides must include 32 and lie in {OUTPUT_STRIDES}, got {strides}")

    def decorator(builder: BackboneBuilder) -> BackboneBuilder:
        BACKBONES.add(name, builder)
        BACKBONE_OUTPUT_STRIDES[name] = strides
        return builder

    return decorator


def known_backbone(name: str) -> bool:
    """Whether ``build_backbone`` knows ``name``: a registered backbone or ``timm:<model>`` (the
    timm model itself is checked when built)."""
    return name in BACKBONES or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))


def dilatable_backbones() -> list[str]:
    """Registered backbones that can be built with an output stride below 32."""
    return sorted(n for n in BACKBONES if min(BACKBONE_OUTPUT_STRIDES.get(n, (32,))) < 32)


def build_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    fpn_channels: int = 128,
    norm: str = "bn",
    output_stride: int = 32,
    pretrained: str | None = None,
    download: bool = False,
    freeze_bn: bool = False,
    freeze_at: int = 0,
) -> Backbone:
    """Build the registered backbone ``name`` (or ``timm:<model>``), optionally with weights.

    Args:
        name: a key of :data:`BACKBONES` (built-ins: resnet18, resnet34, resnet50,
            mobilenet_v3_large, vgg11_bn, vgg16_bn), or ``timm:<model_name>`` (any timm model
            with ``features_only`` levels at strides 4, 8, 16 and 32; needs ``densepipe[timm]``).
        weights: ``None`` (random init) or a local path to either a torchvision classification
            state dict of the same network (loaded into the body; the FPN stays random) or a
            densepipe backbone state dict (``Backbone.state_dict()``: body and FPN).
        fpn_channels: channels of every FPN level.
        norm: normalization in the body: ``"bn"`` (BatchNorm, trained), ``"frozen_bn"``
            (``FrozenBatchNorm2d``: fixed statistics and affine, for fine-tuning on tiny batches)
            or ``"gn"`` (GroupNorm with ``gcd(32, channels)`` groups). BatchNorm uses PyTorch's
            momentum 0.1 everywhere (MobileNet keeps its eps 0.001); training with ``"bn"`` on
            batch 1 needs inputs over 32 px on a side (c5 must hold more than one value per
            channel). The FPN has no norm. timm backbones keep their own norms (``"gn"`` refused).
        output_stride: 32, or 16 / 8 to dilate the last stages (``model.output_stride``); the
            backbone must support it (:data:`BACKBONE_OUTPUT_STRIDES`; timm backbones: 32).
        pretrained: ``model.pretrained`` (see :mod:`pipeline.nn.pretrained`): ``None``, or
            weights by name read from torchvision's / timm's cache; exclusive with ``weights``.
        download: allow fetching ``pretrained`` weights missing from the cache.
        freeze_bn: after loading, replace the body's BatchNorm by ``FrozenBatchNorm2d``.
        freeze_at: stop gradients of body levels ``c1``..``c{freeze_at}`` (0: none).

    Raises:
        ConfigError: unknown ``name`` or ``norm``, bad ``fpn_channels``, an ``output_stride`` the
            backbone does not support, or ``weights`` / ``pretrained`` missing, unreadable or not
            fitting.
    """
    if weights is not None and pretrained is not None:
        raise ConfigError(f"model.weights={str(weights)!r} and model.pretrained={pretrained!r} are "
                          f"exclusive; set one of them")
    if name.startswith(TIMM_PREFIX):
        backbone = _timm_backbone(name, fpn_channels=fpn_channels, norm=norm,
                                  output_stride=output_stride, pretrained=pretrained, download=download)
    else:
        backbone = _registered_backbone(name, fpn_channels=fpn_channels, norm=norm,
                                        output_stride=output_stride)
        if weights is not None:
            load_backbone_weights(backbone, weights, name=name)
        if pretrained is not None:
            from pipeline.nn.pretrained import load_torchvision_pretrained

            backbone.pretrained_source = load_torchvision_pretrained(
                backbone, name=name, value=pretrained, download=download)
    _freeze(backbone, name=name, freeze_bn=freeze_bn, freeze_at=freeze_at)
    return backbone


def _registered_backbone(name: str, *, fpn_channels: int, norm: str, output_stride: int) -> Backbone:
    builder = BACKBONES.lookup(name)
    if norm not in NORMS:
        raise ConfigError(f"unknown backbone norm {norm!r}; allowed: {', '.join(NORMS)}")
    if fpn_channels < 1:
        raise ConfigError(f"fpn_channels must be a positive integer, got {fpn_channels}")
    supported = BACKBONE_OUTPUT_STRIDES.get(name, (32,))
    if output_stride not in supported:
        if len(supported) == 1:
            hint = (f"it cannot dilate; dilatable backbones: {', '.join(dilatable_backbones())}"
                    if dilatable_backbones() else "it cannot dilate")
        else:
            hint = f"supported: {', '.join(map(str, supported))}"
        raise ConfigError(f"model.output_stride={output_stride} is not supported by backbone "
                          f"{name!r} ({hint})")
    extra = {"output_stride": output_stride} if output_stride != 32 else {}
    backbone = builder(fpn_channels=fpn_channels, norm=norm, **extra)
    if backbone.output_stride != output_stride:
        raise ValueError(f"backbone {name!r} built with output stride {backbone.output_stride}, "
                         f"asked for {output_stride}")
    backbone.info = replace(backbone.info, name=name, output_strides=supported)
    return backbone


def _freeze(backbone: Backbone, *, name: str, freeze_bn: bool, freeze_at: int) -> None:
    """Frozen BatchNorm in the body and frozen early levels (detectron2), logged at INFO."""
    from pipeline.nn.pretrained import freeze_batchnorm, freeze_stages

    if freeze_bn:
        count = freeze_batchnorm(backbone.body)
        log.info("backbone %s: %d BatchNorm layers of the body frozen (FrozenBatchNorm2d)", name, count)
    if freeze_at > 0:
        levels = freeze_stages(backbone, freeze_at)
        if not levels:
            raise ConfigError(f"model.freeze_at={freeze_at}: backbone {name!r} has no stages densepipe "
                              f"can freeze; use model.freeze_at=0")
        log.info("backbone %s: body levels %s frozen (model.freeze_at=%d)", name, ", ".join(levels),
                 freeze_at)


class TimmBody(nn.Module):
    """A timm ``features_only`` network whose list of maps is returned as ``c{k}`` levels.

    ``levels`` names each of the network's outputs (``c1``..``c5`` by stride 2..32)."""

    def __init__(self, net: nn.Module, levels: tuple[str, ...], out_indices: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.levels = levels
        self.out_indices = out_indices

    @property
    def return_layers(self) -> dict[str, str]:
        """``{module name in net: level}`` where timm's feature net says (``FeatureDictNet``);
        empty for feature nets that do not (EfficientNet's), which cannot be frozen by stage."""
        layers = getattr(self.net, "return_layers", None) or {}
        by_index = dict(zip(self.out_indices, self.levels, strict=True))
        return {m: by_index[int(i)] for m, i in layers.items() if str(i).isdigit() and int(i) in by_index}

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict(zip(self.levels, self.net(x), strict=True))


def _timm_key_map(key: str) -> str | None:
    return key if key.startswith("net.") else None


def _timm_backbone(name: str, *, fpn_channels: int, norm: str, output_stride: int,
                   pretrained: str | None, download: bool) -> Backbone:
    """``timm:<model>``: ``timm.create_model(model, features_only=True, out_indices=...)`` with
    one level per stride 2 (if any), 4, 8, 16, 32 (the last feature of each stride)."""
    model_name = name.removeprefix(TIMM_PREFIX)
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.backbone={name!r} needs timm: pip install 'densepipe[timm]'") from None
    if norm == "gn":
        raise ConfigError(f"model.backbone_norm='gn' is not supported by timm backbone {name!r}; "
                          f"allowed: bn, frozen_bn")
    if output_stride != 32:
        raise ConfigError(f"model.output_stride={output_stride} is not supported by backbone {name!r} "
                          f"(timm backbones: 32)")
    if fpn_channels < 1:
        raise ConfigError(f"fpn_channels must be a positive integer, got {fpn_channels}")
    if not timm.is_model(model_name):
        raise ConfigError(f"unknown timm model {model_name!r} in model.backbone={name!r}; see "
                          f"timm.list_models()")
    kwargs: dict[str, object] = {"pretrained": False}
    full = model_name
    if pretrained is not None:
        from pipeline.nn.pretrained import timm_pretrained

        full, kwargs = timm_pretrained(model_name, pretrained, download=download)
    probe = timm.create_model(model_name, features_only=True, pretrained=False)
    reductions = list(probe.feature_info.reduction())
    channels = list(probe.feature_info.channels())
    del probe
    indices: dict[int, int] = {}  # stride -> index of the last feature at that stride
    for i, r in enumerate(reductions):
        indices[int(r)] = i
    missing = [s for s in (4, 8, 16, 32) if s not in indices]
    if missing:
        raise ConfigError(f"model.backbone={name!r}: its features_only levels have strides "
                          f"{sorted(indices)}, the FPN needs 4, 8, 16 and 32 (missing {missing})")
    strides = [s for s in (2, 4, 8, 16, 32) if s in indices]
    out_indices = tuple(indices[s] for s in strides)
    net = timm.create_model(full, features_only=True, out_indices=out_indices, **kwargs)
    if pretrained is not None:
        source = kwargs.get("pretrained_cfg_overlay", {}).get("file", "the Hugging Face hub")  # type: ignore[union-attr]
        count = len(net.state_dict())
        log.info("backbone %s: loaded %d tensors of %s from %s", name, count, full, source)
    if norm == "frozen_bn":
        from pipeline.nn.pretrained import freeze_batchnorm

        freeze_batchnorm(net)
    levels = tuple(f"c{int(math.log2(s))}" for s in strides)
    spec = {lvl: FeatureLevel(channels[i], s) for lvl, i, s in zip(levels, out_indices, strides, strict=True)}
    body_channels = tuple(spec[k].channels for k in BODY_LEVELS)
    backbone = Backbone(body=TimmBody(net, levels, out_indices), body_channels=body_channels,  # type: ignore[arg-type]
                        fpn_channels=fpn_channels, classifier_key_map=_timm_key_map, body_spec=spec)
    backbone.info = replace(backbone.info, name=name, output_strides=(32,))
    if pretrained is not None:
        backbone.pretrained_source = full
    return backbone


# ---------------------------------------------------------------------------------------------
# weights


def load_backbone_weights(backbone: Backbone, path: str | Path, *, name: str = "backbone") -> None:
    """Load a local state dict file into ``backbone`` (see :func:`build_backbone`'s ``weights``).

    Keys are matched exactly and shapes must agree; ``num_batches_tracked`` buffers are ignored
    (so BatchNorm weights load into ``frozen_bn`` bodies). Raises ``ConfigError`` naming the file
    and the first mismatching keys when the file is missing, unreadable or does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is a config problem
        raise ConfigError(f"cannot read backbone weights {path}: {exc}".splitlines()[0]) from exc
    load_state_into_backbone(backbone, state, source=str(path), name=name)


def load_state_into_backbone(backbone: Backbone, state: object, *, source: str, name: str = "backbone",
                             body_only: bool = False) -> int:
    """Load ``state`` (read from ``source``) into ``backbone``; returns the number of tensors loaded.

    A densepipe backbone state dict (keys ``body.*`` / ``fpn.*``) loads into the whole backbone
    (refused when ``body_only``); a classification network's state dict loads into the body
    through ``backbone.classifier_key_map`` (the classifier dropped). Strict: every key of the
    target but ``num_batches_tracked``, no other, same shapes; else one ``ConfigError`` line."""
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"backbone weights {source} is not a state dict (str -> tensor mapping)")

    if any(k.startswith(("body.", "fpn.")) for k in state) and not body_only:
        target: nn.Module = backbone
        given = dict(state)
    else:  # a classification network's state dict: keep what the body uses
        target = backbone.body
        given = {}
        for key, value in state.items():
            mapped = backbone.classifier_key_map(key)
            if mapped is not None:
                given[mapped] = value

    problem = _state_dict_mismatch(target.state_dict(), given)
    if problem:
        raise ConfigError(f"backbone weights {source} do not fit backbone {name!r}: {problem}")
    target.load_state_dict(given, strict=False)  # only num_batches_tracked may be absent
    return len(given)


def _state_dict_mismatch(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> str:
    """Empty string when ``given`` fits ``expected``; else a one-line description."""

    def relevant(keys: Iterable[str]) -> list[str]:
        return sorted(k for k in keys if not k.endswith("num_batches_tracked"))

    missing = [k for k in relevant(expected) if k not in given]
    unexpected = [k for k in relevant(given) if k not in expected]
    shapes = [
        f"{k} (file {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in relevant(given)
        if k in expected and given[k].shape != expected[k].shape
    ]
    parts = []
    found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes))
    for label, items in found:
        if items:
            more = f" and {len(items) - _SHOWN_KEYS} more" if len(items) > _SHOWN_KEYS else ""
            parts.append(f"{label} {', '.join(items[:_SHOWN_KEYS])}{more}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# norms


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _norm_layer(norm: str, *, eps: float) -> Callable[[int], nn.Module]:
    if norm == "bn":
        return partial(nn.BatchNorm2d, eps=eps)
    if norm == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=eps)
    return _group_norm


# ---------------------------------------------------------------------------------------------
# built-ins


def _check_output_stride(output_stride: int, supported: tuple[int, ...]) -> None:
    if output_stride not in supported:
        raise ValueError(f"output_stride must be one of {supported}, got {output_stride}")


def dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Turn a stride-2 stage into a stride-1 stage with dilated 3x3 convs, in place (DeepLab).

    The convolution that had stride 2 (and the 1x1 shortcut) gets stride 1; that 3x3 conv keeps
    the previous stage's dilation ``dilation // 2``, every later 3x3 conv gets ``dilation`` (as
    torchvision's ``replace_stride_with_dilation`` does for bottlenecks; this also works for basic
    blocks, which torchvision refuses to dilate). Padding follows, so sizes are kept; no parameter
    changes shape, so classification weights still load.
    """
    for conv in stage.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.stride == (2, 2):
            conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                conv.dilation = conv.padding = (dilation // 2, dilation // 2)
        elif conv.kernel_size == (3, 3):
            conv.dilation = conv.padding = (dilation, dilation)


def _strides(output_stride: int) -> dict[str, int]:
    """True strides of c1..c5 for an output stride of 32, 16 or 8."""
    return {f"c{k}": min(2**k, output_stride) for k in range(1, 6)}


def _resnet_key_map(key: str) -> str | None:
    return None if key.startswith("fc.") else key


def _resnet_backbone(arch: str, *, fpn_channels: int, norm: str, output_stride: int = 32) -> Backbone:
    _check_output_stride(output_stride, OUTPUT_STRIDES)
    # Each residual block's last norm starts at weight 1 (torchvision's default), not 0 (Goyal et
    # al.'s zero_init_residual, for SGD on ImageNet): under AdamW a zero scale grows by at most
    # the learning rate per step, so the blocks stayed near the identity for hundreds of steps and a
    # semantic model from random initialisation reached 0.525 mIoU where this gives 0.594 in the
    # same 150 s (benchmarks/results/peers.json, ablation). Loaded weights override it.
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=_norm_layer(norm, eps=1e-5))
    if output_stride <= 16:
        dilate_stage(net.layer4, 32 // output_stride)  # 2 (OS 16) or 4 (OS 8)
    if output_stride == 8:
        dilate_stage(net.layer3, 2)
    body = IntermediateLayerGetter(
        net, return_layers={"relu": "c1", "layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
    )
    c5 = net.fc.in_features  # 512 (basic blocks) or 2048 (bottlenecks)
    channels = (c5 // 8, c5 // 4, c5 // 2, c5)
    strides = _strides(output_stride)
    spec = {"c1": FeatureLevel(64, 2)}
    spec.update((f"c{k}", FeatureLevel(c, strides[f"c{k}"]))
                for k, c in zip(range(2, 6), channels, strict=True))
    return Backbone(
        body=body,
        body_channels=channels,
        fpn_channels=fpn_channels,
        classifier_key_map=_resnet_key_map,
        body_spec=spec,
    )


@register_backbone("resnet18", output_strides=OUTPUT_STRIDES)
def resnet18_fpn(*, fpn_channels: int, norm: str, output_stride: int = 32) -> Backbone:
    """ResNet-18 body (c1..c5: 64, 64, 128, 256, 512 channels) + FPN; output stride 8, 16 or 32."""
    return _resnet_backbone("resnet18", fpn_channels=fpn_channels, norm=norm, output_stride=output_stride)


@register_backbone("resnet34", output_strides=OUTPUT_STRIDES)
def resnet34_fpn(*, fpn_channels: int, norm: str, output_stride: int = 32) -> Backbone:
    """ResNet-34 body (c1..c5: 64, 64, 128, 256, 512 channels) + FPN; output stride 8, 16 or 32."""
    return _resnet_backbone("resnet34", fpn_channels=fpn_channels, norm=norm, output_stride=output_stride)


@register_backbone("resnet50", output_strides=OUTPUT_STRIDES)
def resnet50_fpn(*, fpn_channels: int, norm: str, output_stride: int = 32) -> Backbone:
    """ResNet-50 body (c1..c5: 64, 256, 512, 1024, 2048 channels) + FPN; output stride 8, 16, 32."""
    return _resnet_backbone("resnet50", fpn_channels=fpn_channels, norm=norm, output_stride=output_stride)


# Taps into ``mobilenet_v3_large().features``: the last block of each stride, i.e. the output just
# before the next stride-2 block: 1 (16 ch, stride 2), 3 (24 ch, stride 4), 6 (40 ch, stride 8),
# 12 (112 ch, stride 16) and 16 (the final 1x1 conv, 960 ch, stride 32).
MOBILENET_V3_LARGE_TAPS = {"1": "c1", "3": "c2", "6": "c3", "12": "c4", "16": "c5"}


def _mobilenet_key_map(key: str) -> str | None:
    return key.removeprefix("features.") if key.startswith("features.") else None


@register_backbone("mobilenet_v3_large", output_strides=(16, 32))
def mobilenet_v3_large_fpn(*, fpn_channels: int, norm: str, output_stride: int = 32) -> Backbone:
    """MobileNetV3-Large ``features`` (taps 1, 3, 6, 12, 16: 16, 24, 40, 112, 960 channels) + FPN;
    output stride 16 dilates the last stage (torchvision's ``dilated=True``)."""
    _check_output_stride(output_stride, (16, 32))
    net = torchvision.models.mobilenet_v3_large(
        weights=None, norm_layer=_norm_layer(norm, eps=0.001), dilated=output_stride == 16
    )
    body = IntermediateLayerGetter(net.features, return_layers=MOBILENET_V3_LARGE_TAPS)
    strides = _strides(output_stride)
    spec = {k: FeatureLevel(c, strides[k]) for k, c in zip(strides, (16, 24, 40, 112, 960), strict=True)}
    return Backbone(
        body=body,
        body_channels=(24, 40, 112, 960),
        fpn_channels=fpn_channels,
        classifier_key_map=_mobilenet_key_map,
        body_spec=spec,
    )


# VGG with batch norm (Simonyan and Zisserman), the encoder of SegNet / DeconvNet: numbers are 3x3
# conv widths, "M" a 2x2 max pooling. Module indices match torchvision's ``vgg*_bn().features``.
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGGEncoder(nn.Module):
    """VGG ``features`` whose five max-poolings record their indices.

    Every pooling is ``MaxPool2d(2, 2, ceil_mode=True, return_indices=True)`` (torchvision's has no
    ``ceil_mode``: identical on even sizes, and odd sizes keep the last row / column instead of
    dropping it, so the level of stride s is ``ceil(H / s)`` like every other backbone).
    ``forward`` returns ``c1``..``c5`` (the output of pooling k, stride ``2**k``) and
    ``pool1_indices``..``pool5_indices`` (see :class:`BackboneInfo`).
    """

    def __init__(self, config: list[int | str], norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        self.channels: list[int] = []
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True))
                self.channels.append(in_ch)
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), norm_layer(v), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        levels: OrderedDict[str, Tensor] = OrderedDict()
        indices: list[tuple[str, Tensor]] = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                x, idx = layer(x)
                k = len(indices) + 1
                levels[f"c{k}"] = x
                indices.append((f"pool{k}_indices", idx))
            else:
                x = layer(x)
        levels.update(indices)
        return levels


def _vgg_key_map(key: str) -> str | None:
    return key if key.startswith("features.") else None


def _vgg_backbone(arch: str, *, fpn_channels: int, norm: str) -> Backbone:
    body = VGGEncoder(VGG_CONFIGS[arch], _norm_layer(norm, eps=1e-5))
    ch = body.channels
    spec = {f"c{k}": FeatureLevel(ch[k - 1], 2**k) for k in range(1, 6)}
    pools = tuple(f"pool{k}_indices" for k in range(1, 6))
    spec.update((name, FeatureLevel(ch[k - 1], 2**k)) for k, name in enumerate(pools, start=1))
    return Backbone(
        body=body,
        body_channels=(ch[1], ch[2], ch[3], ch[4]),
        fpn_channels=fpn_channels,
        classifier_key_map=_vgg_key_map,
        body_spec=spec,
        pool_indices=pools,
    )


@register_backbone("vgg11_bn")
def vgg11_bn_fpn(*, fpn_channels: int, norm: str) -> Backbone:
    """VGG-11-BN encoder (c1..c5 = pool1..pool5: 64, 128, 256, 512, 512 channels) with pooling
    indices + FPN; cannot dilate."""
    return _vgg_backbone("vgg11_bn", fpn_channels=fpn_channels, norm=norm)


@register_backbone("vgg16_bn")
def vgg16_bn_fpn(*, fpn_channels: int, norm: str) -> Backbone:
    """VGG-16-BN encoder (c1..c5 = pool1..pool5: 64, 128, 256, 512, 512 channels) with pooling
    indices + FPN; cannot dilate."""
    return _vgg_backbone("vgg16_bn", fpn_channels=fpn_channels, norm=norm)


__all__ = [
    "BACKBONES",
    "BACKBONE_OUTPUT_STRIDES",
    "Backbone",
    "BackboneInfo",
    "BackboneSpec",
    "FeatureLevel",
    "TIMM_PREFIX",
    "TimmBody",
    "VGGEncoder",
    "build_backbone",
    "dilatable_backbones",
    "dilate_stage",
    "known_backbone",
    "load_backbone_weights",
    "load_state_into_backbone",
    "register_backbone",
]
