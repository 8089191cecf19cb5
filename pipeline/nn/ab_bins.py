"""The quantised ab gamut and the colour-distribution machinery of Zhang, Isola and Efros,
"Colorful Image Colorization" (ECCV 2016), in pure torch.

Contract:

- ab values are the a*, b* channels of CIE Lab (``pipeline.data.color``), in ab units (roughly
  -128..127). Maps are channels first: ``B x 2 x h x w``; distributions ``B x Q x h x w``.
- ``ab_gamut(grid)``: the Q bin centres (``Q x 2``, float32, sorted by a then b) of the ``grid``-wide
  cells of the ab plane reached by 8-bit sRGB colours. Cell ``(i, j)`` is centred on
  ``(i * grid, j * grid)`` and holds the ab values that round to it. With the default grid of 10,
  **Q = 261** (Zhang's set, measured on ImageNet with their own gamut test, has 313; ours is the
  sRGB gamut's, the same for every dataset).
- ``nearest_bin``, ``soft_encode``: hard and soft (Gaussian on the 5 nearest centres, sigma 5)
  encodings of ab maps (Zhang sec. 2.1), chunked over pixels so memory stays bounded.
- ``annealed_mean``: Zhang's annealed-mean decoding, ``f_T(z) = softmax(log softmax(z) / T)``, then
  the expectation of the bin centres: ``T = 1`` is the distribution's mean, ``T -> 0`` its mode.
- ``RebalancingPrior``: class rebalancing (Zhang eq. 3-4) from bin counts accumulated online.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.color import rgb_to_lab

GRID = 10.0
"""Zhang's bin width in ab units."""
NEIGHBOURS = 5
SIGMA = 5.0
"""Soft-encoding neighbours and Gaussian width (ab units), Zhang sec. 2.1."""
TEMPERATURE = 0.38
"""Zhang's annealed-mean temperature (sec. 2.3)."""
_CHUNK = 65536  # pixels per cdist block: 65536 x Q float32 (~70 MB at Q = 261)
_INTERIOR_STEP = 3  # 8-bit levels between interior samples of the sRGB cube


def _srgb_samples() -> torch.Tensor:
    """Deterministic 8-bit sRGB colours in [0, 1] (``N x 3`` float64): the cube's six faces at
    every 8-bit level (the ab projection of the gamut is bounded by them) plus its interior
    every ``_INTERIOR_STEP`` levels. For grid 10 this reaches exactly the cells of all 256^3
    colours (261; the continuous gamut reaches one more, (20, -80), by a sliver)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    g, b = torch.meshgrid(levels, levels, indexing="ij")
    faces = []
    for value in (0.0, 1.0):
        for axis in range(3):
            cols = [g.reshape(-1), b.reshape(-1)]
            cols.insert(axis, torch.full((g.numel(),), value, dtype=torch.float64))
            faces.append(torch.stack(cols, dim=-1))
    inner = torch.arange(0, 256, _INTERIOR_STEP, dtype=torch.float64) / 255.0
    cube = torch.stack(torch.meshgrid(inner, inner, inner, indexing="ij"), dim=-1).reshape(-1, 3)
    return torch.cat([*faces, cube])


@functools.lru_cache(maxsize=8)
def _gamut(grid: float) -> torch.Tensor:
    ab = rgb_to_lab(_srgb_samples())[:, 1:]
    cells = torch.unique(torch.round(ab / grid).to(torch.int64), dim=0)  # sorted by a, then b
    return (cells.to(torch.float64) * grid).to(torch.float32)


def ab_gamut(grid: float = GRID) -> torch.Tensor:
    """``Q x 2`` float32 bin centres (ab units) of the ``grid``-wide cells that 8-bit sRGB colours
    reach (Q = 261 for grid 10). Computed once per grid and cached; returns a copy."""
    if not grid > 0:
        raise ValueError(f"grid: expected > 0 ab units, got {grid}")
    return _gamut(float(grid)).clone()


def _pixels(ab: torch.Tensor, name: str = "ab") -> torch.Tensor:
    """``B x 2 x h x w`` -> ``(B*h*w) x 2`` float32."""
    if ab.ndim != 4 or ab.shape[1] != 2:
        raise ValueError(f"{name}: expected B x 2 x h x w, got shape {tuple(ab.shape)}")
    return ab.float().permute(0, 2, 3, 1).reshape(-1, 2)


def nearest_bin(ab: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for every pixel of ``ab`` (``B x 2 x h x w``) -> ``B x h x w``
    int64 (ties: the lower index)."""
    flat = _pixels(ab)
    c = centres.to(flat)
    out = torch.cat([torch.cdist(flat[i:i + _CHUNK], c).argmin(dim=1)
                     for i in range(0, flat.shape[0], _CHUNK)]) if flat.numel() else \
        torch.zeros(0, dtype=torch.int64, device=flat.device)
    return out.view(ab.shape[0], ab.shape[2], ab.shape[3])


def soft_encode(ab: torch.Tensor, centres: torch.Tensor, *, neighbours: int = NEIGHBOURS,
                sigma: float = SIGMA) -> torch.Tensor:
    """Zhang's soft encoding: ``B x 2 x h x w`` ab -> ``B x Q x h x w`` float32 distribution with
    weights ``exp(-d^2 / (2 sigma^2))`` on the ``neighbours`` nearest centres (distance ``d``),
    normalised to sum 1 per pixel; 0 elsewhere."""
    if not sigma > 0 or neighbours < 1:
        raise ValueError(f"soft_encode: expected sigma > 0 and neighbours >= 1, got {sigma}, {neighbours}")
    flat = _pixels(ab)
    c = centres.to(flat)
    k = min(int(neighbours), c.shape[0])
    out = flat.new_zeros(flat.shape[0], c.shape[0])
    for i in range(0, flat.shape[0], _CHUNK):
        d, idx = torch.cdist(flat[i:i + _CHUNK], c).topk(k, dim=1, largest=False)
        w = torch.exp(-(d * d) / (2.0 * sigma * sigma))
        out[i:i + _CHUNK].scatter_(1, idx, w / w.sum(dim=1, keepdim=True))
    b, _, h, w_ = ab.shape
    return out.view(b, h, w_, c.shape[0]).permute(0, 3, 1, 2)


def annealed_mean(logits: torch.Tensor, centres: torch.Tensor,
                  temperature: float = TEMPERATURE) -> torch.Tensor:
    """Annealed-mean point estimate: ``B x Q x h x w`` logits -> ``B x 2 x h x w`` float32 ab,
    ``sum_q f_T(z)_q * centre_q`` with ``f_T(z) = softmax(log softmax(z) / T)``."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if logits.ndim != 4 or logits.shape[1] != centres.shape[0]:
        raise ValueError(f"logits: expected B x {centres.shape[0]} x h x w, got {tuple(logits.shape)}")
    p = torch.softmax(torch.log_softmax(logits.float(), dim=1) / temperature, dim=1)
    return torch.einsum("bqhw,qc->bchw", p, centres.to(p))


def smoothing_kernel(centres: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """``Q x Q`` Gaussian kernel over the centres, rows normalised: ``p @ K`` spreads each bin's
    mass over its neighbours and keeps the total."""
    d2 = torch.cdist(centres.double(), centres.double()) ** 2
    k = torch.exp(-d2 / (2.0 * sigma * sigma))
    return k / k.sum(dim=1, keepdim=True)


class RebalancingPrior(nn.Module):
    """Empirical distribution of the ground-truth ab bins and the class-rebalancing weights.

    Zhang estimate the prior once on ImageNet before training; here it is estimated online from
    the training targets as they stream: ``update(bins)`` adds the nearest-bin indices of a
    batch's targets to ``counts`` (a persistent int64 buffer of Q counts, so a checkpoint carries
    it and a resumed run continues exactly). Counts change only in training mode, so evaluation
    never moves the prior. Before any count the weights are uniform (all 1)."""

    counts: torch.Tensor
    centres: torch.Tensor

    def __init__(self, centres: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centres", centres.detach().float().clone(), persistent=False)
        self.register_buffer("counts", torch.zeros(centres.shape[0], dtype=torch.int64))

    @property
    def num_bins(self) -> int:
        return int(self.counts.shape[0])

    @torch.no_grad()
    def update(self, bins: torch.Tensor) -> None:
        """Count the bin indices ``bins`` (any shape, int64 in [0, Q)); a no-op in eval mode."""
        if not self.training or bins.numel() == 0:
            return
        self.counts += torch.bincount(bins.reshape(-1).to(self.counts.device), minlength=self.num_bins)

    def probabilities(self, sigma: float = SIGMA) -> torch.Tensor:
        """Q float64: the counts normalised, then smoothed with a Gaussian of ``sigma`` ab units
        (uniform before any count)."""
        total = int(self.counts.sum())
        if total == 0:
            return torch.full((self.num_bins,), 1.0 / self.num_bins, dtype=torch.float64,
                              device=self.counts.device)
        p = self.counts.double() / total
        smoothed = p @ smoothing_kernel(self.centres, sigma)
        return smoothed / smoothed.sum()

    @torch.no_grad()
    def weights(self, lam: float = 0.5, sigma: float = SIGMA) -> torch.Tensor:
        """Q float32 rebalancing weights ``w ∝ 1 / ((1 - lam) p + lam / Q)`` with ``p`` the smoothed
        prior, normalised so that ``sum_q p_q w_q = 1`` (Zhang eq. 4). All 1 before any count
        and for ``lam = 1``."""
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam: expected a value in [0, 1], got {lam}")
        q = self.num_bins
        if int(self.counts.sum()) == 0:
            return torch.ones(q, device=self.counts.device)
        p = self.probabilities(sigma)
        w = 1.0 / ((1.0 - lam) * p + lam / q)
        return (w / (p * w).sum()).float()


def pool_ab(ab: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool ``B x 2 x H x W`` ab to ``size`` (area interpolation: exact block means when
    ``H, W`` are multiples of ``size``)."""
    if tuple(ab.shape[-2:]) == tuple(size):
        return ab
    return F.adaptive_avg_pool2d(ab, size)
