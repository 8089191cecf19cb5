"""MultiTaskModel: one shared backbone pass (every input view stacked in one batch), then every
enabled task head."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from pipeline.config import Config, check_tasks
from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError, PluginError
from pipeline.nn.backbones import build_backbone
from pipeline.nn.inference_size import InferenceResize, original_size, output_size
from pipeline.nn.tta import TestViews, predict_views
from pipeline.registry import TaskRegistry, default_registry
from pipeline.task import Batch, Task

# ImageNet statistics on the 0..255 scale (torchvision's normalisation).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma


def image_views(images: torch.Tensor, views: set[str], mean: torch.Tensor, std: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """Normalised input tensors per view from uint8 (or 0..255 float) Bx3xHxW images.

    ``rgb``: the colour image; ``gray``: its luma replicated to three channels (so one backbone
    serves both views)."""
    x = images.float()
    out: dict[str, torch.Tensor] = {}
    if "rgb" in views:
        out["rgb"] = (x - mean) / std
    if "gray" in views:
        w = x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
        luma = (x * w).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        out["gray"] = (luma - mean) / std
    return out


class MultiTaskModel(nn.Module):
    """Shared backbone + one head per task.

    ``forward(batch)`` takes a collated batch (``image`` uint8 Bx3xHxW, labels as in
    ``pipeline.data.sample``) and returns ``{task name: raw head output}``; tasks without a head
    (pure combinations) are absent. ``losses`` and ``predict`` turn those outputs into loss
    terms and per-image predictions through the tasks' own methods."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        tasks: list[Task],
        heads: dict[str, nn.Module],
        options: dict[str, BaseModel],
        card: DatasetCard,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = {t.name: t for t in tasks}  # dependency order
        self.heads = nn.ModuleDict(heads)
        self.options = options
        self.card = card
        self.loss_weights = {t.name: float((loss_weights or {}).get(t.name, 1.0)) for t in tasks}
        self.views = sorted({t.input_view for t in tasks if t.name in heads})
        self.channels_last = False
        self.inference_resize: InferenceResize | None = None
        """The test-size rule ``predict`` applies (``pipeline.nn.inference_size``); None: images are
        predicted as given. ``build_model`` sets it from ``data.test_size``."""
        self.test_views = TestViews()
        """The views ``predict`` combines (``pipeline.nn.tta``); the default, the plain view alone,
        is the single prediction. ``build_model`` sets it from ``evaluate.scales`` and
        ``evaluate.flip``."""
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, batch: Batch) -> dict[str, Any]:
        images = batch["image"].to(self.pixel_mean.device, non_blocking=True)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        views = image_views(images, set(self.views), self.pixel_mean, self.pixel_std)
        if self.channels_last:
            views = {k: v.contiguous(memory_format=torch.channels_last) for k, v in views.items()}
        features = self._backbone_per_view(views)
        outputs: dict[str, Any] = {}
        for name, head in self.heads.items():
            task = self.tasks[name]
            extra = {}
            if task.shares_with:
                extra["upstream"] = {s: outputs[s] for s in task.shares_with if s in outputs}
            outputs[name] = head(features[task.input_view], image_size=size, batch=batch, **extra)
        return outputs

    def _backbone_per_view(self, views: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Backbone features per view. Several views go through the backbone as one stacked
        batch (one call), so batch-norm layers normalise every view with the same statistics
        in training as their running averages do in evaluation (two separate calls would train
        each view on its own statistics and evaluate both on their mixture)."""
        if len(views) == 1:
            ((view, x),) = views.items()
            return {view: self.backbone(x)}
        names = list(views)
        stacked = self.backbone(torch.cat([views[v] for v in names]))
        n = next(iter(views.values())).shape[0]
        return {v: {k: f[i * n:(i + 1) * n] for k, f in stacked.items()} for i, v in enumerate(names)}

    def losses(self, outputs: dict[str, Any], batch: Batch) -> dict[str, torch.Tensor]:
        """``{"<task>/<term>": unweighted scalar}`` for every task with a head."""
        terms: dict[str, torch.Tensor] = {}
        for name, output in outputs.items():
            task = self.tasks[name]
            for term, value in task.losses(output, batch, options=self.options[name]).items():
                terms[f"{name}/{term}"] = value
        return terms

    def task_losses(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{task: sum of its unweighted terms}`` (what multi-task weighting balances)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in terms.items():
            task = key.split("/", 1)[0]
            out[task] = out[task] + value if task in out else value
        return out

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last layer every task shares: the FPN's output convolutions (GradNorm's W)."""
        fpn = getattr(self.backbone, "fpn", None)
        blocks = getattr(fpn, "layer_blocks", None)
        if blocks is not None:
            return [p for p in blocks.parameters() if p.requires_grad]
        return [p for p in self.backbone.parameters() if p.requires_grad][-2:]

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the loss terms, each scaled by its task's weight (``model.loss_weights``)."""
        total = sum(self.loss_weights[k.split("/", 1)[0]] * v for k, v in terms.items())
        return total if isinstance(total, torch.Tensor) else torch.zeros((), device=self.pixel_mean.device)

    @torch.no_grad()
    def predict(self, batch: Batch, outputs: dict[str, Any] | None = None) -> dict[str, list[Any]]:
        """Per-task, per-image predictions at the original image resolution (dependency order).

        Without ``outputs``, the batch is first prepared by the test-size rule
        (``inference_resize.prepare``: resized, padded; ``pipeline.nn.inference_size``) and run through the
        model; each task's ``postprocess`` pastes its predictions back at ``output_size``. When
        ``test_views`` holds more than the plain view, the model runs once per view and each task's
        predictions are combined over them (``pipeline.nn.tta.predict_views``). With ``outputs``
        (computed by the caller on ``batch`` as it is), predictions are single-view at the input
        resolution. A task whose map-shaped prediction has another size is one ``PluginError``."""
        if outputs is None and not self.test_views.is_plain:
            predictions = predict_views(self, batch, self.test_views)
            for name, preds in predictions.items():
                _check_prediction_size(name, preds, original_size(batch))
            return predictions
        if outputs is None:
            if self.inference_resize is not None:
                batch = self.inference_resize.prepare(batch)
            outputs = self(batch)
        out = output_size(batch) or (int(batch["image"].shape[-2]), int(batch["image"].shape[-1]))
        predictions: dict[str, list[Any]] = {}
        for name, task in self.tasks.items():
            deps = {d: predictions[d] for d in task.depends_on}
            predictions[name] = task.postprocess(outputs.get(name), batch=batch, predictions=deps,
                                                 options=self.options[name])
            _check_prediction_size(name, predictions[name], out)
        return predictions

    def use_channels_last(self, enabled: bool = True) -> MultiTaskModel:
        """Store weights and feed inputs in NHWC layout (``train.channels_last``)."""
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)


def _check_prediction_size(task: str, predictions: list[Any], size: tuple[int, int]) -> None:
    """A prediction that is a map (a tensor of 2+ dims) must be ``size``: a plugin that ignores
    ``output_size`` fails here, not inside a metric. Structured predictions (dicts) are the
    plugin's own format, which the core does not read."""
    for m in predictions[:1]:
        if isinstance(m, torch.Tensor) and m.dim() >= 2 and tuple(m.shape[-2:]) != size:
            raise PluginError(
                f"task {task}: postprocess returned a {m.shape[-2]}x{m.shape[-1]} map, expected "
                f"the original image size {size[0]}x{size[1]} (batch['output_size']; paste it "
                "back with pipeline.nn.inference_size.paste_maps, see Task.postprocess)")


def inference_resize_rule(cfg: Config, stride: int) -> InferenceResize:
    """The test-size rule of ``cfg`` (``data.test_size``, ``data.test_max_size``) for a backbone
    whose deepest level has ``stride``."""
    d = cfg.data
    short = d.image_size if d.test_size is None else d.test_size
    return InferenceResize(short=short, max_size=d.test_max_size, divisor=stride)


DETECTION_LABELS = "instances"
"""Tasks needing these labels train R-CNN heads: ``model.freeze_bn: auto`` freezes BatchNorm for them."""


def wants_frozen_bn(cfg: Config, tasks: list[Task]) -> bool:
    """``model.freeze_bn`` resolved: ``auto`` is true when ``model.pretrained`` is set, the body
    uses BatchNorm and an enabled task (dependencies included) needs ``instances`` labels."""
    m = cfg.model
    if m.freeze_bn == "auto":
        return (m.pretrained is not None and m.backbone_norm == "bn"
                and any(DETECTION_LABELS in t.requires for t in tasks))
    if m.freeze_bn and m.backbone_norm == "gn":
        raise ConfigError("model.freeze_bn=true needs model.backbone_norm bn or frozen_bn, got gn")
    return bool(m.freeze_bn)


def build_model(cfg: Config, card: DatasetCard, registry: TaskRegistry | None = None, *,
                load_weights: bool = True) -> MultiTaskModel:
    """Backbone from ``model.backbone`` (+ local ``model.weights`` or ``model.pretrained``), heads
    of ``model.tasks`` and their dependencies, from the registry.

    ``load_weights=False`` builds the same modules (frozen BatchNorm and frozen levels included)
    without reading ``weights`` / ``pretrained``: for loading a checkpoint over them."""
    registry = registry or default_registry()
    check_tasks(cfg, registry.names)
    tasks = registry.resolve(cfg.model.tasks)
    m = cfg.model
    backbone = build_backbone(m.backbone, weights=m.weights if load_weights else None,
                              fpn_channels=m.fpn_channels, norm=m.backbone_norm,
                              output_stride=m.output_stride,
                              pretrained=m.pretrained if load_weights else None, download=m.download,
                              freeze_bn=wants_frozen_bn(cfg, tasks), freeze_at=m.freeze_at)
    heads: dict[str, nn.Module] = {}
    options: dict[str, BaseModel] = {}
    for task in tasks:
        opts = task.resolve_options(task.parse_options(cfg.model.heads.get(task.name)), card=card)
        options[task.name] = opts
        extra = {}
        if task.shares_with:
            extra["shared_with"] = tuple(s for s in task.shares_with if s in heads)
        head = task.build_head(feature_spec=backbone.feature_spec, card=card, options=opts, **extra)
        if head is not None:
            heads[task.name] = head
    model = MultiTaskModel(backbone=backbone, tasks=tasks, heads=heads, options=options, card=card,
                           loss_weights=cfg.model.loss_weights)
    # pad to the deepest backbone stride, 32 (detectron2's size_divisibility for FPNs; an extra
    # pooled level such as p6 needs no more: it is a stride-2 pooling of p5)
    stride = min(32, max(f.stride for f in backbone.feature_spec.values()))
    model.inference_resize = inference_resize_rule(cfg, stride)
    model.test_views = configured_views(cfg)
    return model


def configured_views(cfg: Config) -> TestViews:
    """The views of ``cfg`` (``evaluate.scales`` x ``evaluate.flip``) that ``predict`` combines."""
    return TestViews(scales=tuple(cfg.evaluate.scales), flip=cfg.evaluate.flip)
