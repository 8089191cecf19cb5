"""Joint transforms over sample dicts, and ``collate``.

Every transform is a small callable ``sample -> sample`` (a new dict; input tensors are not
modified in place) that moves every label present with the image: ``instances`` (boxes, masks,
keypoints), ``panoptic`` and every registered dense label kind (``pipeline.data.label_kinds``:
``semantic``, ``depth``, ``normals`` and those plugins add), each by its kind's rules. Labels a
sample lacks are skipped; a key that is no registered kind passes through unchanged.

Conventions:

- Coordinates are continuous pixel coordinates (COCO's): pixel ``i`` spans ``[i, i + 1)``, so a
  box covering columns ``a..b`` is ``x1 = a, x2 = b + 1`` and an image is ``[0, W] x [0, H]``.
- Horizontal flip maps ``x -> W - x`` (boxes: ``x1' = W - x2``, ``x2' = W - x1``; pixel column ``i``
  goes to ``W - 1 - i``, consistent with the same rule). Keypoints are then renumbered with the
  category's flip map (``KeypointSpec.flip_permutation``: the left wrist becomes the right wrist),
  and each dense kind's ``on_flip`` runs on its mirrored map: the x component of the normals is
  negated (camera frame: x right, y down, z forward).
- Keypoints with visibility 0 keep coordinates (0, 0) through every transform; a keypoint moved
  outside the image by a crop becomes (0, 0, 0).
- Label maps are resampled with nearest neighbour (pixel-centre sampling), images bilinearly with
  antialiasing; padding uses each map's unknown value (image 0, semantic 255, panoptic 0 = void,
  depth 0, normals 0, a plugin kind its ``unknown``, masks False).
- Randomness comes from the ``generator`` a transform was built with, else from torch's global
  RNG, which ``DataLoader`` seeds per worker (``base_seed + worker_id``; the base seed comes from
  the loader's ``generator`` or ``torch.manual_seed``), so a seeded run is reproducible. With
  workers, leave ``generator`` None: an explicit generator is copied into every worker, which
  would then draw the same augmentations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data.card import DatasetCard
from pipeline.data.label_kinds import BUILTIN_DENSE_NAMES, DenseLabelKind, dense_kind

Sample = dict[str, Any]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "IMAGENET_MEAN",
    "Batch",
    "IMAGENET_STD",
    "ColorJitter",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomScaleCrop",
    "Resize",
    "build_transforms",
    "collate",
    "crop_sample",
    "hflip_sample",
    "resize_sample",
    "scale_crop_sample",
]


# ------------------------------------------------------------------------------------------------
# functional forms
# ------------------------------------------------------------------------------------------------
_NOT_DENSE = frozenset(("image", "image_id", "file_name", "meta", "instances", "panoptic"))


def _dense_maps(sample: Sample) -> list[tuple[str, DenseLabelKind]]:
    """The sample's keys that are registered dense label kinds, with their kinds, in sample
    order (the plugins are asked only for a key that is no built-in one)."""
    out = []
    for k in sample:
        if k in _NOT_DENSE:
            continue
        kind = dense_kind(k)
        if kind is not None:
            out.append((k, kind))
    return out


def _hw(sample: Sample) -> tuple[int, int]:
    h, w = sample["image"].shape[-2:]
    return int(h), int(w)


def _nearest_index(n_in: int, n_out: int) -> torch.Tensor:
    """Source index of each output pixel under pixel-centre nearest resampling."""
    idx = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out)).floor().long()
    return idx.clamp_(0, n_in - 1)


def _present_segments(segments: list[dict[str, Any]], ids: torch.Tensor) -> list[dict[str, Any]]:
    """The segments whose id still occurs in ``ids``."""
    if not segments:
        return []
    top = max(int(s["id"]) for s in segments)
    if top < 65536:  # small ids (synthetic world): a histogram beats sorting the map
        counts = torch.bincount(ids.flatten().clamp(0, top + 1), minlength=top + 2)
        return [s for s in segments if s["id"] >= 0 and int(counts[s["id"]]) > 0]
    present = set(torch.unique(ids).tolist())
    return [s for s in segments if s["id"] in present]


def _gather2d(t: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``t[..., ys, :][..., xs]`` for the last two dims (nearest resampling)."""
    d = t.dim()
    if t.dtype == torch.bool:
        return _gather2d(t.view(torch.uint8), ys, xs).view(torch.bool)
    if d == 2:  # one flat gather is cheaper than two passes
        flat = (ys[:, None] * t.shape[1] + xs[None, :]).flatten()
        return t.contiguous().view(-1).index_select(0, flat).view(len(ys), len(xs))
    return t.index_select(d - 2, ys).index_select(d - 1, xs)


def _scale_keypoints(kp: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    kp = kp.clone()
    vis = kp[..., 2] > 0
    kp[..., 0] = torch.where(vis, kp[..., 0] * sx, kp[..., 0])
    kp[..., 1] = torch.where(vis, kp[..., 1] * sy, kp[..., 1])
    return kp


def resize_sample(sample: Sample, size: int | Sequence[int], *,
                  prune_segments: bool = True) -> Sample:
    """Resize a sample to ``size`` (int: square, or ``(H, W)``); no-op when already that size.

    Panoptic segments that vanish (downscaling) are dropped unless ``prune_segments=False``."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    H, W = _hw(sample)
    if (h, w) == (H, W):
        return sample
    out = dict(sample)
    img = sample["image"]
    # uint8 has a fast antialiased kernel (within 1 grey level of the float path)
    x = F.interpolate(img[None] if img.dtype == torch.uint8 else img[None].float(), size=(h, w),
                      mode="bilinear", align_corners=False, antialias=True)[0]
    out["image"] = x.contiguous()
    ys, xs = _nearest_index(H, h), _nearest_index(W, w)
    for k, _kind in _dense_maps(sample):  # nearest for every label kind (DenseLabelKind)
        out[k] = _gather2d(sample[k], ys, xs)
    if "panoptic" in sample:
        ids = _gather2d(sample["panoptic"]["ids"], ys, xs)
        segs = sample["panoptic"]["segments"]
        out["panoptic"] = {**sample["panoptic"], "ids": ids,
                           "segments": _present_segments(segs, ids) if prune_segments else segs}
    if "instances" in sample:
        inst = dict(sample["instances"])
        sx, sy = w / W, h / H
        inst["masks"] = _gather2d(inst["masks"], ys, xs)
        inst["boxes"] = inst["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        if "keypoints" in inst:
            inst["keypoints"] = _scale_keypoints(inst["keypoints"], sx, sy)
        out["instances"] = inst
    return out


def _crop_pad(t: torch.Tensor, y0: int, x0: int, h: int, w: int, fill: float) -> torch.Tensor:
    """Window ``[y0, y0 + h) x [x0, x0 + w)`` of the last two dims; outside filled with ``fill``."""
    H, W = t.shape[-2:]
    if y0 >= 0 and x0 >= 0 and y0 + h <= H and x0 + w <= W:
        return t[..., y0:y0 + h, x0:x0 + w].clone()
    out = t.new_full((*t.shape[:-2], h, w), fill)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
    if sy1 > sy0 and sx1 > sx0:
        out[..., sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = t[..., sy0:sy1, sx0:sx1]
    return out


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (continuous coordinates) of ``NxHxW`` bool masks; zeros for empty ones."""
    n, H, W = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(2), masks.any(1)
    y1 = rows.float().argmax(1)
    y2 = H - rows.flip(1).float().argmax(1)
    x1 = cols.float().argmax(1)
    x2 = W - cols.flip(1).float().argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return boxes * rows.any(1, keepdim=True)


def _cropped_instances(inst: dict[str, Any], masks: torch.Tensor, x0: int, y0: int, h: int, w: int,
                       *, keypoint_scale: tuple[float, float] | None = None) -> dict[str, Any]:
    """Instances after a crop to the window at (x0, y0) of size h x w, given their cropped masks:
    empty ones dropped, boxes from the masks, keypoints (scaled first by ``keypoint_scale`` (sx,
    sy) if given) shifted, and (0, 0, 0) where they fall outside the window."""
    keep = masks.flatten(1).any(1)
    new = {k: v[keep] for k, v in inst.items() if isinstance(v, torch.Tensor)}
    new["masks"] = masks[keep]
    new["boxes"] = masks_to_boxes(new["masks"])
    if "keypoints" in new:
        kp = new["keypoints"].clone() if keypoint_scale is None else \
            _scale_keypoints(new["keypoints"], *keypoint_scale)
        kp[..., 0] -= x0
        kp[..., 1] -= y0
        inside = ((kp[..., 2] > 0) & (kp[..., 0] >= 0) & (kp[..., 0] < w)
                  & (kp[..., 1] >= 0) & (kp[..., 1] < h))
        new["keypoints"] = kp * inside[..., None]
    return new


def crop_sample(sample: Sample, y0: int, x0: int, h: int, w: int, *, image_fill: int = 0) -> Sample:
    """Crop window ``[x0, x0 + w) x [y0, y0 + h)`` (may extend past the image: padded).

    Instances whose masks become empty are dropped and boxes are recomputed from the masks;
    keypoints outside the window become (0, 0, 0); panoptic segments no longer visible are
    dropped from ``segments``."""
    out = dict(sample)
    out["image"] = _crop_pad(sample["image"], y0, x0, h, w, image_fill)
    for k, kind in _dense_maps(sample):
        out[k] = _crop_pad(sample[k], y0, x0, h, w, kind.unknown)
    if "panoptic" in sample:
        ids = _crop_pad(sample["panoptic"]["ids"], y0, x0, h, w, 0)
        out["panoptic"] = {**sample["panoptic"], "ids": ids,
                           "segments": _present_segments(sample["panoptic"]["segments"], ids)}
    if "instances" in sample:
        inst = sample["instances"]
        masks = _crop_pad(inst["masks"], y0, x0, h, w, False)
        out["instances"] = _cropped_instances(inst, masks, x0, y0, h, w)
    return out


def _window_index(n_in: int, n_scaled: int, start: int, n_out: int
                  ) -> tuple[torch.Tensor, int, int]:
    """Source index of each pixel of window ``[start, start + n_out)`` of an ``n_in -> n_scaled``
    nearest resize (same rule as ``_nearest_index``), and how many window pixels at its start
    and at its end lie outside the scaled image (padding)."""
    pos = torch.arange(start, start + n_out)
    src = ((pos.to(torch.float64) + 0.5) * (n_in / n_scaled)).floor().long().clamp_(0, n_in - 1)
    lead = min(max(-start, 0), n_out)
    trail = min(max(start + n_out - n_scaled, 0), n_out)
    return src, lead, trail


def _gather_window(t: torch.Tensor, ys: tuple[torch.Tensor, int, int],
                   xs: tuple[torch.Tensor, int, int], fill: float) -> torch.Tensor:
    out = _gather2d(t, ys[0], xs[0])
    h, w = out.shape[-2:]
    if ys[1]:
        out[..., : ys[1], :] = fill
    if ys[2]:
        out[..., h - ys[2]:, :] = fill
    if xs[1]:
        out[..., :, : xs[1]] = fill
    if xs[2]:
        out[..., :, w - xs[2]:] = fill
    return out


def scale_crop_sample(sample: Sample, scaled: Sequence[int], y0: int, x0: int, h: int, w: int,
                      *, image_fill: int = 0) -> Sample:
    """``crop_sample(resize_sample(sample, scaled), y0, x0, h, w)`` in one pass.

    Label maps and masks are gathered straight from the source (nearest, same sampling as
    ``resize_sample``) without materialising the scaled maps; the result is identical."""
    sh, sw = int(scaled[0]), int(scaled[1])
    H, W = _hw(sample)
    img = sample["image"]
    if (sh, sw) != (H, W):
        img = F.interpolate(img[None] if img.dtype == torch.uint8 else img[None].float(),
                            size=(sh, sw), mode="bilinear", align_corners=False,
                            antialias=True)[0]
    out = dict(sample)
    out["image"] = _crop_pad(img, y0, x0, h, w, image_fill)
    ys = _window_index(H, sh, y0, h)
    xs = _window_index(W, sw, x0, w)
    for k, kind in _dense_maps(sample):
        out[k] = _gather_window(sample[k], ys, xs, kind.unknown)
    if "panoptic" in sample:
        ids = _gather_window(sample["panoptic"]["ids"], ys, xs, 0)
        out["panoptic"] = {**sample["panoptic"], "ids": ids,
                           "segments": _present_segments(sample["panoptic"]["segments"], ids)}
    if "instances" in sample:
        inst = sample["instances"]
        masks = _gather_window(inst["masks"], ys, xs, False)
        out["instances"] = _cropped_instances(inst, masks, x0, y0, h, w,
                                              keypoint_scale=(sw / W, sh / H))
    return out


def _flip_permutations(card: DatasetCard | None) -> torch.Tensor | None:
    """``num_classes x K`` table: keypoint index each keypoint takes after a flip, per class."""
    if card is None or not card.keypoints:
        return None
    K = max(s.num_keypoints for s in card.keypoints)
    table = torch.arange(K).repeat(card.num_classes, 1)
    for spec in card.keypoints:
        try:
            c = card.index_of_category(spec.category_id)
        except KeyError:
            continue
        table[c, : spec.num_keypoints] = torch.tensor(spec.flip_permutation())
    return table


def hflip_sample(sample: Sample, card: DatasetCard | None = None, *,
                 _perms: torch.Tensor | None = None) -> Sample:
    """Mirror a sample left-right (see the module docstring for the rules).

    ``card`` supplies the keypoint flip maps; without one keypoints are mirrored, not renumbered."""
    perms = _perms if _perms is not None else _flip_permutations(card)
    _, W = _hw(sample)
    out = dict(sample)
    out["image"] = sample["image"].flip(-1)
    for k, kind in _dense_maps(sample):
        out[k] = kind.on_flip(sample[k].flip(-1))
    if "panoptic" in sample:
        out["panoptic"] = {**sample["panoptic"], "ids": sample["panoptic"]["ids"].flip(-1)}
    if "instances" in sample:
        inst = dict(sample["instances"])
        inst["masks"] = inst["masks"].flip(-1)
        b = inst["boxes"]
        inst["boxes"] = torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], 1)
        if "keypoints" in inst:
            kp = inst["keypoints"]
            if perms is not None and kp.shape[0] > 0:
                idx = perms[inst["labels"], : kp.shape[1]]
                kp = kp.gather(1, idx[:, :, None].expand(-1, -1, 3))
            kp = kp.clone()
            kp[..., 0] = torch.where(kp[..., 2] > 0, W - kp[..., 0], kp[..., 0])
            inst["keypoints"] = kp
        out["instances"] = inst
    return out


# ------------------------------------------------------------------------------------------------
# transform classes
# ------------------------------------------------------------------------------------------------
def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[lo, hi]`` (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class Resize:
    """Resize to ``size`` (int: square ``size x size``; or ``(H, W)``). Labels nearest, boxes and
    keypoints scaled; a sample already of that size passes unchanged."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __call__(self, sample: Sample) -> Sample:
        return resize_sample(sample, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class RandomScaleCrop:
    """Rescale by a random factor, then take a random ``crop`` window (padded where it is larger).

    The factor is ``s * base_size / max(H, W)`` with ``s ~ U(scale)`` when ``base_size`` is given
    (images of any size land near ``base_size``), else just ``s``. Where the scaled image is
    smaller than the crop, it lands at a random position inside it and the rest is padding.

    Scaling up by ``s`` and cropping is a zoom: the same camera with ``s`` times the focal length,
    under which the scene looks ``s`` times closer. With ``depth_follows_zoom`` (default) the depth
    map is divided by ``s`` so that depth stays consistent with the apparent size of things;
    otherwise a scale jitter of +-25 % teaches the model contradicting depths for the same view
    (and caps delta1, whose threshold is 1.25). Normals are left as they are. In general every
    dense kind's ``on_zoom(map, zoom)`` runs (``pipeline.data.label_kinds``; depth's divides by
    the zoom); ``depth_follows_zoom=False`` skips them all."""

    def __init__(self, scale: tuple[float, float] = (0.75, 1.25),
                 crop: int | Sequence[int] = (512, 512), *, base_size: int | None = None,
                 image_fill: int = 0, generator: torch.Generator | None = None,
                 depth_follows_zoom: bool = True) -> None:
        self.depth_follows_zoom = depth_follows_zoom
        self.scale = (float(scale[0]), float(scale[1]))
        self.crop = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
        self.base_size = base_size
        self.image_fill = image_fill
        self.generator = generator

    def __call__(self, sample: Sample) -> Sample:
        H, W = _hw(sample)
        zoom = _uniform(*self.scale, self.generator)
        s = zoom * self.base_size / max(H, W) if self.base_size else zoom
        h, w = max(1, round(H * s)), max(1, round(W * s))
        ch, cw = self.crop
        y0 = _randint(min(0, h - ch), max(0, h - ch), self.generator)
        x0 = _randint(min(0, w - cw), max(0, w - cw), self.generator)
        out = scale_crop_sample(sample, (h, w), y0, x0, ch, cw, image_fill=self.image_fill)
        if self.depth_follows_zoom:
            for k, kind in _dense_maps(out):
                out[k] = kind.on_zoom(out[k], zoom)
        return out

    def __repr__(self) -> str:
        return f"RandomScaleCrop(scale={self.scale}, crop={self.crop}, base_size={self.base_size})"


class RandomHorizontalFlip:
    """Mirror the sample with probability ``p``; keypoints renumbered by ``card``'s flip maps."""

    def __init__(self, card: DatasetCard | None, p: float = 0.5, *,
                 generator: torch.Generator | None = None) -> None:
        self.card = card
        self.p = p
        self.generator = generator
        self._perms = _flip_permutations(card)

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand((), generator=self.generator)) >= self.p:
            return sample
        return hflip_sample(sample, self.card, _perms=self._perms)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ColorJitter:
    """Random brightness, contrast and saturation factors in ``[1 - x, 1 + x]``; image only.

    Works on uint8 images (apply before ``Normalize``)."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 *, generator: torch.Generator | None = None) -> None:
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.generator = generator

    def __call__(self, sample: Sample) -> Sample:
        img = sample["image"]
        if img.dtype != torch.uint8:
            raise TypeError("ColorJitter expects a uint8 image; put it before Normalize")
        g = self.generator
        b = _uniform(1 - self.brightness, 1 + self.brightness, g)
        c = _uniform(1 - self.contrast, 1 + self.contrast, g)
        s = _uniform(1 - self.saturation, 1 + self.saturation, g)
        x = img.float() * b
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        x = (x - gray.mean()) * c + gray.mean()
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        x = (x - gray) * s + gray
        return {**sample, "image": x.round_().clamp_(0, 255).to(torch.uint8)}

    def __repr__(self) -> str:
        return (f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation})")


class Normalize:
    """``image`` uint8 -> float32 ``(x / 255 - mean) / std``. Optional: by default the model
    normalises uint8 batches itself; use this only for a model that expects float input."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, sample: Sample) -> Sample:
        x = sample["image"].float() / 255.0
        return {**sample, "image": (x - self.mean) / self.std}

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def build_transforms(train: bool, image_size: int, card: DatasetCard | None, *,
                     scale: tuple[float, float] = (0.75, 1.25)) -> Compose:
    """Default transforms.

    train: ``RandomScaleCrop(scale, crop=image_size, base_size=image_size)`` (depth / zoom) +
    ``RandomHorizontalFlip(card)`` + ``ColorJitter(0.2, 0.2, 0.2)``; eval: nothing (the sample
    at its original size: the model applies the test-size rule, ``pipeline.nn.inference_size``,
    and pastes its predictions back, so metrics compare with the labels as they are on disk).
    The image stays uint8."""
    if train:
        return Compose([
            RandomScaleCrop(scale, (image_size, image_size), base_size=image_size),
            RandomHorizontalFlip(card, 0.5),
            ColorJitter(0.2, 0.2, 0.2),
        ])
    return Compose([])


# ------------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------------
class _Leaf:
    """Placeholder for a tensor in a packed batch: ``(dtype, offset, shape)`` in its buffer."""

    __slots__ = ("dtype", "offset", "shape")

    def __init__(self, dtype: torch.dtype, offset: int, shape: tuple[int, ...]) -> None:
        self.dtype, self.offset, self.shape = dtype, offset, shape

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Leaf, (self.dtype, self.offset, self.shape))


def _pack(obj: Any, parts: dict[torch.dtype, list[torch.Tensor]],
          sizes: dict[torch.dtype, int]) -> Any:
    if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.requires_grad:
        off = sizes.get(obj.dtype, 0)
        parts.setdefault(obj.dtype, []).append(obj.reshape(-1))
        sizes[obj.dtype] = off + obj.numel()
        return _Leaf(obj.dtype, off, tuple(obj.shape))
    if isinstance(obj, dict):
        return {k: _pack(v, parts, sizes) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_pack(v, parts, sizes) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_pack(v, parts, sizes) for v in obj)
    return obj


def _unpack(obj: Any, flats: dict[torch.dtype, torch.Tensor]) -> Any:
    if isinstance(obj, _Leaf):
        n = 1
        for d in obj.shape:
            n *= d
        return flats[obj.dtype][obj.offset:obj.offset + n].view(obj.shape)
    if isinstance(obj, dict):
        return {k: _unpack(v, flats) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, flats) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_unpack(v, flats) for v in obj)
    return obj


def _rebuild_batch(skeleton: dict[str, Any], flats: dict[torch.dtype, torch.Tensor]) -> Batch:
    return Batch(_unpack(skeleton, flats))


class Batch(dict):
    """What ``collate`` returns: a plain ``dict`` that crosses process boundaries cheaply.

    A DataLoader worker sends a batch to the main process by pickling it; torch moves every
    tensor into its own shared-memory segment and hands its file descriptor over separately,
    which costs ~0.2 ms per tensor, and the per-sample instance and panoptic tensors make dozens
    per batch. Pickling a ``Batch`` instead packs all its tensors into one flat buffer per dtype;
    unpickling restores the same structure with tensors that are views into those buffers."""

    def __copy__(self) -> Batch:  # shallow, as for a dict (pin_memory copies batches)
        return Batch(self)

    def __reduce__(self) -> tuple[Any, ...]:
        parts: dict[torch.dtype, list[torch.Tensor]] = {}
        sizes: dict[torch.dtype, int] = {}
        skeleton = _pack(dict(self), parts, sizes)
        flats = {dt: torch.cat(ts) for dt, ts in parts.items()}
        return (_rebuild_batch, (skeleton, flats))


def collate(samples: Sequence[Sample]) -> Batch:
    """Batch samples (all of one image size).

    Returns ``image`` (Bx3xHxW, uint8 unless normalised), the dense maps present in any sample
    stacked (``semantic`` BxHxW int64, ``depth`` BxHxW, ``normals`` Bx3xHxW, a plugin's dense kind
    Bx[C]xHxW; a sample lacking one is filled with its kind's ``unknown``), ``instances``/
    ``panoptic`` as lists with ``None`` for samples lacking them (a key only when some sample has
    it), ``has``: ``{kind: bool tensor B}`` for the built-in dense kinds, every other registered
    dense kind present in some sample (a task of a plugin kind reads ``has.get(kind)``: absent
    when no sample of the batch has it), ``instances``, ``panoptic`` and ``keypoints``, and ``image_ids``,
    ``file_names``, ``meta`` lists. The result is a ``Batch`` (a dict that pickles compactly for
    DataLoader workers)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    images = [s["image"] for s in samples]
    shape = images[0].shape
    for s in samples:
        if s["image"].shape != shape:
            raise ValueError(f"collate: image {s.get('file_name')} is {tuple(s['image'].shape)}, "
                             f"the first is {tuple(shape)}; resize/crop to one size first")
    H, W = shape[-2:]
    batch = Batch({
        "image": torch.stack(images),
        "image_ids": [s.get("image_id") for s in samples],
        "file_names": [s.get("file_name") for s in samples],
        "meta": [s.get("meta", {}) for s in samples],
    })
    has: dict[str, torch.Tensor] = {}
    extra = dict.fromkeys(k for s in samples for k in s
                          if k not in _NOT_DENSE and k not in BUILTIN_DENSE_NAMES)
    for k in (*BUILTIN_DENSE_NAMES, *extra):
        kind = dense_kind(k)
        if kind is None:  # not a label kind
            continue
        present = [k in s for s in samples]
        has[k] = torch.tensor(present, dtype=torch.bool)
        if not any(present):
            continue
        ref = next(s[k] for s in samples if k in s)
        maps = []
        for s in samples:
            m = s.get(k)
            if m is None:
                m = torch.full_like(ref, kind.unknown)
            elif m.shape[-2:] != (H, W):
                raise ValueError(f"collate: {k} of {s.get('file_name')} is "
                                 f"{tuple(m.shape)}, its image {H}x{W}")
            maps.append(m)
        batch[k] = torch.stack(maps)
    for k in ("instances", "panoptic"):
        present = [k in s for s in samples]
        has[k] = torch.tensor(present, dtype=torch.bool)
        if any(present):
            batch[k] = [s.get(k) for s in samples]
    has["keypoints"] = torch.tensor(
        ["instances" in s and "keypoints" in s["instances"] for s in samples], dtype=torch.bool)
    batch["has"] = has
    return batch
