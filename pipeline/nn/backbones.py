"""Backbones with a feature pyramid: image in, FPN levels ``p2``..``p6`` out.

A backbone is a torchvision classification network cut into a *body* (``IntermediateLayerGetter``
returning ``c2``..``c5`` at strides 4, 8, 16, 32) followed by ``torchvision.ops``'
``FeaturePyramidNetwork`` with ``LastLevelMaxPool`` (``p6``, stride 64, for an RPN).

Contract of every backbone's ``forward(x)``:

- ``x``: float Bx3xHxW, already normalized; any H, W >= 1 (odd sizes included).
- returns an ``OrderedDict`` ``{"p2", "p3", "p4", "p5", "p6"}`` of Bx``fpn_channels``xhxw maps,
  finest first. Every stride-2 layer pads so its output is ``ceil(size / 2)``, hence the level of
  stride ``s`` has ``h = ceil(H / s)``, ``w = ceil(W / s)`` (e.g. 97x131 gives p2 25x33,
  p3 13x17, p4 7x9, p5 4x5, p6 2x3).
- ``backbone.feature_spec`` describes exactly those outputs (channels, stride).

Builders are registered by name (``@register_backbone("name")``) and built with
``build_backbone(name, weights=..., fpn_channels=..., norm=...)``. Builders never download:
torchvision models are built with ``weights=None``; pretrained weights come only from a local file.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.errors import ConfigError

NORMS = ("bn", "frozen_bn", "gn")
BODY_LEVELS = ("c2", "c3", "c4", "c5")  # body outputs at strides 4, 8, 16, 32
FPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")  # backbone outputs at strides 4, 8, 16, 32, 64
_SHOWN_KEYS = 3  # how many mismatching keys an error message names


@dataclass(frozen=True)
class FeatureLevel:
    """One output level: ``channels`` of the map and its ``stride`` in input pixels."""

    channels: int
    stride: int


KeyMap = Callable[[str], "str | None"]


class Backbone(nn.Module):
    """A body returning ``c2``..``c5`` followed by an FPN returning ``p2``..``p6``.

    Args:
        body: module mapping Bx3xHxW to an ordered dict with keys ``c2``..``c5`` (strides 4..32).
        body_channels: channels of ``c2``..``c5``, in that order.
        fpn_channels: channels of every output level.
        classifier_key_map: maps a key of the source classification network's state dict to the
            body's key, or ``None`` for keys the body does not use (the classifier head); used by
            :func:`load_backbone_weights`.
    """

    def __init__(
        self,
        *,
        body: nn.Module,
        body_channels: tuple[int, int, int, int],
        fpn_channels: int,
        classifier_key_map: KeyMap,
    ) -> None:
        super().__init__()
        if len(body_channels) != len(BODY_LEVELS):
            raise ValueError(f"body_channels needs {len(BODY_LEVELS)} values, got {body_channels}")
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=list(body_channels),
            out_channels=fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        self.classifier_key_map = classifier_key_map
        self.feature_spec: dict[str, FeatureLevel] = {
            name: FeatureLevel(channels=fpn_channels, stride=2 ** (i + 2))
            for i, name in enumerate(FPN_LEVELS)
        }

    @property
    def out_channels(self) -> int:
        """Channels of every output level (``fpn_channels``)."""
        return self.feature_spec["p2"].channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Bx3xHxW normalized image -> ``{"p2": ..., "p6": ...}`` (see module docstring)."""
        feats = self.body(x)
        pyramid = self.fpn(OrderedDict((k, feats[k]) for k in BODY_LEVELS))
        # FPN keeps the body's names and appends "pool" for the max-pooled level.
        return OrderedDict(zip(FPN_LEVELS, pyramid.values(), strict=True))


class BackboneBuilder(Protocol):
    def __call__(self, *, fpn_channels: int, norm: str) -> Backbone: ...


BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator registering ``builder(*, fpn_channels, norm) -> Backbone`` under ``name``."""

    def decorator(builder: BackboneBuilder) -> BackboneBuilder:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = builder
        return builder

    return decorator


def build_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    fpn_channels: int = 128,
    norm: str = "bn",
) -> Backbone:
    """Build the registered backbone ``name``, optionally loading weights from a local file.

    Args:
        name: a key of :data:`BACKBONES` (built-ins: resnet18, resnet34, resnet50,
            mobilenet_v3_large).
        weights: ``None`` (random init) or a local path to either a torchvision classification
            state dict of the same network (loaded into the body; the FPN stays random) or a
            densepipe backbone state dict (``Backbone.state_dict()``: body and FPN).
        fpn_channels: channels of every output level.
        norm: normalization in the body: ``"bn"`` (BatchNorm, trained), ``"frozen_bn"``
            (``FrozenBatchNorm2d``: fixed statistics and affine, for fine-tuning on tiny batches)
            or ``"gn"`` (GroupNorm with ``gcd(32, channels)`` groups). BatchNorm uses PyTorch's
            momentum 0.1 everywhere (MobileNet keeps its eps 0.001); training with ``"bn"`` on
            batch 1 needs inputs over 32 px on a side (c5 must hold more than one value per
            channel). The FPN has no norm.

    Raises:
        ConfigError: unknown ``name`` or ``norm``, bad ``fpn_channels``, or ``weights`` missing,
            unreadable or not fitting the network.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; allowed: {', '.join(sorted(BACKBONES))}")
    if norm not in NORMS:
        raise ConfigError(f"unknown backbone norm {norm!r}; allowed: {', '.join(NORMS)}")
    if fpn_channels < 1:
        raise ConfigError(f"fpn_channels must be a positive integer, got {fpn_channels}")
    backbone = BACKBONES[name](fpn_channels=fpn_channels, norm=norm)
    if weights is not None:
        load_backbone_weights(backbone, weights, name=name)
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
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"backbone weights {path} is not a state dict (str -> tensor mapping)")

    if any(k.startswith(("body.", "fpn.")) for k in state):
        target: nn.Module = backbone
        source = dict(state)
    else:  # a classification network's state dict: keep what the body uses
        target = backbone.body
        source = {}
        for key, value in state.items():
            mapped = backbone.classifier_key_map(key)
            if mapped is not None:
                source[mapped] = value

    problem = _state_dict_mismatch(target.state_dict(), source)
    if problem:
        raise ConfigError(f"backbone weights {path} do not fit backbone {name!r}: {problem}")
    target.load_state_dict(source, strict=False)  # only num_batches_tracked may be absent


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


def _resnet_key_map(key: str) -> str | None:
    return None if key.startswith("fc.") else key


def _resnet_backbone(arch: str, *, fpn_channels: int, norm: str) -> Backbone:
    # zero-initialised last norm of each residual block: every block starts as the identity,
    # which trains faster from random initialisation (Goyal et al. 2017); loaded weights override it
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=_norm_layer(norm, eps=1e-5),
                                            zero_init_residual=True)
    body = IntermediateLayerGetter(
        net, return_layers={"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
    )
    c5 = net.fc.in_features  # 512 (basic blocks) or 2048 (bottlenecks)
    channels = (c5 // 8, c5 // 4, c5 // 2, c5)
    return Backbone(
        body=body,
        body_channels=channels,
        fpn_channels=fpn_channels,
        classifier_key_map=_resnet_key_map,
    )


@register_backbone("resnet18")
def resnet18_fpn(*, fpn_channels: int, norm: str) -> Backbone:
    """ResNet-18 body (c2..c5: 64, 128, 256, 512 channels) + FPN."""
    return _resnet_backbone("resnet18", fpn_channels=fpn_channels, norm=norm)


@register_backbone("resnet34")
def resnet34_fpn(*, fpn_channels: int, norm: str) -> Backbone:
    """ResNet-34 body (c2..c5: 64, 128, 256, 512 channels) + FPN."""
    return _resnet_backbone("resnet34", fpn_channels=fpn_channels, norm=norm)


@register_backbone("resnet50")
def resnet50_fpn(*, fpn_channels: int, norm: str) -> Backbone:
    """ResNet-50 body (c2..c5: 256, 512, 1024, 2048 channels) + FPN."""
    return _resnet_backbone("resnet50", fpn_channels=fpn_channels, norm=norm)


# Taps into ``mobilenet_v3_large().features``: the last block of each stride, i.e. the output just
# before the next stride-2 block: 3 (24 ch, stride 4), 6 (40 ch, stride 8), 12 (112 ch, stride 16)
# and 16 (the final 1x1 conv, 960 ch, stride 32).
MOBILENET_V3_LARGE_TAPS = {"3": "c2", "6": "c3", "12": "c4", "16": "c5"}


def _mobilenet_key_map(key: str) -> str | None:
    return key.removeprefix("features.") if key.startswith("features.") else None


@register_backbone("mobilenet_v3_large")
def mobilenet_v3_large_fpn(*, fpn_channels: int, norm: str) -> Backbone:
    """MobileNetV3-Large ``features`` (taps 3, 6, 12, 16: 24, 40, 112, 960 channels) + FPN."""
    net = torchvision.models.mobilenet_v3_large(
        weights=None, norm_layer=_norm_layer(norm, eps=0.001)
    )
    body = IntermediateLayerGetter(net.features, return_layers=MOBILENET_V3_LARGE_TAPS)
    return Backbone(
        body=body,
        body_channels=(24, 40, 112, 960),
        fpn_channels=fpn_channels,
        classifier_key_map=_mobilenet_key_map,
    )


__all__ = [
    "BACKBONES",
    "Backbone",
    "FeatureLevel",
    "build_backbone",
    "load_backbone_weights",
    "register_backbone",
]
