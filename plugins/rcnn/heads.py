"""R-CNN components on the shared FPN features: a detector (RPN + Fast R-CNN box branch) and the
mask and keypoint branches of Mask R-CNN (He et al., 2017), built from torchvision's modules.

The pieces are separate so that task plugins can share them: ``instance`` owns a ``Detector`` and
a ``MaskBranch``; ``keypoints`` owns a ``KeypointBranch`` and either its own ``Detector`` or, when
``instance`` is enabled too, the instance detector's output (``DetectorOutput``).

Conventions (torchvision's): boxes are ``x1, y1, x2, y2`` in input pixels (continuous
coordinates), detector labels are ``0 = background`` and ``1..C`` for the detector's classes.
The mapping between a dataset card's class indices and detector labels is the caller's.

Presets (``RCNN_PRESETS``): ``cpu`` trains at 128x128 on a CPU in minutes (small anchors, 64
sampled RoIs per image, a 256-d box head, two mask convs, four keypoint convs of 64);
``gpu`` is standard Mask R-CNN / Keypoint R-CNN (anchors 32..512, 512 RoIs per image, 1024-d box
head, four 256-channel mask convs, eight 512-channel keypoint convs, RPN 2000/1000 proposals).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    keypointrcnn_inference,
    keypointrcnn_loss,
    maskrcnn_inference,
    maskrcnn_loss,
    paste_masks_in_image,
)
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from pipeline.errors import ConfigError
from pipeline.nn.backbones import FeatureLevel
from pipeline.nn.inference_size import scale_boxes

Features = dict[str, torch.Tensor]

RCNN_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "anchor_sizes": (8, 16, 32, 64, 128),
        "rpn_pre_nms_top_n": (600, 300),
        "rpn_post_nms_top_n": (300, 100),
        "rpn_batch_size_per_image": 128,
        "box_batch_size_per_image": 64,
        "box_head_dim": 256,
        "roi_sampling_ratio": 1,
        "detections_per_image": 50,
        "mask_head_dims": (64, 64),
        "keypoint_head_dims": (64, 64, 64, 64),
    },
    "gpu": {
        "anchor_sizes": (32, 64, 128, 256, 512),
        "rpn_pre_nms_top_n": (2000, 1000),
        "rpn_post_nms_top_n": (2000, 1000),
        "rpn_batch_size_per_image": 256,
        "box_batch_size_per_image": 512,
        "box_head_dim": 1024,
        "roi_sampling_ratio": 2,
        "detections_per_image": 100,
        "mask_head_dims": (256, 256, 256, 256),
        "keypoint_head_dims": (512,) * 8,
    },
}


class DetectorOptions(BaseModel):
    """Detector settings shared by the ``instance`` and ``keypoints`` tasks.

    A field left ``None`` takes the value of ``preset`` (``RCNN_PRESETS``)."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["cpu", "gpu"] = "cpu"
    in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5")
    """FPN levels the RoIAlign poolers read (level chosen per box by its size, as in FPN)."""
    rpn_features: tuple[str, ...] = ("p2", "p3", "p4", "p5", "p6")
    """FPN levels the RPN runs on; one anchor size per level."""
    anchor_sizes: tuple[int, ...] | None = None
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n: tuple[int, int] | None = None
    """Proposals kept per level before NMS: (training, inference)."""
    rpn_post_nms_top_n: tuple[int, int] | None = None
    """Proposals kept per image after NMS: (training, inference)."""
    rpn_nms_thresh: float = Field(0.7, gt=0, le=1)
    rpn_batch_size_per_image: int | None = Field(None, ge=1)
    box_batch_size_per_image: int | None = Field(None, ge=1)
    """RoIs sampled per image for the box (and mask/keypoint) losses, 25 % positive."""
    box_positive_fraction: float = Field(0.25, gt=0, le=1)
    box_head_dim: int | None = Field(None, ge=8)
    roi_sampling_ratio: int | None = Field(None, ge=0)
    """RoIAlign sampling points per bin and axis (0: adaptive, ceil(RoI size / bin count))."""
    score_thresh: float = Field(0.05, ge=0, le=1)
    nms_thresh: float = Field(0.5, gt=0, le=1)
    detections_per_image: int | None = Field(None, ge=1)

    def with_preset(self) -> DetectorOptions:
        """A copy with every ``None`` field filled from the preset (the form the tasks use)."""
        preset = RCNN_PRESETS[self.preset]
        fill = {k: v for k, v in preset.items()
                if k in type(self).model_fields and getattr(self, k) is None}
        return self.model_copy(update=fill)


def label_lookup(num_classes: int, class_indices: list[int]) -> torch.Tensor:
    """Card class index -> detector label: ``1 + position`` in ``class_indices``, 0 elsewhere."""
    lookup = torch.zeros(num_classes, dtype=torch.int64)
    for pos, c in enumerate(class_indices):
        lookup[c] = pos + 1
    return lookup


def zero_loss(module: nn.Module) -> torch.Tensor:
    """A zero that keeps ``module``'s parameters in the graph (no labels in the batch)."""
    return sum(p.sum() for p in module.parameters()) * 0.0  # type: ignore[return-value]


def detector_targets(batch: dict[str, Any], *, label_of_class: torch.Tensor, device: torch.device,
                     min_size: float = 1.0) -> list[dict[str, torch.Tensor] | None]:
    """Detector targets from a collated batch's ``instances``.

    ``label_of_class``: int64 lookup, card class index -> detector label (0 = not a class of this
    detector). Kept per image: non-crowd instances of the detector's classes whose box is at least
    ``min_size`` pixels wide and high. Each target has ``boxes`` Nx4, ``labels`` N and ``index``
    (N, positions in the image's ``instances``, to fetch masks or keypoints). ``None`` for an
    image without instance labels."""
    instances = batch.get("instances") or [None] * int(batch["image"].shape[0])
    targets: list[dict[str, torch.Tensor] | None] = []
    for inst in instances:
        if inst is None:
            targets.append(None)
            continue
        boxes = inst["boxes"].to(torch.float32)
        classes = inst["labels"].to(torch.int64)
        in_range = (classes >= 0) & (classes < len(label_of_class))
        labels = torch.where(in_range, label_of_class[classes.clamp(0, len(label_of_class) - 1)], 0)
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = (labels > 0) & ~inst["iscrowd"].to(torch.bool) & (wh >= min_size).all(dim=1)
        index = keep.nonzero().flatten()
        targets.append({"boxes": boxes[index].to(device), "labels": labels[index].to(device),
                        "index": index})
    return targets


def _check_levels(feature_spec: dict[str, FeatureLevel], names: tuple[str, ...], what: str) -> int:
    missing = [n for n in names if n not in feature_spec]
    if missing:
        raise ConfigError(f"{what}: feature levels {missing} not produced by the backbone "
                          f"(it has {sorted(feature_spec)})")
    channels = {feature_spec[n].channels for n in names}
    if len(channels) != 1:
        raise ConfigError(f"{what}: levels {list(names)} have different channel counts {channels}")
    strides = [feature_spec[n].stride for n in names]
    if any(b != 2 * a for a, b in zip(strides, strides[1:], strict=False)):
        info = getattr(feature_spec, "info", None)
        which = f"backbone {info.name} at output stride {info.output_stride}" if info else "the backbone"
        raise ConfigError(f"{what}: the R-CNN heads need levels whose strides double, but {list(names)} "
                          f"have strides {strides} ({which}); use model.output_stride=32")
    return channels.pop()


@dataclass
class DetectorOutput:
    """What a ``Detector`` hands to its own losses and to the mask/keypoint branches.

    ``features``: the FPN levels of the images the detector ran on (in training only the images
    that have instance labels, ``image_index`` into the batch). Training: ``losses``, the sampled
    RoIs ``proposals`` (Px4), their detector ``labels`` (P, 0 = background), ``matched_idxs`` (P,
    index into that image's targets) and the ``targets`` themselves. Inference: ``detections``,
    one ``{"boxes" Nx4, "scores" N, "labels" N}`` per image, best first."""

    features: Features
    image_shapes: list[tuple[int, int]]
    image_index: list[int]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    proposals: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    matched_idxs: list[torch.Tensor] = field(default_factory=list)
    targets: list[dict[str, torch.Tensor]] = field(default_factory=list)
    detections: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def positives(self, keep_labels: torch.Tensor | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Positive sampled RoIs per image and their matched target indices; with
        ``keep_labels``, only RoIs whose label is among them."""
        boxes, matched = [], []
        for props, labels, idxs in zip(self.proposals, self.labels, self.matched_idxs, strict=True):
            pos = labels > 0 if keep_labels is None else torch.isin(labels, keep_labels)
            boxes.append(props[pos])
            matched.append(idxs[pos])
        return boxes, matched


@dataclass
class RCNNOutput:
    """Raw output of an R-CNN task head: the detector's output, the map from detector labels to
    card class indices, the loss terms (training) and per-image extras of inference (``masks``
    N x H x W bool, ``keypoints`` N x K x 3, ``keep`` the detections the extras belong to)."""

    det: DetectorOutput
    class_of_label: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: list[dict[str, torch.Tensor]] = field(default_factory=list)
    scale: tuple[float, float] = (1.0, 1.0)
    """``(sx, sy)`` from input to original pixel coordinates (``inference_size.box_scale``):
    ``predictions`` scales boxes and keypoints by it (masks are pasted at the original size)."""

    def predictions(self) -> list[dict[str, torch.Tensor]]:
        """Per image (CPU): ``boxes`` Nx4, ``scores`` N, ``labels`` N (card class indices), best
        first, plus the extras; with ``keep`` in the extras only those detections are listed.
        Boxes and keypoints are in the original image's pixels (``scale`` applied)."""
        lookup = self.class_of_label.cpu()
        preds = []
        for d, extra in zip(self.det.detections, self.extras or [{}] * len(self.det.detections),
                            strict=True):
            keep = extra.get("keep")
            boxes, scores, labels = d["boxes"], d["scores"], d["labels"]
            if keep is not None:
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            pred = {"boxes": scale_boxes(boxes.cpu(), self.scale), "scores": scores.cpu(),
                    "labels": lookup[labels.cpu()]}
            pred.update({k: v.cpu() for k, v in extra.items() if k != "keep"})
            if "keypoints" in pred and self.scale != (1.0, 1.0):
                kps = pred["keypoints"].clone()
                kps[..., 0] *= self.scale[0]
                kps[..., 1] *= self.scale[1]
                pred["keypoints"] = kps
            preds.append(pred)
        return preds


class Detector(nn.Module):
    """RPN + box branch (torchvision's ``RegionProposalNetwork`` and ``RoIHeads`` box part).

    ``forward(features, image_size, targets)``: ``features`` the FPN levels (Bx C x h x w each);
    ``targets`` (training) one dict per image, ``boxes`` Nx4 float and ``labels`` N int64 in
    ``1..num_classes - 1``, or ``None`` for an image without instance labels (it is skipped)."""

    def __init__(self, *, feature_spec: dict[str, FeatureLevel], num_classes: int,
                 options: DetectorOptions) -> None:
        super().__init__()
        o = options.with_preset()
        assert o.anchor_sizes is not None and o.rpn_pre_nms_top_n is not None
        assert o.rpn_post_nms_top_n is not None and o.box_head_dim is not None
        if len(o.anchor_sizes) != len(o.rpn_features):
            raise ConfigError(f"anchor_sizes {list(o.anchor_sizes)}: one size per RPN level "
                              f"{list(o.rpn_features)} expected")
        channels = _check_levels(feature_spec, o.rpn_features, "rpn_features")
        pool_channels = _check_levels(feature_spec, o.in_features, "in_features")
        self.rpn_features = o.rpn_features
        self.in_features = o.in_features
        anchors = AnchorGenerator(sizes=tuple((s,) for s in o.anchor_sizes),
                                  aspect_ratios=(o.aspect_ratios,) * len(o.anchor_sizes))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(channels, len(o.aspect_ratios)),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=o.rpn_batch_size_per_image, positive_fraction=0.5,
            pre_nms_top_n={"training": o.rpn_pre_nms_top_n[0], "testing": o.rpn_pre_nms_top_n[1]},
            post_nms_top_n={"training": o.rpn_post_nms_top_n[0], "testing": o.rpn_post_nms_top_n[1]},
            nms_thresh=o.rpn_nms_thresh)
        pooler = MultiScaleRoIAlign(featmap_names=list(o.in_features), output_size=7,
                                    sampling_ratio=o.roi_sampling_ratio)
        self.roi_heads = RoIHeads(
            pooler, TwoMLPHead(pool_channels * 7 * 7, o.box_head_dim),
            FastRCNNPredictor(o.box_head_dim, num_classes),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5,
            batch_size_per_image=o.box_batch_size_per_image, positive_fraction=o.box_positive_fraction,
            bbox_reg_weights=None, score_thresh=o.score_thresh, nms_thresh=o.nms_thresh,
            detections_per_img=o.detections_per_image)
        self.num_classes = num_classes

    def forward(self, features: Features, *, image_size: tuple[int, int],
                targets: list[dict[str, torch.Tensor] | None] | None = None,
                valid_size: tuple[int, int] | None = None) -> DetectorOutput:
        """``valid_size``: the image's size inside a padded input (``inference_size``); boxes are
        clipped to it. None: all of ``image_size``."""
        # NCHW: torchvision's RoIAlign on channels_last maps is several times slower on CPU
        levels = dict.fromkeys((*self.rpn_features, *self.in_features))
        features = {k: features[k].contiguous() for k in levels}
        batch_size = next(iter(features.values())).shape[0]
        index = list(range(batch_size))
        if self.training:
            if targets is None:
                raise ValueError("Detector needs targets in training")
            index = [i for i, t in enumerate(targets) if t is not None]
            if len(index) < batch_size:
                sel = torch.tensor(index, dtype=torch.long, device=next(iter(features.values())).device)
                features = {k: v.index_select(0, sel) for k, v in features.items()}
        shapes = [tuple(valid_size or image_size)] * len(index)
        out = DetectorOutput(features=features, image_shapes=shapes, image_index=index)
        if not index:
            return out
        ref = features[self.rpn_features[0]]
        # the RPN reads only the batch size, the image size, dtype and device of ``tensors``
        images = ImageList(ref.new_empty((1, 1, 1, 1)).expand(len(index), 1, *image_size), shapes)
        rpn_levels = OrderedDict((k, features[k]) for k in self.rpn_features)
        pool_levels = {k: features[k] for k in self.in_features}
        if self.training:
            tgts = [targets[i] for i in index]  # type: ignore[index]
            proposals, rpn_losses = self.rpn(images, rpn_levels, tgts)
            proposals, matched, labels, reg_targets = self.roi_heads.select_training_samples(
                proposals, tgts)  # type: ignore[arg-type]
            class_logits, box_regression = self._box_outputs(pool_levels, proposals, shapes)
            loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, reg_targets)
            out.losses = {"rpn_objectness": rpn_losses["loss_objectness"],
                          "rpn_box": rpn_losses["loss_rpn_box_reg"],
                          "cls": loss_cls, "box_reg": loss_box}
            out.proposals, out.labels, out.matched_idxs, out.targets = proposals, labels, matched, tgts
        else:
            proposals, _ = self.rpn(images, rpn_levels)
            class_logits, box_regression = self._box_outputs(pool_levels, proposals, shapes)
            boxes, scores, labels = self.roi_heads.postprocess_detections(
                class_logits, box_regression, proposals, shapes)
            out.detections = [{"boxes": b, "scores": s, "labels": lab}
                              for b, s, lab in zip(boxes, scores, labels, strict=True)]
        return out

    def _box_outputs(self, levels: Features, proposals: list[torch.Tensor],
                     shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (R x C) and box deltas (R x 4C) of the RoIs."""
        heads = self.roi_heads
        return heads.box_predictor(heads.box_head(heads.box_roi_pool(levels, proposals, shapes)))


def _inside(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``N x K x 2`` points clamped into their ``N x 4`` boxes (x1, y1, x2, y2)."""
    return points.clamp(min=boxes[:, None, :2].to(points.dtype), max=boxes[:, None, 2:].to(points.dtype))


class MaskBranch(nn.Module):
    """Mask R-CNN's mask branch: RoIAlign 14x14, ``len(head_dims)`` 3x3 convs, a 2x deconvolution
    and one 28x28 mask logit map per class; per-pixel binary cross-entropy on the RoI's class.

    Training: ``loss(det)`` on the detector's positive RoIs. Inference: ``predict(det)`` adds
    ``masks`` (N x H x W bool at the input size, probability > ``threshold``) to each detection."""

    def __init__(self, *, feature_spec: dict[str, FeatureLevel], in_features: tuple[str, ...],
                 num_classes: int, head_dims: tuple[int, ...], sampling_ratio: int = 2) -> None:
        super().__init__()
        channels = _check_levels(feature_spec, in_features, "in_features")
        self.pool = MultiScaleRoIAlign(featmap_names=list(in_features), output_size=14,
                                       sampling_ratio=sampling_ratio)
        self.head = MaskRCNNHeads(channels, list(head_dims), dilation=1)
        self.predictor = MaskRCNNPredictor(head_dims[-1], head_dims[-1], num_classes)
        self.in_features = in_features

    def _logits(self, det: DetectorOutput, boxes: list[torch.Tensor]) -> torch.Tensor:
        levels = {k: det.features[k] for k in self.in_features}
        # contiguous: torchvision's losses ``view`` the logits (channels_last runs would fail)
        return self.predictor(self.head(self.pool(levels, boxes, det.image_shapes))).contiguous()

    def loss(self, det: DetectorOutput, gt_masks: list[torch.Tensor]) -> torch.Tensor:
        """``gt_masks``: per trained image, the masks (N x H x W) of its targets, in order."""
        boxes, matched = det.positives()
        logits = self._logits(det, boxes)
        if logits.numel() == 0:
            return zero_loss(self)
        return maskrcnn_loss(logits, boxes, gt_masks, [t["labels"] for t in det.targets], matched)

    def predict(self, det: DetectorOutput, threshold: float = 0.5, *,
                scale: tuple[float, float] = (1.0, 1.0),
                out_size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """Per image, N x H x W bool masks of the detections, pasted into ``out_size`` (the
        original image, with boxes scaled by ``scale``; default: the detector's image shapes),
        as torchvision's ``GeneralizedRCNNTransform.postprocess`` does."""
        boxes = [d["boxes"] for d in det.detections]
        shapes = [out_size] * len(boxes) if out_size is not None else det.image_shapes
        if sum(len(b) for b in boxes) == 0:
            return [torch.zeros((0, *s), dtype=torch.bool, device=b.device)
                    for b, s in zip(boxes, shapes, strict=True)]
        probs = maskrcnn_inference(self._logits(det, boxes), [d["labels"] for d in det.detections])
        return [paste_masks_in_image(p, scale_boxes(b, scale), s)[:, 0] > threshold
                for p, b, s in zip(probs, boxes, shapes, strict=True)]


class KeypointBranch(nn.Module):
    """Keypoint R-CNN's branch: RoIAlign 14x14, ``len(head_dims)`` 3x3 convs, a 2x deconvolution
    and 2x bilinear upsampling to K heatmaps of 56x56; the loss is a softmax cross-entropy over
    the m x m positions of each visible keypoint (Mask R-CNN paper, section 5).

    It runs on RoIs whose detector label is in ``keypoint_labels`` (the classes that have
    keypoints). ``loss(det)`` in training; ``predict(det)`` returns, per image, the indices of
    the detections it ran on and their keypoints (N x K x 3: x, y, heatmap score)."""

    def __init__(self, *, feature_spec: dict[str, FeatureLevel], in_features: tuple[str, ...],
                 num_keypoints: int, head_dims: tuple[int, ...], keypoint_labels: tuple[int, ...],
                 sampling_ratio: int = 2) -> None:
        super().__init__()
        channels = _check_levels(feature_spec, in_features, "in_features")
        self.pool = MultiScaleRoIAlign(featmap_names=list(in_features), output_size=14,
                                       sampling_ratio=sampling_ratio)
        self.head = KeypointRCNNHeads(channels, list(head_dims))
        self.predictor = KeypointRCNNPredictor(head_dims[-1], num_keypoints)
        self.in_features = in_features
        self.num_keypoints = num_keypoints
        self.register_buffer("keypoint_labels", torch.tensor(keypoint_labels, dtype=torch.int64),
                             persistent=False)

    def _logits(self, det: DetectorOutput, boxes: list[torch.Tensor]) -> torch.Tensor:
        levels = {k: det.features[k] for k in self.in_features}
        # contiguous: torchvision's losses ``view`` the logits (channels_last runs would fail)
        return self.predictor(self.head(self.pool(levels, boxes, det.image_shapes))).contiguous()

    def loss(self, det: DetectorOutput, gt_keypoints: list[torch.Tensor]) -> torch.Tensor:
        """``gt_keypoints``: per trained image, N x K x 3 (x, y, visibility) of its targets."""
        boxes, matched = det.positives(self.keypoint_labels)
        logits = self._logits(det, boxes)
        if logits.numel() == 0 or not any(bool((k[..., 2] > 0).any()) for k in gt_keypoints):
            return zero_loss(self) + logits.sum() * 0.0
        return keypointrcnn_loss(logits, boxes, gt_keypoints, matched)

    def predict(self, det: DetectorOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        keep = [torch.isin(d["labels"], self.keypoint_labels).nonzero().flatten() for d in det.detections]
        boxes = [d["boxes"][k] for d, k in zip(det.detections, keep, strict=True)]
        if sum(len(b) for b in boxes) == 0:
            return [(k, b.new_zeros((0, self.num_keypoints, 3))) for k, b in zip(keep, boxes, strict=True)]
        points, scores = keypointrcnn_inference(self._logits(det, boxes), boxes)
        # torchvision's heatmap decoding can land up to a pixel past its box (the heatmap is
        # resized to the box's size rounded up): keep each keypoint inside its box, hence inside
        # the image, whose bounds the boxes are clipped to
        return [(k, torch.cat([_inside(p[..., :2], b), s[..., None]], dim=-1))
                for k, p, s, b in zip(keep, points, scores, boxes, strict=True)]
