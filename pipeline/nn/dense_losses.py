"""Losses for dense classification, registered by name.

Contract of every loss ``loss(logits, target, **options)``:

- ``logits``: float BxKxHxW class scores (K >= 1); ``target``: int64 BxHxW labels in ``[0, K)`` or
  ``ignore_index`` (default 255, must lie outside ``[0, K)``), which marks unlabelled pixels.
- returns a scalar. Pixels labelled ``ignore_index`` contribute neither loss nor gradient. When no
  pixel counts (all ignored, or every valid pixel has class weight 0) the result is an exact,
  finite zero still connected to the graph (as ``logits.sum() * 0``): ``backward()`` works and
  gives zero gradients. No loss branches on the values of ``logits`` or ``target`` (no host sync).
- ``soft_dice`` and ``focal`` compute in float32 (float64 stays float64), so half-precision logits
  neither underflow nor overflow.

Build one with ``build_dense_loss(name, **options)`` -> ``callable(logits, target)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.named_registry import NamedRegistry

DenseLoss = Callable[..., Tensor]


def _check_inputs(logits: Tensor, target: Tensor, ignore_index: int) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be BxKxHxW, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    b, k, h, w = logits.shape
    if target.shape != (b, h, w):
        raise ValueError(f"target shape {tuple(target.shape)} must be {(b, h, w)} for logits {(b, k, h, w)}")
    if target.dtype != torch.int64:
        raise ValueError(f"target must be int64 labels, got {target.dtype}")
    if 0 <= ignore_index < k:
        raise ValueError(f"ignore_index {ignore_index} must lie outside [0, {k})")


def _as_class_vector(values: Tensor | Sequence[float], *, name: str, logits: Tensor) -> Tensor:
    """``values`` as a length-K tensor on ``logits``' device, dtype float32 or float64."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    vector = torch.as_tensor(values, dtype=dtype, device=logits.device)
    k = logits.shape[1]
    if vector.shape != (k,):
        raise ValueError(f"{name} must hold one value per class ({k}), got shape {tuple(vector.shape)}")
    return vector


def _compute_dtype(logits: Tensor) -> Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, or ``numerator`` (an exact zero here) where the denominator is 0;
    no NaN in value or gradient."""
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


# ---------------------------------------------------------------------------------------------
# losses


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = 255,
    class_weights: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Softmax cross-entropy averaged over valid pixels, as ``F.cross_entropy``.

    With ``class_weights`` (K values >= 0) it is the weighted mean ``sum_i w[y_i] nll_i /
    sum_i w[y_i]`` over valid pixels i, PyTorch's convention.
    """
    _check_inputs(logits, target, ignore_index)
    weight = None
    if class_weights is not None:
        weight = _as_class_vector(class_weights, name="class_weights", logits=logits).to(logits.dtype)
        if bool((weight < 0).any()):
            raise ValueError(f"class_weights must be >= 0, got {weight.tolist()}")
    per_pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if weight is None:
        denominator = valid.sum().to(per_pixel.dtype)
    else:
        denominator = (weight[target.where(valid, 0)] * valid).sum()
    return _safe_divide(per_pixel.sum(), denominator)


def soft_dice(logits: Tensor, target: Tensor, *, ignore_index: int = 255, eps: float = 1.0) -> Tensor:
    """Soft Dice loss (Milletari et al., 2016, squared denominator) on softmax probabilities.

    Per class k, over the valid pixels of the whole batch (sums run over batch and space):
    ``d_k = 1 - (2 sum y p + eps) / (sum y^2 + sum p^2 + eps)`` with y the one-hot target and p the
    softmax. The loss is the mean of ``d_k`` over the classes *present in the target or in the
    argmax prediction* on valid pixels; a class neither labelled nor predicted anywhere is
    skipped (its near-zero ``d_k`` would otherwise dilute the mean), as is a class whose
    denominator is zero. ``eps >= 0`` smooths the ratio (a perfect prediction gives exactly 0).
    Range [0, 1].
    """
    _check_inputs(logits, target, ignore_index)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    k = logits.shape[1]
    probs = torch.softmax(_compute_dtype(logits), dim=1)
    valid = (target != ignore_index).unsqueeze(1).to(probs.dtype)  # Bx1xHxW
    labels = target.where(target != ignore_index, 0)
    onehot = F.one_hot(labels, k).permute(0, 3, 1, 2).to(probs.dtype) * valid  # BxKxHxW
    probs = probs * valid
    dims = (0, 2, 3)
    intersection = (onehot * probs).sum(dims)
    denominator = onehot.sum(dims) + (probs * probs).sum(dims)  # y^2 = y for one-hot y
    ratio = _safe_divide(2 * intersection + eps, denominator + eps)
    predicted = F.one_hot(probs.argmax(1), k).permute(0, 3, 1, 2).to(probs.dtype) * valid
    counted = ((onehot.sum(dims) + predicted.sum(dims)) > 0) & (denominator + eps > 0)
    per_class = (1 - ratio) * counted
    return per_class.sum() / counted.sum().clamp_min(1)


def focal(
    logits: Tensor,
    target: Tensor,
    *,
    gamma: float = 2.0,
    alpha: Tensor | Sequence[float] | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Softmax focal loss (Lin et al., 2017) averaged over valid pixels.

    Per pixel ``-alpha[y] (1 - p_y)^gamma log p_y`` with p the softmax; ``gamma >= 0`` (0 gives
    cross-entropy) down-weights well-classified pixels. ``alpha`` holds K per-class weights >= 0
    (the paper's scalar alpha is the two-class case); unlike ``cross_entropy``'s ``class_weights``
    the sum is divided by the number of valid pixels, not by the sum of their weights.
    """
    _check_inputs(logits, target, ignore_index)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    log_probs = torch.log_softmax(_compute_dtype(logits), dim=1)
    valid = target != ignore_index
    labels = target.where(valid, 0).unsqueeze(1)
    log_pt = log_probs.gather(1, labels).squeeze(1)  # BxHxW
    # 1 - p computed as -expm1(log p): exact near p = 1; clamped so that 0 < gamma < 1 has a finite
    # gradient at p = 1.
    one_minus_pt = (-torch.expm1(log_pt)).clamp_min(torch.finfo(log_pt.dtype).tiny)
    per_pixel = -(one_minus_pt**gamma) * log_pt
    if alpha is not None:
        weight = _as_class_vector(alpha, name="alpha", logits=log_probs)
        if bool((weight < 0).any()):
            raise ValueError(f"alpha must be >= 0, got {weight.tolist()}")
        per_pixel = per_pixel * weight[labels.squeeze(1)]
    per_pixel = per_pixel * valid
    return per_pixel.sum() / valid.sum().clamp_min(1)


def combined(
    logits: Tensor,
    target: Tensor,
    *,
    weights: Mapping[str, float],
    ignore_index: int = 255,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Tensor:
    """``sum_name weights[name] * loss_name(logits, target)`` over the named losses.

    Args:
        weights: non-empty ``{loss name: weight}``; names from :data:`DENSE_LOSSES` other than
            ``"combined"``.
        ignore_index: passed to every loss.
        options: extra keyword options per loss, e.g. ``{"focal": {"gamma": 1.0}}``.
    """
    _check_combined(weights, options)
    options = options or {}
    total = logits.sum() * 0
    for name, weight in weights.items():
        loss = DENSE_LOSSES[name](logits, target, ignore_index=ignore_index, **options.get(name, {}))
        total = total + weight * loss
    return total


# ---------------------------------------------------------------------------------------------
# registry

DENSE_LOSSES: NamedRegistry[DenseLoss] = NamedRegistry("dense loss", keyword_only=True, entries={
    "cross_entropy": cross_entropy,
    "soft_dice": soft_dice,
    "focal": focal,
    "combined": combined,
})


def _check_options(name: str, options: Mapping[str, Any]) -> None:
    accepted = set(DENSE_LOSSES.options(name))
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"loss {name!r} got unknown options {unknown}; allowed: {', '.join(sorted(accepted))}"
        )


def _check_combined(weights: Mapping[str, float], options: Mapping[str, Mapping[str, Any]] | None) -> None:
    parts = sorted(set(DENSE_LOSSES) - {"combined"})
    if not weights:
        raise ConfigError(f"combined loss needs a non-empty weights mapping over {', '.join(parts)}")
    unknown = sorted(set(weights) - set(parts))
    if unknown:
        raise ConfigError(f"combined loss weights name unknown losses {unknown}; allowed: {', '.join(parts)}")
    extra = sorted(set(options or {}) - set(weights))
    if extra:
        raise ConfigError(f"combined loss options name losses {extra} that have no weight")
    for name, part_options in (options or {}).items():
        if not isinstance(part_options, Mapping):
            raise ConfigError(f"combined loss options[{name!r}] must be a mapping, got {part_options!r}")
        _check_options(name, part_options)
        if "ignore_index" in part_options:
            raise ConfigError(f"set ignore_index on the combined loss, not in options[{name!r}]")


def build_dense_loss(name: str, **options: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """``callable(logits, target)`` computing the registered loss ``name`` with ``options``.

    Raises:
        ConfigError: unknown ``name`` (listing the registered ones) or an option the loss does not
            take; for ``"combined"``, also bad ``weights``/``options`` names.
    """
    loss = DENSE_LOSSES.lookup(name)
    _check_options(name, options)
    if name == "combined":
        if "weights" not in options:
            raise ConfigError("combined loss needs weights={loss name: weight}")
        _check_combined(options["weights"], options.get("options"))
    return functools.partial(loss, **options)


__all__ = [
    "DENSE_LOSSES",
    "DenseLoss",
    "build_dense_loss",
    "combined",
    "cross_entropy",
    "focal",
    "soft_dice",
]
