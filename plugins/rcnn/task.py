"""``RCNNTask``: the Task methods that the R-CNN tasks (``instance``, ``keypoints``) share, and
their drawing (``draw_detections``).

Their heads return an ``RCNNOutput``: the loss terms are computed inside the head (the RoI
sampler needs the targets), predictions are its ``predictions()``, drawings show boxes, masks and
skeletons, and ``densepipe predict`` writes the detections as COCO results JSON: per image
(``save_prediction``) and, for the evaluators, one file per run (``write_dataset_predictions``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from pipeline.data.card import DatasetCard
from pipeline.nn.inference_size import original_size
from pipeline.nn.tta import merge_detections
from pipeline.task import Batch, PredictedImage, Task
from pipeline.viz import draw_instances
from plugins.rcnn.coco import write_results_json
from plugins.rcnn.evaluator import save_detections_json
from plugins.rcnn.heads import DetectorOptions, RCNNOutput
from plugins.rcnn.results import detections_to_results

DetectorOptionsT = TypeVar("DetectorOptionsT", bound=DetectorOptions)
"""The options of an R-CNN task (``InstanceOptions``, ``KeypointOptions``)."""


def coco_results(prediction: dict[str, torch.Tensor], *, image_id: int, card: DatasetCard,
                 class_indices: list[int], iou_types: tuple[str, ...]) -> list[dict[str, Any]]:
    """One image's detections as COCO results, exactly as ``CocoEvaluator`` scores them for an
    image evaluated at its original size: only the detections of ``class_indices`` (card class
    indices), boxes as float64 ``[x, y, w, h]``, the card's category ids, plus ``segmentation``
    (RLE) when ``segm`` is in ``iou_types`` and ``keypoints`` when ``keypoints`` is."""
    labels = prediction["labels"].to(torch.int64)
    keep = torch.isin(labels, torch.tensor(class_indices, dtype=torch.int64)).nonzero().flatten()
    if len(keep) == 0:
        return []
    return detections_to_results(
        image_id, boxes=prediction["boxes"][keep].double(), scores=prediction["scores"][keep],
        category_ids=[card.classes[c].id for c in labels[keep].tolist()],
        masks=prediction["masks"][keep].bool() if "segm" in iou_types else None,
        keypoints=prediction["keypoints"][keep].double() if "keypoints" in iou_types else None)


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def draw_detections(image: Any, prediction: Mapping[str, Any], card: Any, *,
                    min_score: float = 0.5) -> np.ndarray:
    """``draw_instances`` for a detection task's prediction (``boxes``, ``scores``, ``labels`` as
    card class indices, optional ``masks`` / ``keypoints`` N x K x 3 with scores): detections
    scoring at least ``min_score``, labelled ``"<class> <score>"``, skeletons from the card."""
    keep = _np(prediction["scores"]).reshape(-1) >= min_score
    keypoints = prediction.get("keypoints")
    if keypoints is not None:  # predicted keypoints have scores, not visibilities: draw them all
        keypoints = _np(keypoints)[keep].astype(np.float64).copy()
        keypoints[..., 2] = 2.0
    masks = prediction.get("masks")
    skeletons = {card.index_of_category(s.category_id): s.skeleton for s in card.keypoints}
    return draw_instances(image, _np(prediction["boxes"])[keep], _np(prediction["labels"])[keep],
                          masks=None if masks is None else _np(masks)[keep],
                          scores=_np(prediction["scores"])[keep], keypoints=keypoints,
                          class_names=card.class_names, palette=card.palette(), skeletons=skeletons)


class RCNNTask(Task[DetectorOptionsT]):
    """Base of tasks whose head returns an ``RCNNOutput`` (subclasses add head and evaluator)."""

    coco_iou_types: ClassVar[tuple[str, ...]] = ("bbox",)
    export_refusal = ("the R-CNN detector's score filter and NMS keep a data-dependent number of "
                      "boxes, which torch.export cannot trace")
    """What the task's COCO results carry and are scored on (``bbox``, ``segm``, ``keypoints``)."""

    def coco_classes(self, card: DatasetCard) -> list[int]:
        """The card classes the task's COCO evaluation covers (default: the thing classes)."""
        return list(card.thing_indices)

    def losses(self, output: RCNNOutput, batch: Batch, *,
               options: DetectorOptionsT) -> dict[str, torch.Tensor]:
        return output.losses

    def postprocess(self, output: RCNNOutput, *, batch: Batch, predictions: dict[str, list[Any]],
                    options: DetectorOptionsT) -> list[dict[str, torch.Tensor]]:
        return output.predictions()

    def keypoint_flip(self, options: DetectorOptionsT) -> Mapping[int, Sequence[int]] | None:
        """Card class index -> keypoint flip permutation, for mirroring predicted keypoints back
        (``pipeline.nn.tta.hflip_keypoints``); None: the task predicts no keypoints."""
        return None

    def merge_views(self, per_view: list[list[dict[str, torch.Tensor]]], flipped: list[bool], *,
                    batch: Batch, options: DetectorOptionsT) -> list[dict[str, torch.Tensor]]:
        """The views' detections mirrored back (boxes, masks; keypoints renumbered left/right by
        ``keypoint_flip``), concatenated, class-wise NMS at the detector's ``nms_thresh``, the
        best ``detections_per_image`` kept (``pipeline.nn.tta.merge_detections``)."""
        return merge_detections(per_view, flipped, width=original_size(batch)[1],
                                nms_threshold=options.nms_thresh,
                                max_detections=options.detections_per_image,
                                flip_permutations=self.keypoint_flip(options))

    def visualize(self, image: np.ndarray, prediction: dict[str, torch.Tensor], *,
                  card: DatasetCard, options: DetectorOptionsT) -> np.ndarray:
        return draw_detections(image, prediction, card)

    def save_prediction(self, prediction: dict[str, torch.Tensor], path_stem: str, *,
                        card: DatasetCard, options: DetectorOptionsT) -> list[str]:
        return save_detections_json(prediction, Path(f"{path_stem}_{self.name}.json"), card)

    def write_dataset_predictions(self, items: Iterable[PredictedImage], out_dir: str, *,
                                  card: DatasetCard) -> list[str]:
        """``<name>_coco_results.json``: every image's detections of ``coco_classes`` as one COCO
        results list (``image_id`` from the items), for ``densepipe coco-eval --pred`` with the
        types of ``coco_iou_types``; the name and content ``evaluate`` writes."""
        classes = self.coco_classes(card)
        results: list[dict[str, Any]] = []
        for item in items:
            results += coco_results(item.prediction, image_id=item.image_id, card=card,
                                    class_indices=classes, iou_types=self.coco_iou_types)
        return [str(write_results_json(Path(out_dir) / f"{self.name}_coco_results.json", results))]
