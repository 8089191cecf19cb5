"""Built-in task ``semantic``: semantic segmentation with a decoder chosen by name.

Head: the decoder ``decoder`` of ``pipeline.nn.decoders`` (default ``panoptic_fpn``: the Panoptic
FPN semantic branch, ``pipeline.nn.fpn_heads.SemanticFPNHead`` over p2..p5) -> per-pixel class
logits at the input resolution. ``decoder_options`` go to the decoder; ``conv_dims`` and
``in_features`` are ``panoptic_fpn``'s, ``norm`` goes to every decoder that has a norm.
Loss: cross-entropy, ignore index 255. Metrics: the FCN paper's pixel accuracy, mean
accuracy, mean IoU and frequency-weighted IoU, plus per-class IoU, from a dataset-level confusion
matrix (``plugins.semantic.confusion``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.data.card import DatasetCard
from pipeline.errors import ConfigError
from pipeline.hookspecs import hookimpl
from pipeline.io import atomic_write_png
from pipeline.metrics.merge import check_mergeable
from pipeline.nn.dense_head import DecoderOptions, build_dense_head
from pipeline.nn.dense_losses import build_dense_loss
from pipeline.nn.inference_size import paste_maps
from pipeline.task import Batch, DenseTask, ExportOutput, FeatureSpec, PredictedImage, Task
from pipeline.viz import colorize_labels, overlay, with_legend
from plugins.semantic.confusion import ConfusionMatrix
from plugins.semantic.crf import CRFOptions, dense_crf_batch


class SemanticOptions(DecoderOptions):
    """The decoder options (``DecoderOptions``) plus the loss."""

    output_init: Literal["small", "xavier"] = "xavier"
    """As ``DecoderOptions.output_init``; ``xavier`` for class logits: from random initialisation
    the N(0, 0.001) predictor learned slower per image (the ``ablation`` part of
    benchmarks/results/peers.json, row ``output_init=small``)."""

    loss: str = "cross_entropy"
    """Dense loss (``pipeline.nn.dense_losses``): ``cross_entropy``, ``soft_dice``, ``focal`` or
    ``combined`` (a weighted sum, e.g. ``loss_options: {weights: {cross_entropy: 1, soft_dice: 1}}``)."""
    loss_options: dict[str, Any] = Field(default_factory=dict)
    """The loss's own options (``gamma`` for focal, ``weights``/``options`` for combined, ...)."""
    crf: CRFOptions | None = None
    """Dense CRF (DeepLab v1/v2; ``plugins.semantic.crf``, Krahenbuhl and Koltun's mean field with
    Gaussian appearance and smoothness kernels) on the logits at the original image size, before
    the argmax, guided by the original image; ``null``: off (measured on the synthetic world and
    real photos in benchmarks/results/crf.json: no reliable gain for its cost). Not part of an
    ONNX export, which returns the raw logits."""
    class_weights: list[float] | Literal["median_frequency"] | None = None
    """Cross-entropy weight per class: a list (one per class), or ``median_frequency``
    (Eigen and Fergus: median class frequency / class frequency, from the dataset card's
    ``class_pixel_fraction`` of the train split, which the synthetic world records)."""


def median_frequency_weights(card: DatasetCard, split: str = "train") -> list[float]:
    """Median-frequency balancing: weight_c = median(f) / f_c over classes present (f > 0);
    absent classes get weight 0. Frequencies from ``card.extra["class_pixel_fraction"][split]``."""
    fractions = card.extra.get("class_pixel_fraction", {}).get(split)
    if not fractions or len(fractions) != card.num_classes:
        raise ConfigError(
            f"model.heads.semantic.class_weights=median_frequency: the dataset card of {card.name} "
            f"has no class_pixel_fraction for split {split!r}; give one weight per class instead")
    present = sorted(f for f in fractions if f > 0)
    median = present[len(present) // 2] if len(present) % 2 else \
        0.5 * (present[len(present) // 2 - 1] + present[len(present) // 2])
    return [round(median / f, 4) if f > 0 else 0.0 for f in fractions]


def build_semantic_decoder(feature_spec: FeatureSpec, num_classes: int,
                           options: SemanticOptions) -> nn.Module:
    """The semantic head: logits B x num_classes x H x W at the input size (see
    ``pipeline.nn.dense_head``; unknown decoders, options or an incompatible backbone are
    one-line ``ConfigError``s at model build)."""
    return build_dense_head("semantic", options, feature_spec=feature_spec, num_outputs=num_classes)


class SemanticEvaluator:
    def __init__(self, card: DatasetCard) -> None:
        self.card = card
        self.matrix = ConfusionMatrix(card.num_classes, ignore_index=card.ignore_index)

    def reset(self) -> None:
        self.matrix.reset()

    def process(self, batch: Batch, predictions: list[torch.Tensor]) -> None:
        if "semantic" not in batch:
            return
        has = batch["has"]["semantic"]
        for i, pred in enumerate(predictions):
            if bool(has[i]):
                self.matrix.update(pred.cpu(), batch["semantic"][i].cpu())

    def merge(self, other: SemanticEvaluator) -> None:
        """Add ``other``'s confusion matrix (another shard) into this one; exact."""
        check_mergeable(self, other)
        self.matrix.merge(other.matrix)

    def compute(self) -> dict[str, float]:
        return self.matrix.compute(class_names=self.card.class_names)


class SemanticTask(DenseTask[SemanticOptions]):
    name = "semantic"
    main_metric = "mIoU"
    metrics = ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "IoU/*")  # IoU/<class name>
    requires = ("semantic",)
    input_view = "rgb"
    Options = SemanticOptions

    def resolve_options(self, options: SemanticOptions, *,
                        card: DatasetCard) -> SemanticOptions:
        weights = options.class_weights
        if weights == "median_frequency":
            weights = median_frequency_weights(card)
        if weights is not None and len(weights) != card.num_classes:
            raise ConfigError(f"model.heads.semantic.class_weights: expected {card.num_classes} "
                              f"values (one per class of {card.name}), got {len(weights)}")
        if options.loss != "cross_entropy" and weights is not None:
            raise ConfigError("model.heads.semantic.class_weights apply to loss cross_entropy; with "
                              f"loss {options.loss} give them in loss_options (e.g. combined's "
                              "options.cross_entropy.class_weights, focal's alpha)")
        try:
            build_dense_loss(options.loss, **options.loss_options)
        except ConfigError as e:
            raise ConfigError(f"model.heads.semantic.loss={options.loss}: {e}") from None
        return options.model_copy(update={"class_weights": weights})

    def build_head(self, *, feature_spec: FeatureSpec, card: DatasetCard,
                   options: SemanticOptions) -> nn.Module:
        return build_semantic_decoder(feature_spec, card.num_classes, options)

    def losses(self, output: torch.Tensor, batch: Batch, *,
               options: SemanticOptions) -> dict[str, torch.Tensor]:
        """``{"ce": ...}`` (the default cross-entropy) or ``{<loss name>: ...}``."""
        plain = options.loss == "cross_entropy" and not options.loss_options
        term = "ce" if plain else options.loss
        target = batch.get("semantic")
        if target is None:
            return {term: output.sum() * 0.0}
        target = target.to(output.device)
        if not bool((target != 255).any()):
            return {term: output.sum() * 0.0}
        if not plain:
            return {term: build_dense_loss(options.loss, **options.loss_options)(output, target)}
        weight = None
        if options.class_weights is not None:
            weight = torch.tensor(options.class_weights, dtype=output.dtype, device=output.device)
        return {term: F.cross_entropy(output, target, ignore_index=255, weight=weight)}

    def aligned(self, output: torch.Tensor, *, batch: Batch, options: SemanticOptions) -> torch.Tensor:
        """``N x C x H x W`` class logits pasted back (bilinearly) at the original image size, as
        MMSegmentation does before the argmax; views average these logits (HRNet's way)."""
        return paste_maps(output, batch)

    def decide(self, aligned: torch.Tensor, *, batch: Batch, predictions: dict[str, list[Any]],
               options: SemanticOptions) -> list[torch.Tensor]:
        """Per image: ``HxW`` int64 class indices, the argmax of ``aligned`` (``N x C x H x W``
        logits, or their mean over views; ``softmax`` over dim 1 gives class probabilities),
        after the dense CRF when ``options.crf`` is set."""
        if options.crf is not None:
            image = batch.get("original_image", batch["image"])  # N x 3 x H x W at that size
            aligned = dense_crf_batch(aligned, image, options.crf)  # probabilities
        return list(aligned.argmax(dim=1).to(torch.int64).cpu())

    export_outputs = (ExportOutput(
        "semantic_logits", "logits", "N x C x H x W class scores at the input resolution; argmax "
        "over axis 1 is the index into classes (densepipe predict's label map)", per_class=True),)

    def export_forward(self, head: nn.Module, features: dict[str, torch.Tensor], *,
                       image: torch.Tensor, options: SemanticOptions) -> dict[str, torch.Tensor]:
        return {"semantic_logits": head(features, image_size=image.shape[-2:])}

    def evaluator(self, *, card: DatasetCard, options: SemanticOptions) -> SemanticEvaluator:
        return SemanticEvaluator(card)

    def visualize(self, image: np.ndarray, prediction: torch.Tensor, *,
                  card: DatasetCard, options: SemanticOptions) -> np.ndarray:
        labels = np.asarray(prediction)
        colors = colorize_labels(labels, card.palette(), ignore=card.ignore_index)
        present = [i for i in np.unique(labels).tolist() if i < card.num_classes]
        return with_legend(overlay(image, colors, 0.6), [card.class_names[i] for i in present],
                           [card.palette()[i] for i in present])

    def save_prediction(self, prediction: torch.Tensor, path_stem: str, *,
                        card: DatasetCard, options: SemanticOptions) -> list[str]:
        path = atomic_write_png(f"{path_stem}_semantic.png", np.asarray(prediction, dtype=np.uint8))
        return [str(path)]

    def write_dataset_predictions(self, items: Iterable[PredictedImage], out_dir: str, *,
                                  card: DatasetCard) -> list[str]:
        """``semantic_pred/<name stem>.png``: label PNGs (class index, uint8; uint16 beyond 255
        classes) named like the dataset's ground-truth PNGs, for ``densepipe semseg-eval
        --pred-dir <out_dir>/semantic_pred``."""
        dtype = np.uint8 if card.num_classes <= 255 else np.uint16
        written = []
        for item in items:
            path = Path(out_dir) / "semantic_pred" / PurePosixPath(item.name).with_suffix(".png")
            written.append(str(atomic_write_png(path, np.asarray(item.prediction).astype(dtype))))
        return written


@hookimpl
def densepipe_register_tasks() -> list[Task]:
    return [SemanticTask()]
