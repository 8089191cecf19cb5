"""Fully connected CRF post-processing of semantic logits (DeepLab v1/v2's "DenseCRF").

The model of Krahenbuhl and Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian
Edge Potentials" (NIPS 2011): unary energies ``U_i(l) = -logit_i(l)`` (the network's scores; any
per-pixel constant cancels), a Potts compatibility ``mu(l, l') = [l != l']`` and two Gaussian
kernels over pixel pairs ``i != j``::

    k(f_i, f_j) = w1 exp(-|p_i - p_j|^2 / (2 theta_alpha^2) - |I_i - I_j|^2 / (2 theta_beta^2))
                + w2 exp(-|p_i - p_j|^2 / (2 theta_gamma^2))

``p``: positions in pixels of the original image, ``I``: RGB in 0..255. Inference is their
Algorithm 1 (mean field): ``Q = softmax(-U)``, then each iteration

    Q_i(l) = 1/Z_i exp(-U_i(l) - sum_l' mu(l, l') sum_m w_m sum_{j != i} k_m(f_i, f_j) Q_j(l'))

With the Potts ``mu`` the pairwise term is ``M_i - M_i(l)`` (``M_i(l)``: the kernel-weighted sum
of ``Q_j(l)``; ``M_i``: its sum over labels), and ``M_i`` is the same for every label, so
``Q_i = softmax(logit_i + M_i(l))``, which is what ``dense_crf`` computes.

``normalization``: the published weights (DeepLab's w1 = 4, w2 = 3) were tuned with the
authors' code, which filters with a normalised kernel by default (``NORMALIZE_SYMMETRIC``:
``D^-1/2 K D^-1/2``, ``K`` with its diagonal, ``D = K 1``), not with Algorithm 1's raw sums, which
grow with the number of similar pixels and swamp the unaries at those weights
(``benchmarks/results/crf.json``). ``symmetric`` (default) is that; ``none`` is Algorithm 1 as
printed.

Two ways to sum over ``j``:

- ``window: null``: every pair, exactly (O(N^2) per iteration for N pixels; refused above
  ``max_pixels``);
- ``window: k`` (odd): ConvCRF's truncation (Teichmann and Cipolla, "Convolutional CRFs for
  Semantic Segmentation", BMVC 2019): only pairs within a ``k x k`` window, ``|dy|, |dx| <= k // 2``.
  Exact when ``k >= 2 * max(H, W) - 1``. O(N k^2) per iteration; memory: one H x W kernel map
  per pair of opposite offsets.

The permutohedral lattice of the original code is not used: it approximates the same sums.
``naive_dense_crf`` is the plain reference (explicit kernel matrix, float64) the tests compare to.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.errors import ConfigError

KERNEL_CACHE_ELEMENTS = 1 << 25
"""Exact path: kernel values kept between mean-field iterations (float32: 128 MiB); above it they
are recomputed in every iteration (same result, more time). The window path keeps its
``(k^2 - 1) / 2`` kernel maps of H x W (k = 11: 60 maps)."""


class CRFOptions(BaseModel):
    """``model.heads.semantic.crf``: the dense CRF's parameters.

    Defaults: DeepLab-CRF-LargeFOV's cross-validated values on PASCAL VOC 2012 (Chen et al.,
    "Semantic Image Segmentation with Deep Convolutional Nets and Fully Connected CRFs", ICLR
    2015, Sec. 4.1; DeepLab v2's ``run_densecrf.sh`` ``bi_w 4, bi_xy_std 121, bi_rgb_std 5,
    pos_w 3, pos_xy_std 3``), except ``iterations`` (DeepLab: 10; 5 here, as in pydensecrf's
    examples, half the cost) and ``window`` (DeepLab: every pair, through the permutohedral
    lattice).
    """

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(5, ge=1)
    """Mean-field iterations."""
    appearance_weight: float = Field(4.0, ge=0)
    """w1: weight of the appearance (bilateral) kernel (DeepLab ``bi_w``)."""
    theta_alpha: float = Field(121.0, gt=0)
    """Spatial standard deviation of the appearance kernel, in pixels of the original image
    (DeepLab ``bi_xy_std``)."""
    theta_beta: float = Field(5.0, gt=0)
    """Colour standard deviation of the appearance kernel, RGB in 0..255 (DeepLab ``bi_rgb_std``)."""
    smoothness_weight: float = Field(3.0, ge=0)
    """w2: weight of the smoothness (spatial Gaussian) kernel (DeepLab ``pos_w``)."""
    theta_gamma: float = Field(3.0, gt=0)
    """Standard deviation of the smoothness kernel in pixels (DeepLab ``pos_xy_std``)."""
    window: int | None = Field(11, ge=1)
    """Odd k: messages only within a k x k window (ConvCRF), O(pixels x k^2) per iteration;
    null: every pixel pair (exact, O(pixels^2), only up to ``max_pixels``)."""
    normalization: Literal["symmetric", "none"] = "symmetric"
    """``symmetric``: each kernel as the reference code filters by default (densecrf's
    ``NORMALIZE_SYMMETRIC``, pydensecrf's default, which DeepLab's weights were tuned with):
    ``D^-1/2 K D^-1/2 Q`` with ``K`` including ``k(i, i) = 1`` and ``D = K 1`` (row sums within the
    window), so a message is a weighted mean, of the order of the weights; ``none``: the paper's
    Algorithm 1 as printed, the plain sum over ``j != i`` (messages grow with the window)."""
    max_pixels: int = Field(128 * 128, ge=1)
    """Largest image (H x W) the exact path (``window: null``) accepts."""

    @field_validator("window")
    @classmethod
    def _odd_window(cls, v: int | None) -> int | None:
        if v is not None and v % 2 == 0:
            raise ValueError(f"must be odd (a k x k window centred on the pixel), got {v}")
        return v


def _as_image(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 or 0..255 float ``N x 3 x H x W`` -> float32 on ``device``."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected N x 3 x H x W (RGB), got {tuple(images.shape)}")
    return images.to(device=device, dtype=torch.float32)


def _half_offsets(ry: int, rx: int) -> Iterator[tuple[int, int]]:
    """One of each pair of opposite offsets ``(dy, dx)``, ``|dy| <= ry``, ``|dx| <= rx``, not (0, 0)."""
    for dy in range(0, ry + 1):
        for dx in range(-rx, rx + 1):
            if dy > 0 or dx > 0:
                yield dy, dx


def _pair_slices(dy: int, dx: int, h: int, w: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices ``a`` and ``b`` of an ``h x w`` map with ``b`` = ``a`` shifted by ``(dy, dx)`` (dy >= 0)."""
    a = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
    b = (slice(dy, h), slice(max(0, dx), w + min(0, dx)))
    return a, b


Pair = tuple[tuple[slice, slice], tuple[slice, slice], torch.Tensor, Any]
"""An offset pair of ``_window_pairs``: slices ``a``, ``b``, appearance kernel, smoothness kernel."""


def _window_pairs(image: torch.Tensor, options: CRFOptions, radius: tuple[int, int]) -> list[Pair]:
    """Per offset pair (o, -o) within ``radius`` (ry, rx): slices ``a``, ``b`` (``b`` = ``a`` + o),
    the appearance kernel between them (N x 1 x h' x w', spatial factor included, unweighted) and
    the smoothness kernel (a scalar: it depends on the offset only)."""
    h, w = image.shape[-2:]
    a1, a2 = -0.5 / options.theta_alpha ** 2, -0.5 / options.theta_beta ** 2
    g = -0.5 / options.theta_gamma ** 2
    pairs = []
    for dy, dx in _half_offsets(*radius):
        a, b = _pair_slices(dy, dx, h, w)
        d2 = float(dy * dy + dx * dx)
        diff = image[:, :, a[0], a[1]] - image[:, :, b[0], b[1]]
        colour = diff.square().sum(dim=1, keepdim=True)
        pairs.append((a, b, torch.exp(colour * a2 + a1 * d2), math.exp(g * d2)))
    return pairs


def _filter(q: torch.Tensor, pairs: list[Pair], which: int, out: torch.Tensor) -> torch.Tensor:
    """``out += K q`` over the pairs (both directions) with the kernel in slot ``which`` of each
    pair (2: appearance, 3: smoothness)."""
    for pair in pairs:
        a, b, k = pair[0], pair[1], pair[which]
        out[:, :, a[0], a[1]] += k * q[:, :, b[0], b[1]]
        out[:, :, b[0], b[1]] += k * q[:, :, a[0], a[1]]
    return out


def _window_inference(logits: torch.Tensor, image: torch.Tensor, options: CRFOptions,
                      radius: tuple[int, int]) -> torch.Tensor:
    """Mean field with messages within ``radius``; ``logits`` N x C x H x W, ``image`` N x 3 x H x W."""
    w1, w2 = options.appearance_weight, options.smoothness_weight
    pairs = _window_pairs(image, options, radius)
    q = torch.softmax(logits, dim=1)
    if options.normalization == "none":
        combined = [(a, b, w1 * k + w2 * s, s) for a, b, k, s in pairs]
        for _ in range(options.iterations):
            q = torch.softmax(logits + _filter(q, combined, 2, torch.zeros_like(q)), dim=1)
        return q
    ones = torch.ones_like(image[:, :1])
    n_app = _filter(ones, pairs, 2, ones.clone()).rsqrt()  # D^-1/2, self included
    n_smooth = _filter(ones, pairs, 3, ones.clone()).rsqrt()
    for _ in range(options.iterations):
        qa, qs = q * n_app, q * n_smooth
        msg = (w1 * n_app * _filter(qa, pairs, 2, qa.clone())
               + w2 * n_smooth * _filter(qs, pairs, 3, qs.clone()))
        q = torch.softmax(logits + msg, dim=1)
    return q


def _exact_blocks(feats: tuple[torch.Tensor, torch.Tensor], options: CRFOptions,
                  block: int = 1024) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Row blocks ``(s, e, K_app[s:e], K_smooth[s:e])`` of the P x P kernels (unweighted; the
    diagonal is 1 for ``symmetric`` normalisation, 0 for ``none``)."""
    pos, rgb = feats
    n = pos.shape[0]
    diag = 0.0 if options.normalization == "none" else 1.0
    for s in range(0, n, block):
        e = min(n, s + block)
        d2 = torch.cdist(pos[s:e], pos).square()
        c2 = torch.cdist(rgb[s:e], rgb).square()
        k_app = torch.exp(-d2 / (2 * options.theta_alpha ** 2) - c2 / (2 * options.theta_beta ** 2))
        k_smooth = torch.exp(-d2 / (2 * options.theta_gamma ** 2))
        idx = torch.arange(s, e, device=pos.device)
        k_app[idx - s, idx] = diag
        k_smooth[idx - s, idx] = diag
        yield s, e, k_app, k_smooth


def _exact_inference(logits: torch.Tensor, feats: tuple[torch.Tensor, torch.Tensor],
                     options: CRFOptions) -> torch.Tensor:
    """Mean field over every pair for one image: ``logits`` C x P -> C x P probabilities. The
    kernel blocks are kept between iterations when they fit ``KERNEL_CACHE_ELEMENTS``."""
    p = logits.shape[1]
    cached = list(_exact_blocks(feats, options)) if 2 * p * p <= KERNEL_CACHE_ELEMENTS else None

    def blocks() -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        return iter(cached) if cached is not None else _exact_blocks(feats, options)

    w1, w2 = options.appearance_weight, options.smoothness_weight
    n_app = n_smooth = torch.ones(p, device=logits.device)
    if options.normalization == "symmetric":
        n_app, n_smooth = torch.empty_like(n_app), torch.empty_like(n_smooth)
        for s, e, k_app, k_smooth in blocks():
            n_app[s:e] = k_app.sum(dim=1).rsqrt()
            n_smooth[s:e] = k_smooth.sum(dim=1).rsqrt()
    q = torch.softmax(logits, dim=0)
    for _ in range(options.iterations):
        msg = torch.empty_like(q)
        qa, qs = q * n_app, q * n_smooth
        for s, e, k_app, k_smooth in blocks():
            msg[:, s:e] = (w1 * n_app[s:e] * (qa @ k_app.T) + w2 * n_smooth[s:e] * (qs @ k_smooth.T))
        q = torch.softmax(logits + msg, dim=0)
    return q


def check_crf_size(h: int, w: int, options: CRFOptions) -> None:
    """``ConfigError`` when the exact path (``window: null``) is asked for an image above
    ``max_pixels``."""
    if options.window is None and h * w > options.max_pixels:
        raise ConfigError(
            f"model.heads.semantic.crf: the exact fully connected CRF (window: null) on a {h}x{w} "
            f"image ({h * w} pixels) is over max_pixels={options.max_pixels} (O(pixels^2) time "
            "and memory); set crf.window to an odd size such as 11 (ConvCRF's truncated kernel) "
            "or raise crf.max_pixels")


def dense_crf_batch(unary_logits: torch.Tensor, images: torch.Tensor, options: CRFOptions) -> torch.Tensor:
    """Mean-field dense CRF for a batch.

    ``unary_logits``: N x C x H x W class scores (the unary energy is their negative);
    ``images``: N x 3 x H x W RGB, uint8 or float in 0..255, same H x W (positions are pixels
    of this grid, so pass the original image and logits pasted at its size). Returns N x C x H x W
    float32 probabilities (sum 1 over C) on the logits' device; CPU or CUDA.
    """
    if unary_logits.dim() != 4:
        raise ValueError(f"unary_logits: expected N x C x H x W, got {tuple(unary_logits.shape)}")
    n, _, h, w = unary_logits.shape
    if images.shape[0] != n or tuple(images.shape[-2:]) != (h, w):
        raise ValueError(f"images {tuple(images.shape)} do not match logits {tuple(unary_logits.shape)}")
    check_crf_size(h, w, options)
    logits = unary_logits.to(torch.float32)
    image = _as_image(images, logits.device)
    if options.appearance_weight == 0 and options.smoothness_weight == 0:
        return torch.softmax(logits, dim=1)
    if options.window is None:
        ys, xs = torch.meshgrid(torch.arange(h, device=logits.device, dtype=torch.float32),
                                torch.arange(w, device=logits.device, dtype=torch.float32), indexing="ij")
        pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)
        out = [_exact_inference(logits[i].reshape(logits.shape[1], -1),
                                (pos, image[i].reshape(3, -1).T.contiguous()), options)
               for i in range(n)]
        return torch.stack(out).reshape(logits.shape)
    r = options.window // 2
    return _window_inference(logits, image, options, (min(r, h - 1), min(r, w - 1)))


def dense_crf(unary_logits: torch.Tensor, image: torch.Tensor, options: CRFOptions) -> torch.Tensor:
    """``dense_crf_batch`` for one image: ``unary_logits`` C x H x W, ``image`` 3 x H x W (uint8
    or 0..255 float) -> C x H x W float32 probabilities."""
    return dense_crf_batch(unary_logits[None], image[None], options)[0]


def naive_dense_crf(unary_logits: np.ndarray | torch.Tensor, image: np.ndarray | torch.Tensor,
                    options: CRFOptions) -> np.ndarray:
    """Reference for the tests: Krahenbuhl and Koltun's Algorithm 1 written out, float64 NumPy,
    an explicit P x P matrix per kernel (P = H x W, a few hundred at most) and a C x C Potts
    matrix. ``window`` limits the pairs to ``max(|dy|, |dx|) <= window // 2``; ``normalization``
    as in ``CRFOptions``; ``max_pixels`` is ignored. ``unary_logits`` C x H x W, ``image``
    3 x H x W in 0..255 -> C x H x W."""
    U = -np.asarray(unary_logits, dtype=np.float64)
    img = np.asarray(image, dtype=np.float64)
    C, H, W = U.shape
    P = H * W
    coords = [(y, x) for y in range(H) for x in range(W)]
    colours = img.reshape(3, P).T
    k_app = np.zeros((P, P))
    k_smooth = np.zeros((P, P))
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            if i == j:
                continue
            if options.window is not None and max(abs(yi - yj), abs(xi - xj)) > options.window // 2:
                continue
            d2 = (yi - yj) ** 2 + (xi - xj) ** 2
            c2 = float(((colours[i] - colours[j]) ** 2).sum())
            k_app[i, j] = math.exp(-d2 / (2 * options.theta_alpha ** 2) - c2 / (2 * options.theta_beta ** 2))
            k_smooth[i, j] = math.exp(-d2 / (2 * options.theta_gamma ** 2))
    if options.normalization == "symmetric":  # densecrf's NORMALIZE_SYMMETRIC, self included
        for k in (k_app, k_smooth):
            np.fill_diagonal(k, 1.0)
            d = k.sum(axis=1)
            k /= np.sqrt(np.outer(d, d))
    mu = 1.0 - np.eye(C)  # Potts
    u = U.reshape(C, P).T  # P x C

    def normalise(energy: np.ndarray) -> np.ndarray:
        e = np.exp(-(energy - energy.min(axis=1, keepdims=True)))
        return e / e.sum(axis=1, keepdims=True)

    Q = normalise(u)
    for _ in range(options.iterations):
        filtered = options.appearance_weight * (k_app @ Q) + options.smoothness_weight * (k_smooth @ Q)
        pairwise = filtered @ mu.T  # sum_l' mu(l, l') * filtered(l')
        Q = normalise(u + pairwise)
    return Q.T.reshape(C, H, W)
