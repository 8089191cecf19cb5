"""Dense decoders over FPN features.

``SemanticFPNHead`` is the semantic branch of Panoptic FPN (Kirillov et al., 2019): every input
level is brought to a common stride by repeated [3x3 conv, norm, ReLU, 2x bilinear upsample], the
levels are summed and a 1x1 conv predicts ``num_outputs`` channels. It knows no task: semantic
segmentation uses one channel per class, depth one channel, normals three.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from pipeline.nn.backbones import FeatureLevel
from pipeline.nn.convex_upsample import ConvexUpsample, fit_to
from pipeline.nn.resize import upsample_to

HEAD_NORMS = ("GN", "BN", "")
HEAD_UPSAMPLING = ("bilinear", "convex")


def _ceil_div(size: Sequence[int], factor: int) -> tuple[int, int]:
    return (-(-size[0] // factor), -(-size[1] // factor))  # no int(): export keeps sizes symbolic


def norm_layer(norm: str, channels: int) -> nn.Module:
    """``GN`` (GroupNorm, ``gcd(32, channels)`` groups), ``BN`` (BatchNorm), else identity."""
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class SemanticFPNHead(nn.Module):
    """Panoptic-FPN-style dense decoder: FPN levels -> Bx``num_outputs``xHxW logits.

    Args:
        feature_spec: the backbone's ``{level: FeatureLevel(channels, stride)}``.
        in_features: levels to fuse; strides must be powers of two >= ``common_stride``.
        num_outputs: output channels (classes for semantic, 1 for depth, 3 for normals).
        conv_dims: channels of the intermediate 3x3 convs.
        common_stride: stride at which levels are summed (a power of two).
        norm: ``"GN"`` (GroupNorm, ``gcd(32, conv_dims)`` groups), ``"BN"`` or ``""`` (none).
        upsample: how the ``common_stride`` prediction reaches ``output_size``: ``"bilinear"``
            (Panoptic FPN) or ``"convex"`` (RAFT's learned convex upsampling,
            ``pipeline.nn.convex_upsample``: weights predicted from the fused features; it starts
            as bilinear and learns to keep edges sharp).

    A level of stride ``s`` goes through ``max(1, log2(s / common_stride))`` conv blocks, each but
    the single block of the ``common_stride`` level followed by a 2x bilinear upsample. Upsampling
    targets explicit sizes so that odd inputs line up: the reference is the finest input level's
    size scaled to ``common_stride``, and the size at stride ``common_stride * 2**k`` is
    ``ceil(reference / 2**k)`` (the backbones' ``ceil(H / stride)`` convention).

    Attributes:
        predictor: the final 1x1 conv (weights ~ N(0, 0.001), bias 0); a task may re-initialize
            its bias (e.g. to a prior).
    """

    def __init__(
        self,
        feature_spec: Mapping[str, FeatureLevel],
        *,
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        num_outputs: int,
        conv_dims: int = 128,
        common_stride: int = 4,
        norm: str = "GN",
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        if upsample not in HEAD_UPSAMPLING:
            raise ValueError(f"upsample must be one of {', '.join(HEAD_UPSAMPLING)}; got {upsample!r}")
        if not in_features:
            raise ValueError("in_features must name at least one level")
        missing = [f for f in in_features if f not in feature_spec]
        if missing:
            raise ValueError(
                f"in_features {missing} not in the backbone's levels {sorted(feature_spec)}"
            )
        if norm not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}")
        if num_outputs < 1 or conv_dims < 1:
            raise ValueError(f"num_outputs, conv_dims must be >= 1; got {num_outputs}, {conv_dims}")
        if not _is_pow2(common_stride):
            raise ValueError(f"common_stride must be a power of two, got {common_stride}")
        for name in in_features:
            stride = feature_spec[name].stride
            if not _is_pow2(stride) or stride < common_stride:
                raise ValueError(
                    f"level {name!r} has stride {stride}; need a power of two >= {common_stride}"
                )

        self.in_features = tuple(in_features)
        self.common_stride = common_stride
        self.num_outputs = num_outputs
        self._strides = {name: feature_spec[name].stride for name in self.in_features}
        self._finest = min(self.in_features, key=lambda n: self._strides[n])

        self.scale_heads = nn.ModuleDict()
        for name in self.in_features:
            num_blocks = max(1, int(math.log2(self._strides[name] // common_stride)))
            blocks = []
            for k in range(num_blocks):
                in_ch = feature_spec[name].channels if k == 0 else conv_dims
                blocks.append(
                    nn.Sequential(
                        nn.Conv2d(in_ch, conv_dims, 3, padding=1, bias=not norm),
                        norm_layer(norm, conv_dims),
                        nn.ReLU(inplace=True),
                    )
                )
            self.scale_heads[name] = nn.ModuleList(blocks)
        self.predictor = nn.Conv2d(conv_dims, num_outputs, 1)
        self._init_weights()
        self.convex_upsample = (ConvexUpsample(conv_dims, factor=common_stride)
                                if upsample == "convex" and common_stride > 1 else None)

    def _init_weights(self) -> None:
        for m in self.scale_heads.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(
        self, features: Mapping[str, Tensor], output_size: Sequence[int] | None = None
    ) -> Tensor:
        """Fuse ``features`` (Bx C x h x w per level) into Bx``num_outputs`` logits.

        Returns the logits at ``output_size`` = (H, W) (bilinear, ``align_corners=False``), or at
        ``common_stride`` resolution when ``output_size`` is ``None``.
        """
        finest = features[self._finest]
        scale = self._strides[self._finest] // self.common_stride
        reference = (finest.shape[-2] * scale, finest.shape[-1] * scale)

        fused: Tensor | None = None
        for name in self.in_features:
            x = features[name]
            level = int(math.log2(self._strides[name] // self.common_stride))
            for block in self.scale_heads[name]:
                x = block(x)
                if level > 0:
                    level -= 1
                    x = upsample_to(x, _ceil_div(reference, 2**level))
            fused = x if fused is None else fused + x
        assert fused is not None
        logits = self.predictor(fused)
        if output_size is not None and self.convex_upsample is not None:
            size = (int(output_size[0]), int(output_size[1]))
            if tuple(logits.shape[-2:]) != size:
                logits = fit_to(self.convex_upsample(logits, fused), size, self.common_stride)
        elif output_size is not None:
            logits = upsample_to(logits, output_size)
        return logits


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


__all__ = ["HEAD_UPSAMPLING", "SemanticFPNHead"]
