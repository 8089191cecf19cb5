"""Built-in task ``keypoints``: Keypoint R-CNN on the shared FPN.

For the dataset card's keypointed categories (all must have the same number K of keypoints):
K heatmaps of 56x56 per RoI, trained with a cross-entropy over the m x m positions of each
visible keypoint (Mask R-CNN paper, section 5); decoded at the heatmap maximum. Metrics: COCO
keypoint AP with the card's OKS sigmas (``AP``, ``AP50``, ``AP75``, ``APm``, ``APl`` and ARs).

Sharing: when ``instance`` is enabled too and ``share_detector`` is true (the default), the task
builds no detector of its own. Its keypoint branch runs on the instance detector's RoIs (the
positive sampled RoIs of keypointed classes in training, the detections of those classes in
inference), so RPN, box head and box losses are computed once. Alone (or with
``share_detector: false``) it owns an RPN and box head whose classes are the keypointed ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError
from pipeline.hookspecs import hookimpl
from pipeline.nn.inference_size import box_scale
from pipeline.task import Batch, FeatureSpec, Task
from plugins.rcnn.coco import KEYPOINT_STAT_NAMES
from plugins.rcnn.evaluator import CocoEvaluator
from plugins.rcnn.heads import (
    Detector,
    DetectorOptions,
    DetectorOutput,
    KeypointBranch,
    RCNNOutput,
    detector_targets,
    label_lookup,
    zero_loss,
)
from plugins.rcnn.task import RCNNTask


class KeypointOptions(DetectorOptions):
    keypoint_head_dims: tuple[int, ...] | None = None
    """Channels of the keypoint head's 3x3 convs (preset: cpu 4 x 64, gpu 8 x 512)."""
    share_detector: bool = True
    """Reuse the ``instance`` task's RPN and box head when that task is enabled."""


class ResolvedKeypointOptions(KeypointOptions):
    """The options with the preset filled in and what merging flipped views needs from the card."""

    flip_permutations: dict[int, tuple[int, ...]] = Field(default_factory=dict)
    """Card class index -> ``KeypointSpec.flip_permutation`` of its keypointed category."""


def keypointed_classes(card: DatasetCard) -> tuple[list[int], int]:
    """Class indices of the card's keypointed categories and their (common) keypoint count."""
    if not card.keypoints:
        raise ConfigError(f"task keypoints: the dataset card of {card.name} defines no keypoints "
                          "for any category (meta.json 'keypoints', COCO category 'keypoints')")
    counts = {s.num_keypoints for s in card.keypoints}
    if len(counts) != 1:
        raise ConfigError(f"task keypoints: keypointed categories of {card.name} have different "
                          f"keypoint counts {sorted(counts)}; one count is supported")
    return [card.index_of_category(s.category_id) for s in card.keypoints], counts.pop()


class KeypointHead(nn.Module):
    """Keypoint branch plus, unless shared, its own detector over the keypointed classes."""

    def __init__(self, *, feature_spec: FeatureSpec, card: DatasetCard, options: KeypointOptions,
                 shared: bool) -> None:
        super().__init__()
        classes, num_keypoints = keypointed_classes(card)
        detector_classes = card.thing_indices if shared else classes
        self.register_buffer("label_of_class", label_lookup(card.num_classes, detector_classes),
                             persistent=False)
        self.register_buffer("class_of_label", torch.tensor([-1, *detector_classes], dtype=torch.int64),
                             persistent=False)
        self.detector = None if shared else Detector(feature_spec=feature_spec,
                                                      num_classes=len(classes) + 1, options=options)
        assert options.keypoint_head_dims is not None
        self.branch = KeypointBranch(
            feature_spec=feature_spec, in_features=options.in_features, num_keypoints=num_keypoints,
            head_dims=options.keypoint_head_dims, sampling_ratio=options.roi_sampling_ratio,  # type: ignore[arg-type]
            keypoint_labels=tuple(int(self.label_of_class[c]) for c in classes))
        self.num_keypoints = num_keypoints

    def forward(self, features: dict[str, torch.Tensor], *, image_size: tuple[int, int], batch: Batch,
                upstream: dict[str, Any] | None = None) -> RCNNOutput:
        shared: RCNNOutput | None = (upstream or {}).get("instance") if self.detector is None else None
        if self.detector is None and shared is None:
            raise RuntimeError("keypoints head built to share the instance detector got no instance output")
        if not self.training:
            det = shared.det if shared is not None else self.detector(
                features, image_size=image_size, valid_size=batch.get("valid_size"))
            extras = [{"keep": keep, "keypoints": kps} for keep, kps in self.branch.predict(det)]
            return RCNNOutput(det, self.class_of_label, extras=extras, scale=box_scale(batch))
        device = self.label_of_class.device
        if shared is not None:
            det, losses = shared.det, {}
        else:
            targets = detector_targets(batch, label_of_class=self.label_of_class.cpu(), device=device)
            det = self.detector(features, image_size=image_size, targets=targets)  # type: ignore[misc]
            losses = dict(det.losses)
        if not det.image_index:
            return RCNNOutput(det, self.class_of_label, losses={"keypoint": zero_loss(self)})
        losses["keypoint"] = self.branch.loss(det, self._gt_keypoints(det, batch, device))
        return RCNNOutput(det, self.class_of_label, losses=losses)

    def _gt_keypoints(self, det: DetectorOutput, batch: Batch, device: torch.device) -> list[torch.Tensor]:
        """N x K x 3 per trained image, aligned with the detector's targets (zeros where the
        instances carry no keypoints)."""
        out = []
        for i, t in zip(det.image_index, det.targets, strict=True):
            kps = batch["instances"][i].get("keypoints")
            if kps is None or kps.shape[1] != self.num_keypoints:
                kps = torch.zeros((len(batch["instances"][i]["labels"]), self.num_keypoints, 3))
            out.append(kps[t["index"]].to(device=device, dtype=torch.float32))
        return out


class KeypointsTask(RCNNTask[ResolvedKeypointOptions]):
    name = "keypoints"
    main_metric = "AP"
    metrics = KEYPOINT_STAT_NAMES
    requires = ("instances", "keypoints")
    shares_with = ("instance",)
    input_view = "rgb"
    Options = KeypointOptions
    coco_iou_types = ("keypoints",)

    def coco_classes(self, card: DatasetCard) -> list[int]:
        return keypointed_classes(card)[0]

    def resolve_options(self, options: KeypointOptions, *,  # the parse model, a base of OptionsT
                        card: DatasetCard) -> ResolvedKeypointOptions:
        keypointed_classes(card)
        flips = {card.index_of_category(s.category_id): tuple(s.flip_permutation()) for s in card.keypoints}
        return ResolvedKeypointOptions(**options.with_preset().model_dump(), flip_permutations=flips)

    def keypoint_flip(self, options: ResolvedKeypointOptions) -> Mapping[int, Sequence[int]]:
        return options.flip_permutations

    def build_head(self, *, feature_spec: FeatureSpec, card: DatasetCard, options: KeypointOptions,
                   shared_with: tuple[str, ...] = ()) -> nn.Module:
        shared = "instance" in shared_with and options.share_detector
        return KeypointHead(feature_spec=feature_spec, card=card, options=options, shared=shared)

    def evaluator(self, *, card: DatasetCard, options: KeypointOptions) -> CocoEvaluator:
        return CocoEvaluator(card, iou_types=("keypoints",), class_indices=keypointed_classes(card)[0])


@hookimpl
def densepipe_register_tasks() -> list[Task]:
    return [KeypointsTask()]
