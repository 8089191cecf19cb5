"""A task evaluator that scores instance predictions with pycocotools (bbox, segm, keypoints).

Ground truth is collected from the evaluated batches (``instances`` of each sample), so it works
for any dataset source; predictions and ground truth are both mapped back to each image's
original size (``meta["orig_size"]``): boxes and keypoints are scaled, masks resized (nearest).
For a dataset evaluated at its own size (the synthetic world) this is exact; for a resized real
dataset, ``save`` writes the results in original coordinates so that ``densepipe coco-eval``
can score them against the dataset's own JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError
from pipeline.io import atomic_write_json
from pipeline.metrics.merge import check_mergeable, check_same_options
from plugins.rcnn.coco import CocoEvalResult, evaluate_coco, write_results_json
from plugins.rcnn.results import detections_to_results, masks_to_rle


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x h x w masks -> N x H x W bool (nearest neighbour; unchanged when already that size)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.bool)
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.bool()
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5


class CocoEvaluator:
    """Collects ground truth and predictions per image; ``compute`` runs COCOeval per type.

    ``iou_types``: any of ``bbox``, ``segm``, ``keypoints``. ``class_indices``: the card classes
    evaluated (default: all things; for keypoints, the classes with keypoints). Predictions are
    dicts with ``boxes`` Nx4 (input pixels), ``scores`` N, ``labels`` N (class indices) and
    ``masks`` N x H x W bool and/or ``keypoints`` N x K x 3 (x, y, score) as the types need.
    Metric names: ``<type>_<stat>`` for bbox/segm (``bbox_AP``, ``segm_APs``...), ``<stat>`` for
    keypoints (``AP``, ``AP50``...); statistics pycocotools leaves undefined (-1) are left out."""

    def __init__(self, card: DatasetCard, *, iou_types: tuple[str, ...],
                 class_indices: list[int] | None = None) -> None:
        self.card = card
        self.iou_types = iou_types
        if class_indices is None:
            class_indices = ([card.index_of_category(k.category_id) for k in card.keypoints]
                             if iou_types == ("keypoints",) else card.thing_indices)
        self.class_indices = list(class_indices)
        self._wanted = torch.tensor(self.class_indices, dtype=torch.int64)
        self.reset()

    def reset(self) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self._seen: set[int] = set()
        self._last_results: dict[str, CocoEvalResult] = {}

    # -- ground truth -----------------------------------------------------------------------------
    def categories(self) -> list[dict[str, Any]]:
        cats = []
        for i in self.class_indices:
            c = self.card.classes[i]
            cat: dict[str, Any] = {"id": c.id, "name": c.name, "supercategory": ""}
            spec = self.card.keypoints_for(c.id)
            if spec is not None:
                cat["keypoints"] = list(spec.names)
                cat["skeleton"] = [list(p) for p in spec.skeleton]
                cat["oks_sigmas"] = list(spec.oks_sigmas)
            cats.append(cat)
        return cats

    def _add_ground_truth(self, image_id: int, inst: dict[str, torch.Tensor], scale: tuple[float, float],
                          orig: tuple[int, int]) -> None:
        sx, sy = scale
        labels = inst["labels"].tolist()
        keep = [j for j, c in enumerate(labels) if c in self.class_indices]
        if not keep:
            return
        masks = _resize_masks(inst["masks"][keep], orig) if "masks" in inst else None
        rles = masks_to_rle(masks) if masks is not None else None
        boxes = inst["boxes"][keep].double()
        kps = inst.get("keypoints")
        for n, j in enumerate(keep):
            x1, y1, x2, y2 = boxes[n].tolist()
            box = [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy]
            ann: dict[str, Any] = {
                "id": len(self.annotations) + 1,  # ids from 1: 0 means "no match" in COCOeval
                "image_id": image_id,
                "category_id": self.card.classes[labels[j]].id,
                "bbox": box,
                "iscrowd": int(bool(inst["iscrowd"][j])),
                "area": float(masks[n].sum()) if masks is not None else box[2] * box[3],
            }
            if rles is not None:
                ann["segmentation"] = rles[n]
            if kps is not None and "keypoints" in self.iou_types:
                k = kps[j].double().clone()
                k[:, 0] *= sx
                k[:, 1] *= sy
                k[k[:, 2] <= 0] = 0.0
                ann["keypoints"] = [float(v) for v in k.flatten().tolist()]
                ann["num_keypoints"] = int((k[:, 2] > 0).sum())
            self.annotations.append(ann)

    # -- evaluator protocol ---------------------------------------------------------------------
    def process(self, batch: dict[str, Any], predictions: list[dict[str, torch.Tensor]]) -> None:
        has = batch.get("has", {}).get("instances")
        instances = batch.get("instances")
        height, width = (int(s) for s in batch["image"].shape[-2:])
        for i, pred in enumerate(predictions):
            if has is None or not bool(has[i]) or instances is None or instances[i] is None:
                continue
            image_id = int(batch["image_ids"][i])
            if image_id in self._seen:
                continue
            self._seen.add(image_id)
            orig = tuple(int(v) for v in batch["meta"][i].get("orig_size", (height, width)))
            scale = (orig[1] / width, orig[0] / height)
            self.images.append({"id": image_id, "height": orig[0], "width": orig[1],
                                "file_name": batch["file_names"][i] or ""})
            self._add_ground_truth(image_id, instances[i], scale, orig)  # type: ignore[arg-type]
            self._add_predictions(image_id, pred, scale, orig)  # type: ignore[arg-type]

    def _add_predictions(self, image_id: int, pred: dict[str, torch.Tensor], scale: tuple[float, float],
                         orig: tuple[int, int]) -> None:
        sx, sy = scale
        labels = pred["labels"].to(torch.int64)
        keep = torch.isin(labels, self._wanted).nonzero().flatten()
        if len(keep) == 0:
            return
        boxes = pred["boxes"][keep].double() * torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
        cat_ids = [self.card.classes[c].id for c in labels[keep].tolist()]
        masks = _resize_masks(pred["masks"][keep], orig) if "segm" in self.iou_types else None
        keypoints = None
        if "keypoints" in self.iou_types:
            keypoints = pred["keypoints"][keep].double().clone()
            keypoints[..., 0] *= sx
            keypoints[..., 1] *= sy
        self.results += detections_to_results(image_id, boxes=boxes, scores=pred["scores"][keep],
                                              category_ids=cat_ids, masks=masks, keypoints=keypoints)

    def merge(self, other: CocoEvaluator) -> None:
        """Append ``other``'s images, ground truth and results (another shard, same ``iou_types``
        and classes). Images this evaluator has already seen are skipped, as ``process`` skips a
        repeated image id (e.g. DDP padding); ``other``'s annotations get fresh ids continuing
        ``1..N`` so they stay unique. ``compute()`` then equals one pass over both shards exactly
        (COCOeval orders images by id)."""
        check_mergeable(self, other)
        check_same_options(self, other, ("iou_types", "class_indices"))
        new = {img["id"] for img in other.images if img["id"] not in self._seen}
        self.images += [img for img in other.images if img["id"] in new]
        for ann in other.annotations:
            if ann["image_id"] in new:
                self.annotations.append({**ann, "id": len(self.annotations) + 1})
        self.results += [r for r in other.results if r["image_id"] in new]
        self._seen |= new

    def ground_truth(self) -> dict[str, Any]:
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories()}

    def compute(self) -> dict[str, float]:
        self._last_results = {}
        if not self.images:
            return {}
        metrics: dict[str, float] = {}
        gt = self.ground_truth()
        for iou_type in self.iou_types:
            sigmas = None
            if iou_type == "keypoints":
                sigmas = self._sigmas()
            result = evaluate_coco(gt, self.results, iou_type,  # type: ignore[arg-type]
                                   kpt_oks_sigmas=sigmas, source="model predictions")
            self._last_results[iou_type] = result
            metrics.update(result.named("" if iou_type == "keypoints" else f"{iou_type}_"))
        return metrics

    def precision_recall(self) -> dict[str, dict[str, np.ndarray]]:
        """Per evaluated type, the precision table of the last ``compute()`` for PR curves:
        ``{iou_type: {"precision": T x R x K x A x M, "recall_thresholds": R, "iou_thresholds": T}}``
        (see ``CocoEvalResult``); ``{}`` before ``compute()`` or without images."""
        return {iou_type: {"precision": r.precision, "recall_thresholds": r.recall_thresholds,
                           "iou_thresholds": r.iou_thresholds}
                for iou_type, r in self._last_results.items()}

    def _sigmas(self) -> np.ndarray:
        specs = [self.card.keypoints_for(self.card.classes[i].id) for i in self.class_indices]
        sigmas = {tuple(s.oks_sigmas) for s in specs if s is not None}
        if len(sigmas) != 1:
            raise ConfigError(f"keypoint evaluation of {self.card.name}: the evaluated categories "
                              f"need one set of OKS sigmas, found {len(sigmas)}")
        return np.asarray(sigmas.pop(), dtype=np.float64)

    def save(self, out_dir: str | Path, name: str) -> list[Path]:
        """Write ``<name>_coco_gt.json`` and ``<name>_coco_results.json`` (original coordinates;
        score them with ``densepipe coco-eval``); returns the paths."""
        out = Path(out_dir)
        gt_path, res_path = out / f"{name}_coco_gt.json", out / f"{name}_coco_results.json"
        atomic_write_json(gt_path, self.ground_truth())
        write_results_json(res_path, self.results)
        return [gt_path, res_path]


def save_detections_json(prediction: dict[str, torch.Tensor], path: Path, card: DatasetCard) -> list[str]:
    """One image's detections (``boxes``, ``scores``, card class ``labels``, optional ``masks`` /
    ``keypoints``) as COCO results (image id 0, the card's category ids), written atomically."""
    results = detections_to_results(
        0, boxes=prediction["boxes"], scores=prediction["scores"],
        category_ids=[card.classes[c].id for c in prediction["labels"].tolist()],
        masks=prediction.get("masks"), keypoints=prediction.get("keypoints"))
    atomic_write_json(path, results)
    return [str(path)]
