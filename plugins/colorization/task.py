"""Built-in task ``colorization``: Zhang, Isola and Efros, "Colorful Image Colorization" (ECCV 2016).

The head sees the ``gray`` view (the image's luma, ``pipeline.model.image_views``) and predicts
the a*b* channels of CIE Lab; the lightness L is the input's own. It needs no label: the target is
the image itself, so every dataset teaches it.

- Head: the chosen dense decoder (``DecoderOptions``) at ``1 / output_stride`` of the input
  (Zhang: 1/4), with Q outputs (the sRGB ab gamut in ``grid``-wide bins, ``plugins.colorization.ab_bins``;
  Q = 261 for grid 10) for ``loss: classification`` or 2 (ab / 100) for ``loss: regression``, plus
  the class-rebalancing prior (bin counts gathered online from the training targets, saved with
  the model).
- Targets: Lab of the RGB image (exact, ``plugins.colorization.color``), ab **average-pooled** to the head's
  resolution (pooling in Lab, the space the loss lives in, rather than RGB's gamma-encoded values),
  soft-encoded on the 5 nearest bins (sigma 5), kept sparse (the loss gathers 5 logits a pixel).
- Loss ``ce``: Zhang eq. 2, ``-sum_q Z_q log Zhat_q`` per pixel times ``v`` = the rebalancing
  weight of the target's nearest bin (eq. 3-4; 1 with ``rebalance: false``), averaged over the
  pixels. Loss ``smooth_l1`` (``loss: regression``): smooth-L1 (Huber, beta 0.1 = 10 ab units) on
  ab / 100, summed over a, b, same weights: quadratic within the 10-unit accuracy threshold,
  linear beyond, so a pixel whose colour is ambiguous (several plausible hues) pulls less
  towards the desaturated mean than with L2 (the failure Zhang's Fig. 2 shows).
- Grayscale source images (R = G = B everywhere) have no colour target: excluded from the loss and
  the metrics, warned about (``warnings.warn`` naming the file, once per file and process, for the
  first ``MAX_GRAY_WARNINGS`` files) and counted (``skipped_gray``).
- Prediction per image: ``{"lab": 3 x H x W float32}``, L from the input, ab the annealed mean
  (temperature ``temperature``; the regression output directly) upsampled bilinearly to H x W.
- Metrics (streaming): ``psnr`` (dB, per-image mean of the 8-bit RGB reconstruction against the
  image, each image capped at ``PSNR_CAP_DB``), ``psnr_gray`` (the same for ab = 0: the gray
  baseline), ``auc`` (area under the cumulative ab-error curve on 0..150, pooled over pixels),
  ``acc_ab_10`` (share of pixels with ab error <= 10), ``skipped_gray`` (images skipped).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.data.card import DatasetCard
from pipeline.hookspecs import hookimpl
from pipeline.io import atomic_write_png
from pipeline.metrics.merge import add_sums, check_mergeable
from pipeline.nn.dense_head import DecoderOptions, DenseHead, build_dense_head
from pipeline.nn.inference_size import paste_maps
from pipeline.task import Batch, DenseTask, ExportOutput, FeatureSpec, Task
from pipeline.viz import panel_grid
from plugins.colorization.ab_bins import (
    RebalancingPrior,
    SoftTargets,
    ab_gamut,
    annealed_mean,
    pool_ab,
    soft_cross_entropy,
    soft_targets,
)
from plugins.colorization.color import (
    CIE_EPSILON,
    CIE_KAPPA,
    SRGB_DECODE_KNEE,
    SRGB_TO_XYZ,
    lab_to_rgb,
    rgb_to_lab,
    srgb8_to_lab,
)
from plugins.colorization.metrics import ab_accuracy, ab_error_auc, psnr

PSNR_CAP_DB = 100.0
"""An exact 8-bit reconstruction has infinite PSNR; each image's PSNR is capped here so that the
per-image mean stays finite (an error of one 8-bit level on one value of a 64x64 image is 89 dB)."""
MAX_ERROR = 150.0
"""Upper end of the ab-error curve whose area is ``auc`` (Zhang sec. 3.1)."""
ACC_THRESHOLD = 10.0
REGRESSION_SCALE = 100.0
"""``loss: regression`` predicts ab / 100."""
HUBER_BETA = 0.1
"""Smooth-L1 switch point on ab / 100 (10 ab units)."""
MAX_GRAY_WARNINGS = 10

gray_images_seen: set[str] = set()
"""Names of the grayscale images warned about in this process (see ``note_gray_image``)."""


class ColorizationOptions(DecoderOptions):
    """The decoder options (``DecoderOptions``) plus the colorization settings."""

    loss: Literal["classification", "regression"] = "classification"
    """``classification``: Zhang's Q-way ab-bin cross-entropy; ``regression``: smooth-L1 on ab / 100."""
    rebalance: bool = True
    """Weight pixels by the rarity of their colour (Zhang eq. 3-4)."""
    rebalance_lambda: float = Field(0.5, ge=0.0, le=1.0)
    """Mix of the empirical prior with the uniform distribution (1 = no rebalancing)."""
    temperature: float = Field(0.38, gt=0.0, le=1.0)
    """Annealed-mean temperature in (0, 1]: 1 = the distribution's mean, towards 0 its mode."""
    output_stride: int = Field(4, ge=1)
    """The head predicts at 1 / output_stride of the input; ab is upsampled bilinearly."""
    grid: float = Field(10.0, ge=2.0, le=50.0)
    """ab bin width (ab units)."""


def note_gray_image(name: str) -> None:
    """Warn that ``name`` is a grayscale image (once per name and process, first
    ``MAX_GRAY_WARNINGS`` names; a last warning says that the rest are skipped silently)."""
    if name in gray_images_seen:
        return
    gray_images_seen.add(name)
    n = len(gray_images_seen)
    if n <= MAX_GRAY_WARNINGS:
        warnings.warn(f"colorization: {name} is a grayscale image (R = G = B): no colour target, "
                      f"skipped ({n} grayscale image{'s' if n > 1 else ''} so far)", stacklevel=2)
    if n == MAX_GRAY_WARNINGS:
        warnings.warn("colorization: further grayscale images are skipped without a warning "
                      "(see the metric colorization/skipped_gray)", stacklevel=2)


def _image_name(batch: Batch, i: int) -> str:
    names = batch.get("file_names")
    if names is not None and i < len(names) and names[i]:
        return str(names[i])
    ids = batch.get("image_ids")
    return f"image {ids[i]}" if ids is not None and i < len(ids) else f"image #{i} of the batch"


def is_gray(images: torch.Tensor) -> torch.Tensor:
    """``B x 3 x H x W`` images -> bool B: R == G == B at every pixel."""
    return ((images[:, 0] == images[:, 1]) & (images[:, 1] == images[:, 2])).flatten(1).all(dim=1)


def colour_mask(batch: Batch) -> torch.Tensor:
    """bool B: the images that have a colour target; warns about (and names) the others."""
    gray = is_gray(batch["image"])
    for i in torch.nonzero(gray).flatten().tolist():
        note_gray_image(_image_name(batch, i))
    return ~gray


def image_lab(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255) ``B x 3 x H x W`` sRGB -> float32 ``B x 3 x H x W`` CIE Lab."""
    if images.dtype == torch.uint8:
        return srgb8_to_lab(images, channels_first=True).float()
    return rgb_to_lab(images.double() / 255.0, channels_first=True).float()


@dataclass
class ColourTargets:
    """Targets at the head's resolution: ``ab`` B x 2 x h x w (ab units), ``soft`` the soft encoding
    (``SoftTargets``: the 5 nearest bins and their weights), ``colour`` bool B (False: grayscale
    source, no target)."""

    ab: torch.Tensor
    soft: SoftTargets
    colour: torch.Tensor

    @property
    def bins(self) -> torch.Tensor:
        """B x h x w: each pixel's nearest bin."""
        return self.soft.index[:, 0]


def colour_targets(batch: Batch, size: tuple[int, int], centres: torch.Tensor) -> ColourTargets:
    """The batch's ab targets pooled to ``size`` (see ``ColourTargets``)."""
    images = batch["image"].to(centres.device)
    colour = colour_mask({**batch, "image": images})
    ab = pool_ab(image_lab(images)[:, 1:], size)
    return ColourTargets(ab=ab, soft=soft_targets(ab, centres), colour=colour)


class ColorizationHead(nn.Module):
    """The dense head plus the rebalancing prior.

    ``forward(features, *, image_size, batch)`` -> ``{"raw": B x C x h x w, "centres": Q x 2,
    "weights": Q rebalancing weights or None, "targets": ColourTargets or None}``. In training mode
    with a batch, it computes the targets and adds the colour images' bins to the prior first."""

    def __init__(self, dense: DenseHead, prior: RebalancingPrior, *, rebalance: bool, lam: float) -> None:
        super().__init__()
        self.dense = dense
        self.prior = prior
        self.rebalance = rebalance
        self.lam = lam

    def forward(self, features: dict[str, torch.Tensor], *, image_size: tuple[int, int],
                batch: Batch | None = None) -> dict[str, Any]:
        raw = self.dense(features, image_size=image_size)
        targets = None
        if self.training and batch is not None and "image" in batch:
            targets = colour_targets(batch, (raw.shape[-2], raw.shape[-1]), self.prior.centres)
            self.prior.update(targets.bins[targets.colour])
        weights = self.prior.weights(self.lam) if self.rebalance else None
        return {"raw": raw, "centres": self.prior.centres, "weights": weights, "targets": targets}


def colorization_loss(output: dict[str, Any], targets: ColourTargets, *,
                      options: ColorizationOptions) -> torch.Tensor:
    """Zhang eq. 2 (or the smooth-L1 regression) over the colour images, mean over their pixels;
    ``raw.sum() * 0`` when there is none."""
    raw = output["raw"]
    keep = targets.colour.to(raw.device)
    if not bool(keep.any()):
        return raw.sum() * 0.0
    # Every image is scored and the grayscale ones weighted 0: selecting the colour images
    # (raw[keep]) would copy the logits forward and scatter their gradient back (index_put: 6.8 ms
    # a step in the torch profiler, 8x128x128 on 2 CPU cores).
    pred, ab = raw.float(), targets.ab.to(raw.device)
    if options.loss == "classification":
        per_pixel = soft_cross_entropy(pred, targets.soft)
    else:
        target = ab / REGRESSION_SCALE
        per_pixel = F.smooth_l1_loss(pred, target, beta=HUBER_BETA, reduction="none").sum(dim=1)
    if output.get("weights") is not None:
        per_pixel = per_pixel * output["weights"].to(per_pixel)[targets.bins.to(raw.device)]
    per_image = per_pixel.flatten(1).mean(dim=1)
    return (per_image * keep.to(per_image)).sum() / keep.sum()


def predicted_ab(output: dict[str, Any], options: ColorizationOptions) -> torch.Tensor:
    """B x 2 x h x w ab (ab units) at the head's resolution."""
    raw = output["raw"]
    if options.loss == "classification":
        return annealed_mean(raw, output["centres"], options.temperature)
    return raw.float() * REGRESSION_SCALE


def lightness(image: torch.Tensor) -> torch.Tensor:
    """CIE L* (D65, 0..100) of ``N x 3 x H x W`` sRGB levels 0..255 -> ``N x 1 x H x W`` float32:
    ``rgb_to_lab``'s L for inputs in range, written without ``copysign`` (which the ONNX
    translator lacks)."""
    c = (image.float() / 255.0).clamp(0.0, 1.0)
    power = ((c.clamp_min(SRGB_DECODE_KNEE) + 0.055) / 1.055) ** 2.4
    linear = torch.where(c <= SRGB_DECODE_KNEE, c / 12.92, power)
    y = (linear * c.new_tensor(SRGB_TO_XYZ[1]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)  # white Y = 1
    f = torch.where(y > CIE_EPSILON, y.clamp_min(CIE_EPSILON) ** (1.0 / 3.0), (CIE_KAPPA * y + 16.0) / 116.0)
    return 116.0 * f - 16.0


def _to_rgb8(lab: torch.Tensor) -> np.ndarray:
    """3 x H x W Lab -> float64 3 x H x W sRGB in [0, 1], clipped and quantised to 8 bits."""
    rgb = lab_to_rgb(lab.double(), channels_first=True, clip=True)
    return (torch.round(rgb * 255.0) / 255.0).cpu().numpy()


def lab_to_image(lab: torch.Tensor) -> np.ndarray:
    """3 x H x W Lab -> H x W x 3 uint8 sRGB (out-of-gamut colours clipped)."""
    return np.rint(_to_rgb8(lab).transpose(1, 2, 0) * 255.0).astype(np.uint8)


class ColorizationEvaluator:
    """Streaming colorization metrics (see the module doc); keeps only running sums."""

    _SUMS = ("images", "skipped", "psnr_sum", "psnr_gray_sum", "pixels", "auc_sum", "acc_sum")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.images = 0
        self.skipped = 0
        self.psnr_sum = 0.0
        self.psnr_gray_sum = 0.0
        self.pixels = 0
        self.auc_sum = 0.0
        self.acc_sum = 0.0

    def process(self, batch: Batch, predictions: list[dict[str, torch.Tensor]]) -> None:
        images = batch["image"].cpu()
        colour = colour_mask({**batch, "image": images})
        self.skipped += int((~colour).sum())
        for i in torch.nonzero(colour).flatten().tolist():
            self._add(images[i], predictions[i]["lab"].cpu())

    def _add(self, image: torch.Tensor, lab: torch.Tensor) -> None:
        truth = image.double().numpy() / 255.0
        truth_lab = image_lab(image[None])[0]
        gray_lab = torch.cat([truth_lab[:1], torch.zeros_like(truth_lab[1:])])
        self.psnr_sum += min(psnr(_to_rgb8(lab), truth), PSNR_CAP_DB)
        self.psnr_gray_sum += min(psnr(_to_rgb8(gray_lab), truth), PSNR_CAP_DB)
        n = int(truth_lab.shape[1] * truth_lab.shape[2])
        pred_ab, true_ab = lab[1:].double(), truth_lab[1:].double()
        self.auc_sum += n * ab_error_auc(pred_ab, true_ab, MAX_ERROR, channels_first=True)
        self.acc_sum += n * ab_accuracy(pred_ab, true_ab, ACC_THRESHOLD, channels_first=True)
        self.pixels += n
        self.images += 1

    def merge(self, other: ColorizationEvaluator) -> None:
        """Add ``other``'s running sums (another shard): counts exact, float sums up to summation order."""
        check_mergeable(self, other)
        add_sums(self, other, self._SUMS)

    def compute(self) -> dict[str, float]:
        """``psnr``, ``psnr_gray`` (dB), ``auc``, ``acc_ab_10`` (in [0, 1]; all NaN with no colour
        image) and ``skipped_gray`` (number of grayscale images)."""
        nan = float("nan")
        return {
            "psnr": self.psnr_sum / self.images if self.images else nan,
            "psnr_gray": self.psnr_gray_sum / self.images if self.images else nan,
            "auc": self.auc_sum / self.pixels if self.pixels else nan,
            "acc_ab_10": self.acc_sum / self.pixels if self.pixels else nan,
            "skipped_gray": float(self.skipped),
        }


def _captioned_panels(panels: list[tuple[str, np.ndarray]]) -> np.ndarray:
    return np.asarray(panel_grid(panels, ncols=len(panels)))


class ColorizationTask(DenseTask[ColorizationOptions]):
    name = "colorization"
    requires = ()
    input_view = "gray"
    Options = ColorizationOptions
    main_metric = "auc"
    metrics = ("auc", "acc_ab_10", "psnr", "psnr_gray", "skipped_gray")
    """Zhang's summary of colour accuracy; PSNR rewards grayish, desaturated answers."""

    def build_head(self, *, feature_spec: FeatureSpec, card: DatasetCard,
                   options: ColorizationOptions) -> ColorizationHead:
        centres = ab_gamut(options.grid)
        outputs = centres.shape[0] if options.loss == "classification" else 2
        dense = build_dense_head(self.name, options, feature_spec=feature_spec, num_outputs=outputs,
                                 output_stride=options.output_stride)
        return ColorizationHead(dense, RebalancingPrior(centres), rebalance=options.rebalance,
                                lam=options.rebalance_lambda)

    def losses(self, output: dict[str, Any], batch: Batch, *,
               options: ColorizationOptions) -> dict[str, torch.Tensor]:
        """``{"ce": ...}`` (classification) or ``{"smooth_l1": ...}`` (regression)."""
        term = "ce" if options.loss == "classification" else "smooth_l1"
        raw = output["raw"]
        targets = output.get("targets")
        if targets is None:
            if "image" not in batch:
                return {term: raw.sum() * 0.0}
            targets = colour_targets(batch, (raw.shape[-2], raw.shape[-1]), output["centres"])
        return {term: colorization_loss(output, targets, options=options)}

    def aligned(self, output: dict[str, Any], *, batch: Batch,
                options: ColorizationOptions) -> torch.Tensor:
        """``N x 2 x H x W`` predicted a*b* (ab units) at the original image size (upsampled
        bilinearly, the padding cropped off); views average a*b*."""
        images = batch["image"].to(output["raw"].device)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        ab = F.interpolate(predicted_ab(output, options), size=size, mode="bilinear", align_corners=False)
        return paste_maps(ab, batch)

    def decide(self, aligned: torch.Tensor, *, batch: Batch, predictions: dict[str, list[Any]],
               options: ColorizationOptions) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"lab": 3xHxW}`` at the original image size: the image's own L* and the
        a*b* of ``aligned``."""
        original = batch.get("original_image", batch["image"]).to(aligned.device)
        lab = torch.cat([image_lab(original)[:, :1], aligned], dim=1).cpu()
        return [{"lab": lab[i]} for i in range(lab.shape[0])]

    def evaluator(self, *, card: DatasetCard, options: ColorizationOptions) -> ColorizationEvaluator:
        return ColorizationEvaluator()

    export_outputs = (ExportOutput("colorization_lab", "CIE L*a*b* (D65)",
                                   "N x 3 x H x W: L* (0..100) of the input, predicted a*b*; "
                                   "lab_to_rgb gives sRGB"),)

    def export_forward(self, head: nn.Module, features: dict[str, torch.Tensor], *,
                       image: torch.Tensor, options: ColorizationOptions) -> dict[str, torch.Tensor]:
        """``postprocess``'s Lab from the dense head alone (the full head's forward also computes
        the rebalancing weights, a data-dependent branch inference does not use) and L* by
        ``lightness``."""
        raw = head.dense(features, image_size=image.shape[-2:])  # type: ignore[operator]
        ab = predicted_ab({"raw": raw, "centres": head.prior.centres}, options)  # type: ignore[union-attr]
        ab = F.interpolate(ab, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return {"colorization_lab": torch.cat([lightness(image), ab.float()], dim=1)}

    def visualize(self, image: np.ndarray, prediction: dict[str, torch.Tensor], *,
                  card: DatasetCard, options: ColorizationOptions) -> np.ndarray:
        """Gray input | prediction | truth (the image), captioned, side by side."""
        lab = prediction["lab"]
        gray = torch.cat([lab[:1], torch.zeros_like(lab[1:])])
        return _captioned_panels([("gray input", lab_to_image(gray)), ("prediction", lab_to_image(lab)),
                                  ("truth", np.asarray(image, dtype=np.uint8))])

    def save_prediction(self, prediction: dict[str, torch.Tensor], path_stem: str, *,
                        card: DatasetCard, options: ColorizationOptions) -> list[str]:
        """``<stem>_colorization.png``: the predicted colours as 8-bit RGB."""
        return [str(atomic_write_png(f"{path_stem}_colorization.png", lab_to_image(prediction["lab"])))]


@hookimpl
def densepipe_register_tasks() -> list[Task]:
    return [ColorizationTask()]
