"""Exact colour conversions: sRGB (D65) <-> CIE XYZ <-> CIE L*a*b* (D65 white).

Contract:

- Input: float sRGB in [0, 1] (gamma-encoded, as stored in image files) or L*a*b* with L in [0, 100]
  and a, b roughly in [-128, 127]; numpy array or torch tensor. Channels last (``...x3``) by default;
  ``channels_first=True`` means axis -3 holds the channels (``3xHxW`` or ``Nx3xHxW``).
- Output: float64, same type, layout and shape as the input (a numpy array for numpy input; a tensor on
  the input's device for torch input, differentiable). Cast with ``.astype`` / ``.float()`` if needed.
- sRGB companding: IEC 61966-2-1 piecewise function, ``c / 12.92`` for ``c <= 0.04045`` else
  ``((c + 0.055) / 1.055) ** 2.4``. The standard curve jumps by 2.3e-9 at the knee (the linear branch
  ends at 0.0031308050, the power branch starts at 0.0031308073), so the encoding direction switches
  in the middle of that gap: decode then encode is exact up to float rounding, knee included. Values
  outside [0, 1] (out-of-gamut colours from ``lab_to_rgb``) are handled by odd extension,
  ``f(-c) = -f(c)``, so nothing turns NaN; pass ``clip=True`` to ``lab_to_rgb`` to clip to [0, 1].
- Linear sRGB -> XYZ: the sRGB primaries/D65 matrix (Lindbloom), its exact inverse for XYZ -> RGB.
- XYZ -> Lab: reference white D65 ``(0.95047, 1.0, 1.08883)``, CIE ``epsilon = 216 / 24389`` and
  ``kappa = 24389 / 27`` (the exact rational constants, so both branches meet continuously).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
"""Linear sRGB -> CIE XYZ (D65), rows X, Y, Z."""

D65_WHITE = (0.95047, 1.0, 1.08883)
"""Reference white (Xn, Yn, Zn) of the CIE Lab conversion."""

CIE_EPSILON = 216.0 / 24389.0
CIE_KAPPA = 24389.0 / 27.0

SRGB_DECODE_KNEE = 0.04045
_SRGB_ENCODE_KNEE = 0.5 * (SRGB_DECODE_KNEE / 12.92 + ((SRGB_DECODE_KNEE + 0.055) / 1.055) ** 2.4)


def _channels_last(t: torch.Tensor, name: str, channels_first: bool) -> torch.Tensor:
    """``t`` (any dtype) with its 3 channels on the last axis; a one-line error naming ``name``
    and the expected layout otherwise."""
    axis = -3 if channels_first else -1
    if t.ndim < (3 if channels_first else 1) or t.shape[axis] != 3:
        layout = "3xHxW or Nx3xHxW (channels_first=True)" if channels_first else "...x3 (channels last)"
        raise ValueError(f"{name}: expected {layout}, got shape {tuple(t.shape)}")
    return t.movedim(-3, -1) if channels_first else t


def _to_tensor(x: Any, name: str, channels_first: bool) -> tuple[torch.Tensor, bool]:
    """``(float64 tensor with channels last, was_numpy)``; checks the channel axis."""
    was_numpy = not isinstance(x, torch.Tensor)
    try:
        t = torch.as_tensor(np.asarray(x, dtype=np.float64)) if was_numpy else x.to(torch.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric array or tensor, got {type(x).__name__}") from exc
    return _channels_last(t, name, channels_first), was_numpy


def _from_tensor(t: torch.Tensor, was_numpy: bool, channels_first: bool) -> Any:
    if channels_first:
        t = t.movedim(-1, -3)
    return t.numpy() if was_numpy else t


def _matrix(rows: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(rows, dtype=torch.float64, device=like.device)


def srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    """IEC 61966-2-1 decoding (gamma-encoded -> linear), odd-extended below 0."""
    a = c.abs()
    power = ((a.clamp_min(SRGB_DECODE_KNEE) + 0.055) / 1.055) ** 2.4
    lin = torch.where(a <= SRGB_DECODE_KNEE, a / 12.92, power)
    return torch.copysign(lin, c)


def linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    """IEC 61966-2-1 encoding (linear -> gamma-encoded), odd-extended below 0."""
    a = c.abs()
    enc = torch.where(
        a <= _SRGB_ENCODE_KNEE, a * 12.92, 1.055 * a.clamp_min(_SRGB_ENCODE_KNEE) ** (1 / 2.4) - 0.055
    )
    return torch.copysign(enc, c)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(
        t > CIE_EPSILON, t.clamp_min(CIE_EPSILON) ** (1.0 / 3.0), (CIE_KAPPA * t + 16.0) / 116.0
    )


def _lab_f_inv(f: torch.Tensor) -> torch.Tensor:
    f3 = f**3
    return torch.where(f3 > CIE_EPSILON, f3, (116.0 * f - 16.0) / CIE_KAPPA)


def rgb_to_xyz(rgb: Any, *, channels_first: bool = False) -> Any:
    """sRGB in [0, 1] -> CIE XYZ (D65, Y of white = 1)."""
    t, was_numpy = _to_tensor(rgb, "rgb", channels_first)
    xyz = srgb_to_linear(t) @ _matrix(SRGB_TO_XYZ, t).T
    return _from_tensor(xyz, was_numpy, channels_first)


def xyz_to_rgb(xyz: Any, *, channels_first: bool = False, clip: bool = False) -> Any:
    """CIE XYZ (D65) -> sRGB (not clipped unless ``clip``: out-of-gamut values leave [0, 1])."""
    t, was_numpy = _to_tensor(xyz, "xyz", channels_first)
    rgb = linear_to_srgb(t @ torch.linalg.inv(_matrix(SRGB_TO_XYZ, t)).T)
    if clip:
        rgb = rgb.clamp(0.0, 1.0)
    return _from_tensor(rgb, was_numpy, channels_first)


def xyz_to_lab(xyz: Any, *, channels_first: bool = False) -> Any:
    """CIE XYZ -> CIE L*a*b* relative to ``D65_WHITE``."""
    t, was_numpy = _to_tensor(xyz, "xyz", channels_first)
    f = _lab_f(t / _matrix(D65_WHITE, t))
    fx, fy, fz = f.unbind(-1)
    lab = torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-1)
    return _from_tensor(lab, was_numpy, channels_first)


def lab_to_xyz(lab: Any, *, channels_first: bool = False) -> Any:
    """CIE L*a*b* (D65 white) -> CIE XYZ."""
    t, was_numpy = _to_tensor(lab, "lab", channels_first)
    L, a, b = t.unbind(-1)
    fy = (L + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = fy - b / 200.0
    # For Y the CIE uses L itself: L > kappa * epsilon (= 8) <=> fy^3 > epsilon, the same split.
    xyz = _lab_f_inv(torch.stack((fx, fy, fz), dim=-1)) * _matrix(D65_WHITE, t)
    return _from_tensor(xyz, was_numpy, channels_first)


def rgb_to_lab(rgb: Any, *, channels_first: bool = False) -> Any:
    """sRGB in [0, 1] -> CIE L*a*b* (D65): white -> (100, 0, 0), black -> (0, 0, 0)."""
    return xyz_to_lab(rgb_to_xyz(rgb, channels_first=channels_first), channels_first=channels_first)


@functools.lru_cache(maxsize=4)
def _srgb8_linear(device: str) -> torch.Tensor:
    """The 256 linear values of the 8-bit sRGB levels (``srgb_to_linear(level / 255)``, float64)."""
    return srgb_to_linear(torch.arange(256, dtype=torch.float64, device=device) / 255.0)


def srgb8_to_lab(image: torch.Tensor, *, channels_first: bool = False) -> torch.Tensor:
    """8-bit sRGB (a uint8 tensor) -> CIE L*a*b* float64, the same values as
    ``rgb_to_lab(image / 255)`` with the gamma decoding read from a 256-entry table (2x faster)."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        got = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image: expected a uint8 tensor, got {got}")
    rgb = _channels_last(image, "image", channels_first)
    linear = _srgb8_linear(str(image.device))[rgb.long()]
    lab = xyz_to_lab(linear @ _matrix(SRGB_TO_XYZ, linear).T)
    return lab.movedim(-1, -3) if channels_first else lab


def lab_to_rgb(lab: Any, *, channels_first: bool = False, clip: bool = False) -> Any:
    """CIE L*a*b* (D65) -> sRGB; out-of-gamut colours leave [0, 1] unless ``clip=True``."""
    xyz = lab_to_xyz(lab, channels_first=channels_first)
    return xyz_to_rgb(xyz, channels_first=channels_first, clip=clip)
