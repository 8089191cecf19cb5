"""Reusable network blocks: backbones with FPN (``backbones``), dense decoders (``fpn_heads``), R-CNN
detector, mask and keypoint branches (``rcnn``) and the shared R-CNN task methods (``rcnn_task``)."""

from __future__ import annotations

from pipeline.nn.backbones import (
    BACKBONES,
    Backbone,
    FeatureLevel,
    build_backbone,
    load_backbone_weights,
    register_backbone,
)
from pipeline.nn.fpn_heads import SemanticFPNHead, upsample_to

__all__ = [
    "BACKBONES",
    "Backbone",
    "FeatureLevel",
    "SemanticFPNHead",
    "build_backbone",
    "load_backbone_weights",
    "register_backbone",
    "upsample_to",
]
