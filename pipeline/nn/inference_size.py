"""The test-size rule: how an image of any size is fed at inference and its predictions returned.

Evaluation, ``densepipe predict`` and serving all go through ``MultiTaskModel.predict``, which
applies ``InferenceResize.prepare`` to the batch: every image is resized so its shorter side is
``short`` (aspect ratio kept; the longer side capped at ``max_size``), then padded at the bottom
and right to a multiple of ``divisor`` (the backbone's deepest stride) with the mean pixel (zero
after normalisation). Each task's ``postprocess`` then returns its predictions at the image's
original size (``output_size``): dense maps are cropped to the resized image (``valid_size``) and
interpolated back (``paste_maps``), boxes and keypoints are scaled (``box_scale``), masks are
pasted at the original size. Metrics are computed there, against the labels as they are on disk,
as detectron2 (``ResizeShortestEdge`` + ``detector_postprocess`` / ``sem_seg_postprocess``) and
MMSegmentation (``Resize(keep_ratio=True)`` + resizing logits to the original shape) do.

A prepared batch carries ``valid_size`` (rh, rw), ``output_size`` (H, W) and the untouched
``original_image``; a batch that needs neither resizing nor padding is returned unchanged (no
keys added), so predictions are then simply at the input resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PAD_PIXEL = (124, 116, 104)
"""The padding colour (uint8 RGB): ImageNet's mean, so padded pixels are ~0 once normalised."""


@dataclass(frozen=True)
class InferenceResize:
    """``short``: target of the shorter side in pixels (0: keep the original size, pad only);
    ``max_size``: cap on the longer side (None: no cap); ``divisor``: pad H and W to a multiple."""

    short: int
    max_size: int | None = None
    divisor: int = 32

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The resized (unpadded) size of an ``h x w`` image: detectron2's rounding,
        ``int(side * scale + 0.5)``."""
        scale = 1.0 if self.short <= 0 else self.short / min(h, w)
        if self.max_size is not None and max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        if scale == 1.0:
            return h, w
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        d = self.divisor
        return -(-h // d) * d, -(-w // d) * d

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` (``image`` uint8 or 0..255 float Nx3xHxW) as the network sees it (see the
        module doc); unchanged when the images are already of the resized, padded size."""
        images = batch["image"]
        H, W = int(images.shape[-2]), int(images.shape[-1])
        rh, rw = self.input_size(H, W)
        ph, pw = self.padded_size(rh, rw)
        if (rh, rw, ph, pw) == (H, W, H, W):
            return batch
        x = images
        if (rh, rw) != (H, W):
            # uint8 has a fast antialiased kernel (within 1 grey level of the float path)
            x = F.interpolate(x if x.dtype == torch.uint8 else x.float(), size=(rh, rw),
                              mode="bilinear", align_corners=False, antialias=True)
        if (ph, pw) != (rh, rw):
            out = x.new_empty((x.shape[0], x.shape[1], ph, pw))
            out[:] = torch.tensor(PAD_PIXEL, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            out[..., :rh, :rw] = x
            x = out
        return {**batch, "image": x, "original_image": images, "valid_size": (rh, rw),
                "output_size": (H, W)}


def output_size(batch: dict[str, Any]) -> tuple[int, int] | None:
    """The size predictions must have (the original image's), or None: the input's own."""
    size = batch.get("output_size")
    return None if size is None else (int(size[0]), int(size[1]))


def original_size(batch: dict[str, Any]) -> tuple[int, int]:
    """(H, W) of the original images: ``output_size`` when the batch was prepared, else the size
    of its ``image``."""
    return output_size(batch) or (int(batch["image"].shape[-2]), int(batch["image"].shape[-1]))


def paste_maps(maps: torch.Tensor, batch: dict[str, Any], *, mode: str = "bilinear") -> torch.Tensor:
    """``N x C x h x w`` maps predicted for ``batch["image"]`` (any resolution proportional to it,
    usually the input's) at the original image size: the padding is cropped off, then the rest is
    interpolated (``mode``: ``bilinear`` for scores and continuous values, ``nearest`` for labels)
    to ``output_size``. Unchanged for a batch that was not resized or padded."""
    out = output_size(batch)
    if out is None:
        return maps
    H, W = int(batch["image"].shape[-2]), int(batch["image"].shape[-1])
    rh, rw = batch["valid_size"]
    h, w = int(maps.shape[-2]), int(maps.shape[-1])
    ch, cw = round(rh * h / H), round(rw * w / W)
    x = maps[..., :ch, :cw]
    if (ch, cw) == out:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=out, mode="nearest")
    return F.interpolate(x.float(), size=out, mode="bilinear", align_corners=False)


def box_scale(batch: dict[str, Any]) -> tuple[float, float]:
    """``(sx, sy)``: multiply x by ``sx`` and y by ``sy`` to map input pixel coordinates (boxes,
    keypoints) to the original image's; ``(1, 1)`` when the batch was not resized."""
    out = output_size(batch)
    if out is None:
        return 1.0, 1.0
    rh, rw = batch["valid_size"]
    return out[1] / rw, out[0] / rh


def scale_boxes(boxes: torch.Tensor, scale: Sequence[float]) -> torch.Tensor:
    """``N x 4`` (x1, y1, x2, y2) boxes scaled by ``(sx, sy)``."""
    sx, sy = scale
    if (sx, sy) == (1.0, 1.0):
        return boxes
    return boxes * boxes.new_tensor([sx, sy, sx, sy])
