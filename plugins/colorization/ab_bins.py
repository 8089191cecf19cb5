"""The quantised ab gamut and the colour-distribution machinery of Zhang, Isola and Efros,
"Colorful Image Colorization" (ECCV 2016), in pure torch.

Contract:

- ab values are the a*, b* channels of CIE Lab (``plugins.colorization.color``), in ab units (roughly
  -128..127). Maps are channels first: ``B x 2 x h x w``; distributions ``B x Q x h x w``.
- ``ab_gamut(grid)``: the Q bin centres (``Q x 2``, float32, sorted by a then b) of the ``grid``-wide
  cells of the ab plane reached by 8-bit sRGB colours. Cell ``(i, j)`` is centred on
  ``(i * grid, j * grid)`` and holds the ab values that round to it. With the default grid of 10,
  **Q = 261** (Zhang's set, measured on ImageNet with their own gamut test, has 313; ours is the
  sRGB gamut's, the same for every dataset).
- ``nearest_centres``, ``nearest_bin``, ``soft_targets`` / ``soft_encode``: the k nearest centres,
  the hard encoding and the soft one (Gaussian on the 5 nearest centres, sigma 5; sparse or dense)
  of ab maps (Zhang sec. 2.1); ``soft_cross_entropy``: Zhang's loss on the sparse encoding.
- ``annealed_mean``: Zhang's annealed-mean decoding, ``f_T(z) = softmax(log softmax(z) / T)``, then
  the expectation of the bin centres: ``T = 1`` is the distribution's mean, ``T -> 0`` its mode.
- ``RebalancingPrior``: class rebalancing (Zhang eq. 3-4) from bin counts accumulated online.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plugins.colorization.color import rgb_to_lab

GRID = 10.0
"""Zhang's bin width in ab units."""
NEIGHBOURS = 5
SIGMA = 5.0
"""Soft-encoding neighbours and Gaussian width (ab units), Zhang sec. 2.1."""
TEMPERATURE = 0.38
"""Zhang's annealed-mean temperature (sec. 2.3)."""
_CHUNK = 16384  # pixels per exhaustive-search block: 16384 x Q x 2 float32 (~34 MB at Q = 261)
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


_SEARCH = 2
"""Lattice cells searched on each side of a pixel's own cell by ``nearest_centres``."""


@dataclass(frozen=True)
class NearestCentres:
    """The ``k`` nearest bin centres of every pixel, nearest first (for ``k = 1`` ties go to the
    lower index; for ``k > 1`` equally distant centres come in ``topk``'s order):
    ``index`` ``B x k x h x w`` int64, ``distance`` ``B x k x h x w`` float32 (ab units)."""

    index: torch.Tensor
    distance: torch.Tensor


@dataclass(frozen=True)
class _Lattice:
    """Centres that sit on the square lattice ``grid * (i, j)``: ``table[i - i0, j - j0]`` is the
    index of the centre of cell ``(i, j)`` or -1, padded by ``_SEARCH`` empty cells on each side."""

    grid: float
    table: torch.Tensor
    i0: int
    j0: int


def _lattice(centres: torch.Tensor) -> _Lattice | None:
    """The lattice the centres lie on, or None (not on one square lattice, repeated, or not in
    lattice order)."""
    if centres.ndim != 2 or centres.shape[1] != 2 or centres.shape[0] < 2:
        return None
    c = centres.detach().double().cpu()
    steps = torch.cat([torch.unique(c[:, 0]).diff(), torch.unique(c[:, 1]).diff()])
    if steps.numel() == 0:
        return None
    grid = float(steps.min())
    cells = torch.round(c / grid)
    if not torch.allclose(cells * grid, c, rtol=0.0, atol=1e-4 * grid):
        return None
    cells = cells.to(torch.int64)
    lo = cells.min(dim=0).values - _SEARCH
    shape = (cells.max(dim=0).values - lo + 1 + _SEARCH).tolist()
    table = torch.full(shape, -1, dtype=torch.int64)
    table[cells[:, 0] - lo[0], cells[:, 1] - lo[1]] = torch.arange(c.shape[0])
    if int((table >= 0).sum()) != c.shape[0] or not bool((table[table >= 0].diff() > 0).all()):
        return None  # a repeated centre, or centres not sorted like the lattice (by a, then b)
    return _Lattice(grid=grid, table=table.to(centres.device), i0=int(lo[0]), j0=int(lo[1]))


def _all_centres(flat: torch.Tensor, c: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive search: the ``k`` nearest centres of ``N x 2`` pixels, ascending (N x k distances,
    N x k indices; chunked over pixels)."""
    dists, idxs = [], []
    for i in range(0, flat.shape[0], _CHUNK):
        block = flat[i:i + _CHUNK]
        d2 = ((block[:, None, :] - c[None]) ** 2).sum(dim=-1)
        if k == 1:  # argmin: ties go to the lower index
            idx = d2.argmin(dim=1, keepdim=True)
            d2 = torch.gather(d2, 1, idx)
        else:
            d2, idx = d2.topk(k, dim=1, largest=False, sorted=True)
        dists.append(d2.sqrt())
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)


def _lattice_search(flat: torch.Tensor, lattice: _Lattice, c: torch.Tensor,
                    k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(2 _SEARCH + 1)^2`` lattice cells around each pixel's own cell; exact where the k-th
    distance is below ``(_SEARCH + 0.5) * grid`` (every cell outside the block is at least that far),
    the rest by the exhaustive search. Candidates run in index order (the centres are sorted like
    the lattice), so ``argmin`` gives ties to the lower index as the exhaustive search does."""
    g = lattice.grid
    offsets = torch.arange(-_SEARCH, _SEARCH + 1, device=flat.device)
    di, dj = (o.reshape(1, -1) for o in torch.meshgrid(offsets, offsets, indexing="ij"))
    own = torch.round(flat / g)
    rest = flat - own * g  # offset from the own cell's centre, |.| <= g / 2
    own = own.to(torch.int64)
    i = (own[:, :1] + di - lattice.i0).clamp(0, lattice.table.shape[0] - 1)
    j = (own[:, 1:] + dj - lattice.j0).clamp(0, lattice.table.shape[1] - 1)
    cand = lattice.table[i, j]  # N x 25, -1 = no centre
    d2 = (rest[:, :1] - g * di) ** 2 + (rest[:, 1:] - g * dj) ** 2
    d2 = d2.masked_fill(cand < 0, float("inf"))
    if k == 1:
        pos = d2.argmin(dim=1, keepdim=True)
        d2 = torch.gather(d2, 1, pos)
    else:
        d2, pos = d2.topk(k, dim=1, largest=False, sorted=True)
    dist, idx = d2.sqrt(), torch.gather(cand, 1, pos)
    unsure = ~(dist[:, -1] < (_SEARCH + 0.5) * g)
    if bool(unsure.any()):
        rows = torch.nonzero(unsure).flatten()
        dist[rows], idx[rows] = _all_centres(flat[rows], c, k)
    return dist, idx


def nearest_centres(ab: torch.Tensor, centres: torch.Tensor, k: int = 1) -> NearestCentres:
    """The ``k`` nearest of ``centres`` (``Q x 2``) to every pixel of ``ab`` (``B x 2 x h x w``),
    exact Euclidean distances. Centres on a square lattice (``ab_gamut``) are searched in each
    pixel's 5 x 5 cell neighbourhood (the exhaustive search's answer; with k = 5 on 8192 pixels
    and Q = 261, 8 ms against 26 ms on 2 CPU threads); other centres exhaustively."""
    flat = _pixels(ab)
    c = centres.to(flat)
    k = min(int(k), c.shape[0])
    if k < 1:
        raise ValueError(f"nearest_centres: expected k >= 1, got {k}")
    b, _, h, w = ab.shape
    if flat.shape[0] == 0:
        empty = flat.new_zeros(b, k, h, w)
        return NearestCentres(index=empty.to(torch.int64), distance=empty)
    lattice = _lattice(c)
    dist, idx = _lattice_search(flat, lattice, c, k) if lattice is not None else _all_centres(flat, c, k)
    return NearestCentres(index=idx.view(b, h, w, k).permute(0, 3, 1, 2),
                          distance=dist.view(b, h, w, k).permute(0, 3, 1, 2))


def nearest_bin(ab: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for every pixel of ``ab`` (``B x 2 x h x w``) -> ``B x h x w``
    int64 (ties: the lower index)."""
    return nearest_centres(ab, centres, 1).index[:, 0]


@dataclass(frozen=True)
class SoftTargets:
    """Zhang's soft encoding, sparse: the ``neighbours`` nearest bins of each pixel (``index``,
    ``B x k x h x w`` int64, nearest first) and their weights (``weight``, same shape, float32,
    summing to 1 over k). ``index[:, 0]`` is the nearest bin."""

    index: torch.Tensor
    weight: torch.Tensor


def soft_targets(ab: torch.Tensor, centres: torch.Tensor, *, neighbours: int = NEIGHBOURS,
                 sigma: float = SIGMA) -> SoftTargets:
    """Zhang's soft encoding of ``B x 2 x h x w`` ab: weights ``exp(-d^2 / (2 sigma^2))`` on the
    ``neighbours`` nearest centres (distance ``d``), normalised to sum 1 per pixel."""
    if not sigma > 0 or neighbours < 1:
        raise ValueError(f"soft_targets: expected sigma > 0 and neighbours >= 1, got {sigma}, {neighbours}")
    near = nearest_centres(ab, centres, neighbours)
    # shifted by the nearest distance: the same normalised weights, and no underflow to 0 / 0 far
    # outside the gamut
    d2 = near.distance**2 - near.distance[:, :1] ** 2
    w = torch.exp(-d2 / (2.0 * sigma * sigma))
    return SoftTargets(index=near.index, weight=w / w.sum(dim=1, keepdim=True))


def soft_encode(ab: torch.Tensor, centres: torch.Tensor, *, neighbours: int = NEIGHBOURS,
                sigma: float = SIGMA) -> torch.Tensor:
    """Zhang's soft encoding, dense: ``B x 2 x h x w`` ab -> ``B x Q x h x w`` float32 distribution
    (``soft_targets`` scattered; 0 off the ``neighbours`` nearest centres)."""
    soft = soft_targets(ab, centres, neighbours=neighbours, sigma=sigma)
    b, _, h, w = ab.shape
    out = soft.weight.new_zeros(b, centres.shape[0], h, w)
    return out.scatter_(1, soft.index, soft.weight)


def soft_cross_entropy(logits: torch.Tensor, soft: SoftTargets) -> torch.Tensor:
    """Zhang eq. 2 per pixel, ``-sum_q Z_q log softmax(logits)_q`` for ``B x Q x h x w`` logits and
    sparse targets -> ``B x h x w``; computed as ``logsumexp - sum_k w_k logits[index_k]`` (the
    weights sum to 1), without the dense ``B x Q x h x w`` target."""
    picked = torch.gather(logits, 1, soft.index.to(logits.device))
    return torch.logsumexp(logits, dim=1) - (soft.weight.to(picked) * picked).sum(dim=1)


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
