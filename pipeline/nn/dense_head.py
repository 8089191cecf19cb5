"""The decoder options every dense task shares, and the head that wraps the chosen decoder.

A dense task plugin (semantic, depth, normals, colorization, or a user's) subclasses
``DecoderOptions`` for its ``Options`` (adding its own loss and metric settings) and builds its
head with ``build_dense_head``; the decoder itself comes from ``pipeline.nn.decoders``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline.nn.backbones import FeatureLevel
from pipeline.nn.decoders import build_task_decoder


class DecoderOptions(BaseModel):
    """``model.heads.<task>`` keys choosing and sizing the task's decoder."""

    model_config = ConfigDict(extra="forbid")
    conv_dims: int = Field(128, ge=8)
    norm: Literal["GN", "BN", "none"] = "GN"
    in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5")
    decoder: str = "panoptic_fpn"
    """Decoder name (``pipeline.nn.decoders.DECODERS``): fcn32s, fcn16s, fcn8s, unet, segnet,
    context_basic, context_large, aspp, psp, panoptic_fpn, hypercolumns, or a plugin's."""
    decoder_options: dict[str, Any] = Field(default_factory=dict)
    """The decoder's own options (e.g. ``{rates: [6, 12, 18]}`` for aspp); for ``panoptic_fpn``
    they override ``conv_dims`` / ``in_features`` / ``norm``."""
    output_init: Literal["small", "xavier"] = "small"
    """Initial weights of the decoder's output layers (its 1x1 ``predictor`` / ``classifier`` /
    ``score`` convolutions): ``small`` keeps the decoder's own near-zero normal (std 0.001 for
    ``panoptic_fpn``, 0.01 for the others), so a regression head starts at its bias (a task's
    prior); ``xavier`` is Glorot uniform (smp's segmentation heads): class logits start with unit
    scale and learn faster from random initialisation (semantic's default,
    benchmarks/results/peers.json). Biases stay 0."""


def build_task_decoder_from_options(task: str, options: DecoderOptions, *,
                                    feature_spec: dict[str, FeatureLevel], num_outputs: int) -> nn.Module:
    """The decoder of ``options`` over ``feature_spec`` (checked against the backbone's
    capabilities): unknown names, options or an incompatible backbone are one-line
    ``ConfigError``s raised when the model is built, before any training step."""
    defaults: dict[str, Any] = {"norm": options.norm}
    if options.decoder == "panoptic_fpn":
        defaults.update(in_features=options.in_features, conv_dims=options.conv_dims)
    decoder = build_task_decoder(task, options.decoder, options.decoder_options,
                                 feature_spec=feature_spec, num_outputs=num_outputs, defaults=defaults)
    if options.output_init == "xavier":
        for conv in output_layers(decoder, num_outputs):
            nn.init.xavier_uniform_(conv.weight)
    return decoder


OUTPUT_LAYER_NAMES = ("predictor", "classifier", "score")
"""Attribute names under which the built-in decoders keep their output convolutions."""


def output_layers(decoder: nn.Module, num_outputs: int) -> list[nn.Conv2d]:
    """The decoder's 1x1 output convolutions: ``Conv2d`` modules with ``num_outputs`` output
    channels found under an attribute named in ``OUTPUT_LAYER_NAMES`` (a plugin decoder following
    that naming gets ``output_init`` too)."""
    found = []
    for name, module in decoder.named_modules():
        if (isinstance(module, nn.Conv2d) and module.out_channels == num_outputs
                and module.kernel_size == (1, 1)
                and any(part in OUTPUT_LAYER_NAMES for part in name.split("."))):
            found.append(module)
    return found


class DenseHead(nn.Module):
    """A decoder producing ``B x num_outputs x h x w`` raw values, where ``(h, w)`` is the input
    size divided by ``output_stride`` (rounded up; 1 = the input resolution)."""

    def __init__(self, decoder: nn.Module, *, output_stride: int = 1) -> None:
        super().__init__()
        if output_stride < 1:
            raise ValueError(f"output_stride: expected >= 1, got {output_stride}")
        self.decoder = decoder
        self.output_stride = int(output_stride)

    def forward(self, features: dict[str, torch.Tensor], *, image_size: tuple[int, int],
                batch: Any = None) -> torch.Tensor:
        s = self.output_stride
        size = (-(-image_size[0] // s), -(-image_size[1] // s))  # no int(): export keeps H, W symbolic
        return self.decoder(features, output_size=size)


def build_dense_head(task: str, options: DecoderOptions, *, feature_spec: dict[str, FeatureLevel],
                     num_outputs: int, output_stride: int = 1) -> DenseHead:
    """``DenseHead`` over the decoder that ``options`` choose (see ``build_task_decoder_from_options``)."""
    decoder = build_task_decoder_from_options(task, options, feature_spec=feature_spec,
                                              num_outputs=num_outputs)
    return DenseHead(decoder, output_stride=output_stride)
