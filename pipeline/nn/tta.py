"""Multi-scale and flip inference (the image pyramid): ``evaluate.scales`` x ``evaluate.flip``.

``MultiTaskModel.predict`` calls ``predict_views`` when ``TestViews`` holds more than the plain
view (scale 1.0, not flipped). Each view is the batch prepared by the test-size rule
(``pipeline.nn.inference_size``) at ``short * scale`` (the longer-side cap scaled too), from the
image mirrored left-right first when the view is flipped (so the padding stays at the bottom and
right); the model runs once per view. How a task's views are combined follows from the methods it
implements (``Task.view_combination``, contract in ``pipeline.task``):

- ``average`` (dense maps: ``aligned`` + ``decide``, optionally ``unflip``): each view's
  ``aligned`` map (``N x C x H x W`` at the original size) is mirrored back by ``unflip`` for a
  flipped view and added to a running sum (one map per task is held, not one per view); the mean
  goes to ``decide``, as DeepLab and PSPNet average their multi-scale, flipped outputs;
- ``merge`` (detections: ``merge_views``): each view's ``postprocess`` predictions (already at the
  original size, still mirrored for a flipped view) are kept (at most ``detections_per_image``
  a view) and handed over together, e.g. to ``merge_detections`` (un-flip, concatenate,
  class-wise NMS, top k);
- ``single`` (neither, or the task has ``depends_on``): ``postprocess`` once, on the plain view's
  output (run in addition when 1.0 is not among the scales and such a task has a head), with the
  combined predictions of its dependencies (panoptic fuses the merged semantic and instance
  predictions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torchvision.ops import batched_nms

from pipeline.errors import PluginError
from pipeline.nn.inference_size import InferenceResize, original_size

Batch = dict[str, Any]
PLAIN_VIEW = (1.0, False)
"""(scale, flipped) of the view every single-view prediction uses."""


@dataclass(frozen=True)
class TestViews:
    """The views ``predict`` combines: every scale (a factor on the test size, > 0), each also
    mirrored when ``flip``. The default is the plain view alone (today's single prediction)."""

    __test__ = False  # not a pytest test class despite its name

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if not self.scales or any(not s > 0 for s in self.scales):
            raise ValueError(f"evaluate.scales: expected one or more factors > 0, got {list(self.scales)}")

    @property
    def views(self) -> list[tuple[float, bool]]:
        """``(scale, flipped)`` per view, scales in the given order, unflipped first."""
        flips = (False, True) if self.flip else (False,)
        return [(float(s), f) for s in self.scales for f in flips]

    @property
    def is_plain(self) -> bool:
        """Only the plain view: ``predict`` takes the single-view path."""
        return self.views == [PLAIN_VIEW]


class _ViewModel(Protocol):
    """What ``predict_views`` needs of a ``MultiTaskModel`` (``pipeline.model``)."""

    tasks: dict[str, Any]
    options: dict[str, Any]
    heads: Any
    inference_resize: InferenceResize | None

    def __call__(self, batch: Batch) -> dict[str, Any]: ...


def scaled_rule(rule: InferenceResize | None, scale: float, size: tuple[int, int]) -> InferenceResize:
    """The test-size rule of a view at ``scale`` for images of ``size`` (H, W): the shorter side
    ``short * scale`` (the image's own shorter side when ``short`` is 0), the cap
    ``max_size * scale``; ``rule`` None (images predicted as given): no padding."""
    base = rule if rule is not None else InferenceResize(short=0, max_size=None, divisor=1)
    if scale == 1.0:
        return base
    short = base.short if base.short > 0 else min(size)
    cap = None if base.max_size is None else max(1, int(base.max_size * scale + 0.5))
    return InferenceResize(short=max(1, int(short * scale + 0.5)), max_size=cap, divisor=base.divisor)


def view_batch(batch: Batch, rule: InferenceResize | None, scale: float, flipped: bool) -> Batch:
    """``batch`` as the network sees the view: mirrored left-right first when ``flipped``, then
    resized and padded by ``scaled_rule`` (``valid_size``, ``output_size``, ``original_image`` as
    ``InferenceResize.prepare`` sets them; ``original_image`` is the mirrored image)."""
    images = batch["image"]
    source = {**batch, "image": images.flip(-1)} if flipped else batch
    size = (int(images.shape[-2]), int(images.shape[-1]))
    return scaled_rule(rule, scale, size).prepare(source)


def _check_aligned(task: str, aligned: Any, n: int, size: tuple[int, int]) -> torch.Tensor:
    if not isinstance(aligned, torch.Tensor) or aligned.dim() != 4 or aligned.shape[0] != n \
            or tuple(aligned.shape[-2:]) != size:
        got = tuple(aligned.shape) if isinstance(aligned, torch.Tensor) else type(aligned).__name__
        raise PluginError(f"task {task}: aligned returned {got}, expected N x C x {size[0]} x {size[1]} "
                          "with N the batch size (the original image size; see Task.aligned)")
    return aligned


@torch.no_grad()
def predict_views(model: _ViewModel, batch: Batch, views: TestViews) -> dict[str, list[Any]]:
    """Per-task, per-image predictions at the original resolution, combined over ``views`` (see
    the module doc), in the model's task (dependency) order."""
    rule = model.inference_resize
    plain = rule.prepare(batch) if rule is not None else batch
    n = int(batch["image"].shape[0])
    size = original_size(batch)
    modes = {name: task.view_combination() for name, task in model.tasks.items()}
    need_plain = [name for name, mode in modes.items() if mode == "single" and name in model.heads]
    todo = list(views.views)
    if need_plain and PLAIN_VIEW not in todo:
        todo.append(PLAIN_VIEW)  # only for the single-view tasks: not averaged or merged
    sums: dict[str, torch.Tensor] = {}
    per_view: dict[str, list[list[Any]]] = {name: [] for name, mode in modes.items() if mode == "merge"}
    flipped_views: list[bool] = []
    plain_outputs: dict[str, Any] = {}
    counted = 0
    for i, (scale, flipped) in enumerate(todo):
        vb = plain if (scale, flipped) == PLAIN_VIEW else view_batch(batch, rule, scale, flipped)
        outputs = model(vb)
        if (scale, flipped) == PLAIN_VIEW:
            plain_outputs = {name: outputs.get(name) for name in need_plain}
        if i >= len(views.views):
            break
        for name, mode in modes.items():
            task, opts = model.tasks[name], model.options[name]
            if mode == "average":
                aligned = task.aligned(outputs.get(name), batch=vb, options=opts)
                aligned = _check_aligned(name, aligned, n, size)
                if flipped:
                    aligned = task.unflip(aligned, options=opts)
                if name in sums:
                    sums[name].add_(aligned.float())
                else:
                    sums[name] = aligned.float().clone()
            elif mode == "merge":
                per_view[name].append(task.postprocess(outputs.get(name), batch=vb, predictions={},
                                                       options=opts))
        flipped_views.append(flipped)
        counted += 1
        del outputs
    predictions: dict[str, list[Any]] = {}
    for name, task in model.tasks.items():
        opts = model.options[name]
        deps = {d: predictions[d] for d in task.depends_on}
        if modes[name] == "average":
            predictions[name] = task.decide(sums.pop(name).div_(counted), batch=plain, predictions=deps,
                                            options=opts)
        elif modes[name] == "merge":
            predictions[name] = task.merge_views(per_view.pop(name), flipped_views, batch=plain, options=opts)
        else:
            predictions[name] = task.postprocess(plain_outputs.get(name), batch=plain, predictions=deps,
                                                 options=opts)
    return predictions


# -- detections: what the ``merge_views`` of detection tasks share ----------------------------------
def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """``N x 4`` x1y1x2y2 boxes (continuous pixel coordinates) of an image ``width`` wide,
    mirrored left-right: ``x -> width - x`` (``pipeline.data.transforms``' rule)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def hflip_keypoints(keypoints: torch.Tensor, labels: torch.Tensor, width: int,
                    flip_permutations: Mapping[int, Sequence[int]] | None = None) -> torch.Tensor:
    """``N x K x 3`` keypoints (x, y, score or visibility) of detections with card class
    ``labels``, mirrored left-right: ``x -> width - x``, and renumbered by each class's flip
    permutation (``KeypointSpec.flip_permutation``: ``perm[k]`` is the keypoint that ``k``
    becomes, so the left wrist becomes the right wrist); a class without one is only mirrored."""
    out = keypoints.clone()
    out[..., 0] = width - keypoints[..., 0]
    for c, perm in (flip_permutations or {}).items():
        rows = (labels == c).nonzero().flatten()
        if len(rows) and len(perm) == keypoints.shape[1]:
            index = torch.as_tensor(list(perm), dtype=torch.int64, device=keypoints.device)
            out[rows] = out[rows][:, index]
    return out


def hflip_detections(prediction: dict[str, torch.Tensor], width: int,
                     flip_permutations: Mapping[int, Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """One image's detections (``boxes``, optional ``masks`` N x H x W, ``keypoints`` N x K x 3;
    other keys as they are) mirrored left-right."""
    out = dict(prediction)
    out["boxes"] = hflip_boxes(prediction["boxes"], width)
    if "masks" in prediction:
        out["masks"] = prediction["masks"].flip(-1)
    if "keypoints" in prediction:
        out["keypoints"] = hflip_keypoints(prediction["keypoints"], prediction["labels"], width,
                                           flip_permutations)
    return out


def merge_detections(per_view: Sequence[Sequence[dict[str, torch.Tensor]]], flipped: Sequence[bool], *,
                     width: int, nms_threshold: float, max_detections: int | None,
                     flip_permutations: Mapping[int, Sequence[int]] | None = None
                     ) -> list[dict[str, torch.Tensor]]:
    """Detections of several views of the same images as one list per image.

    ``per_view[v][i]``: view ``v``'s prediction for image ``i``, a dict of per-detection tensors
    (first dimension N: ``boxes`` N x 4 x1y1x2y2, ``scores`` N, ``labels`` N class indices, any of
    ``masks`` N x H x W, ``keypoints`` N x K x 3, ...) at the original size (``width`` pixels
    wide), mirrored for the views whose ``flipped`` is true. Those are mirrored back
    (``hflip_detections``; keypoints renumbered by ``flip_permutations``, class index -> perm),
    all views' detections concatenated, class-wise NMS at ``nms_threshold`` (torchvision's
    ``batched_nms``) keeps the best of duplicates, and the ``max_detections`` best (None: all)
    are returned, best first, with every key of the input."""
    if len(per_view) != len(flipped):
        raise ValueError(f"{len(per_view)} views but {len(flipped)} flipped flags")
    merged = []
    for i in range(len(per_view[0])):
        dets = [hflip_detections(view[i], width, flip_permutations) if f else view[i]
                for view, f in zip(per_view, flipped, strict=True)]
        keys = list(dets[0])
        joined = {k: torch.cat([d[k] for d in dets]) for k in keys}
        num = len(joined["boxes"])
        bad = [k for k, v in joined.items() if len(v) != num]
        if bad:
            raise ValueError(f"detections: {', '.join(bad)} do not have one row per box ({num})")
        keep = batched_nms(joined["boxes"].float(), joined["scores"].float(), joined["labels"], nms_threshold)
        if max_detections is not None:
            keep = keep[:max_detections]
        merged.append({k: v[keep] for k, v in joined.items()})
    return merged
