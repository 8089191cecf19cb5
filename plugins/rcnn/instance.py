"""Built-in task ``instance``: instance segmentation with Mask R-CNN heads on the shared FPN.

Head: torchvision's RPN, RoIAlign box head (two FC layers) and mask head, assembled in
``plugins.rcnn.heads`` over the backbone's p2..p6. The detector classes are the dataset card's
thing classes (detector label ``1 + position`` in ``card.thing_indices``). Losses: RPN objectness
and box regression, Fast R-CNN classification and box regression, per-pixel mask BCE. Metrics:
COCO bbox and segm AP through pycocotools (``bbox_AP``, ``segm_AP50``, ...).

Options (``model.heads.instance``): ``preset: cpu | gpu`` (see ``plugins.rcnn.heads.RCNN_PRESETS``)
and any single setting of it.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError
from pipeline.hookspecs import hookimpl
from pipeline.nn.inference_size import box_scale, output_size
from pipeline.task import Batch, FeatureSpec, Task
from plugins.rcnn.coco import BBOX_STAT_NAMES
from plugins.rcnn.evaluator import CocoEvaluator
from plugins.rcnn.heads import (
    Detector,
    DetectorOptions,
    MaskBranch,
    RCNNOutput,
    detector_targets,
    label_lookup,
    zero_loss,
)
from plugins.rcnn.task import RCNNTask


class InstanceOptions(DetectorOptions):
    mask_head_dims: tuple[int, ...] | None = None
    """Channels of the mask head's 3x3 convs (preset: cpu 2 x 64, gpu 4 x 256)."""
    mask_threshold: float = Field(0.5, gt=0, lt=1)


class InstanceHead(nn.Module):
    def __init__(self, *, feature_spec: FeatureSpec, card: DatasetCard, options: InstanceOptions) -> None:
        super().__init__()
        things = card.thing_indices
        self.register_buffer("label_of_class", label_lookup(card.num_classes, things), persistent=False)
        self.register_buffer("class_of_label", torch.tensor([-1, *things], dtype=torch.int64),
                             persistent=False)
        self.detector = Detector(feature_spec=feature_spec, num_classes=len(things) + 1, options=options)
        assert options.mask_head_dims is not None
        self.mask = MaskBranch(feature_spec=feature_spec, in_features=options.in_features,
                               num_classes=len(things) + 1, head_dims=options.mask_head_dims,
                               sampling_ratio=options.roi_sampling_ratio)
        self.mask_threshold = options.mask_threshold

    def forward(self, features: dict[str, torch.Tensor], *, image_size: tuple[int, int],
                batch: Batch) -> RCNNOutput:
        if not self.training:
            det = self.detector(features, image_size=image_size, valid_size=batch.get("valid_size"))
            scale = box_scale(batch)
            masks = self.mask.predict(det, self.mask_threshold, scale=scale,
                                      out_size=output_size(batch))
            return RCNNOutput(det, self.class_of_label, extras=[{"masks": m} for m in masks],
                              scale=scale)
        device = self.label_of_class.device
        targets = detector_targets(batch, label_of_class=self.label_of_class.cpu(), device=device)
        det = self.detector(features, image_size=image_size, targets=targets)
        if not det.image_index:
            return RCNNOutput(det, self.class_of_label, losses={"rpn_objectness": zero_loss(self)})
        gt_masks = [batch["instances"][i]["masks"][t["index"]].to(device)
                    for i, t in zip(det.image_index, det.targets, strict=True)]
        losses = {**det.losses, "mask": self.mask.loss(det, gt_masks)}
        return RCNNOutput(det, self.class_of_label, losses=losses)


class InstanceTask(RCNNTask[InstanceOptions]):
    name = "instance"
    main_metric = "segm_AP"
    metrics = tuple(f"{t}_{s}" for t in ("bbox", "segm") for s in BBOX_STAT_NAMES)
    requires = ("instances",)
    input_view = "rgb"
    Options = InstanceOptions
    coco_iou_types = ("bbox", "segm")

    def resolve_options(self, options: InstanceOptions, *,
                        card: DatasetCard) -> InstanceOptions:
        if not card.thing_indices:
            raise ConfigError(f"task instance: the dataset card of {card.name} has no thing classes")
        return options.with_preset()  # type: ignore[return-value]

    def build_head(self, *, feature_spec: FeatureSpec, card: DatasetCard,
                   options: InstanceOptions) -> nn.Module:
        return InstanceHead(feature_spec=feature_spec, card=card, options=options)

    def evaluator(self, *, card: DatasetCard, options: InstanceOptions) -> CocoEvaluator:
        return CocoEvaluator(card, iou_types=("bbox", "segm"))


@hookimpl
def densepipe_register_tasks() -> list[Task]:
    return [InstanceTask()]
