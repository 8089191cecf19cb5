"""Reusable network blocks: backbones with FPN (``backbones``), dense decoders (``decoders``, with
the Panoptic FPN semantic branch in ``fpn_heads``), upsampling operators (``upsample``), resizing
helpers (``resize``) and dense losses (``dense_losses``). The R-CNN detector, mask and keypoint
branches belong to the R-CNN tasks' plugin (``plugins.rcnn.heads``)."""

from __future__ import annotations

from pipeline.nn.backbones import (
    BACKBONES,
    Backbone,
    BackboneInfo,
    BackboneSpec,
    FeatureLevel,
    build_backbone,
    load_backbone_weights,
    register_backbone,
)
from pipeline.nn.decoders import DECODERS, build_decoder, register_decoder
from pipeline.nn.fpn_heads import SemanticFPNHead
from pipeline.nn.resize import crop_to, upsample_to

__all__ = [
    "BACKBONES",
    "DECODERS",
    "Backbone",
    "BackboneInfo",
    "BackboneSpec",
    "FeatureLevel",
    "SemanticFPNHead",
    "build_backbone",
    "build_decoder",
    "load_backbone_weights",
    "register_backbone",
    "register_decoder",
    "crop_to",
    "upsample_to",
]
