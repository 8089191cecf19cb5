"""Vectorised ray/primitive intersection in numpy.

Every ``intersect`` takes ray origins ``ro`` (Nx3 or a single 3-vector, broadcast) and *unit*
directions ``D`` (Nx3) and returns the distance ``t`` (N,) to the first surface hit in front of the
origin (``t > EPS``), ``inf`` where the ray misses. Every ``normal`` takes hit points ``P`` (Nx3)
and returns outward unit normals (Nx3). All primitives are closed convex solids, so a ray starting
outside one enters it at ``t`` and the outward normal there faces the ray (``dot(n, D) <= 0``).

Primitives know nothing about classes or instances; the scene attaches those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-6
INF = np.inf


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of Nx3 / 3-vector arguments."""
    if b.ndim == 1:
        return a @ b
    if a.ndim == 1:
        return b @ a
    return np.einsum("ij,ij->i", a, b)


def _first_root(b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Roots of ``t^2 + 2 b t + c = 0`` (unit-direction quadratics): (near, far), NaN-free.

    Misses give ``near = far = inf``."""
    disc = b * b - c
    hit = disc >= 0.0
    s = np.sqrt(np.where(hit, disc, 0.0))
    near = np.where(hit, -b - s, INF)
    far = np.where(hit, -b + s, INF)
    return near, far


@dataclass(frozen=True)
class Sphere:
    center: np.ndarray  # (3,)
    radius: float

    def intersect(self, ro: np.ndarray, D: np.ndarray) -> np.ndarray:
        oc = ro - self.center
        b = _dot(oc, D)
        c = _dot(oc, oc) - self.radius * self.radius
        near, _ = _first_root(b, np.broadcast_to(c, b.shape))
        return np.where(near > EPS, near, INF)

    def normal(self, P: np.ndarray) -> np.ndarray:
        return (P - self.center) / self.radius


@dataclass(frozen=True)
class Capsule:
    """All points within ``radius`` of the segment ``a``-``b`` (a sphere swept along it)."""

    a: np.ndarray  # (3,)
    b: np.ndarray  # (3,)
    radius: float

    def intersect(self, ro: np.ndarray, D: np.ndarray) -> np.ndarray:
        ba = self.b - self.a
        baba = float(ba @ ba)
        r = self.radius
        if baba <= 1e-12:
            return Sphere(self.a, r).intersect(ro, D)
        # the infinite cylinder around the segment's line; the capsule lies inside it
        oa = ro - self.a
        bard = D @ ba
        baoa = _dot(oa, ba) if oa.ndim > 1 else np.full_like(bard, float(oa @ ba))
        rdoa = _dot(D, oa)
        oaoa = _dot(oa, oa) if oa.ndim > 1 else float(oa @ oa)
        qa = baba - bard * bard
        qb = baba * rdoa - baoa * bard
        qc = baba * oaoa - baoa * baoa - r * r * baba
        disc = qb * qb - qa * qc
        axial = qa <= 1e-9 * baba  # ray (anti)parallel to the axis: only the end spheres
        ok = (disc >= 0.0) & ~axial
        t = np.where(ok, (-qb - np.sqrt(np.where(ok, disc, 0.0))) / np.where(ok, qa, 1.0), INF)
        y = baoa + t * bard
        side = ok & (y > 0.0) & (y < baba) & (t > EPS)
        out = np.where(side, t, INF)
        # a ray entering the (convex) capsule through its side enters nowhere else; any other ray
        # that touches the infinite cylinder can only enter through an end sphere
        rest = np.flatnonzero((ok & ~side) | axial)
        if len(rest):
            o_r = ro[rest] if ro.ndim > 1 else ro
            d_r = D[rest]
            out[rest] = np.minimum(Sphere(self.a, r).intersect(o_r, d_r),
                                   Sphere(self.b, r).intersect(o_r, d_r))
        return out

    def normal(self, P: np.ndarray) -> np.ndarray:
        ba = self.b - self.a
        baba = float(ba @ ba)
        if baba > 1e-12:
            h = np.clip((P - self.a) @ ba / baba, 0.0, 1.0)
            q = self.a + h[:, None] * ba
        else:
            q = self.a
        return (P - q) / self.radius


@dataclass(frozen=True)
class OrientedBox:
    center: np.ndarray  # (3,)
    half: np.ndarray  # (3,) half extents along the box axes
    rot: np.ndarray  # (3,3) columns = box axes in world coordinates

    def _local(self, ro: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (ro - self.center) @ self.rot, D @ self.rot

    def intersect(self, ro: np.ndarray, D: np.ndarray) -> np.ndarray:
        o, d = self._local(ro, D)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            t1 = (-self.half - o) * inv
            t2 = (self.half - o) * inv
        # a ray parallel to a slab: inside the slab -> (-inf, inf), outside -> empty
        par = d == 0.0
        inside = np.abs(o) <= self.half
        lo = np.where(par, np.where(inside, -INF, INF), np.minimum(t1, t2))
        hi = np.where(par, np.where(inside, INF, -INF), np.maximum(t1, t2))
        tnear = lo.max(-1)
        tfar = hi.min(-1)
        return np.where((tnear <= tfar) & (tnear > EPS), tnear, INF)

    def normal(self, P: np.ndarray) -> np.ndarray:
        p = (P - self.center) @ self.rot
        q = np.abs(p) / self.half  # the face hit is the axis where |p| reaches its half extent
        axis = q.argmax(-1)
        n = np.zeros_like(p)
        rows = np.arange(len(p))
        n[rows, axis] = np.sign(p[rows, axis])
        return n @ self.rot.T


@dataclass(frozen=True)
class Cylinder:
    """A capped cylinder: disc of ``radius`` around ``base`` swept ``height`` along unit ``axis``."""

    base: np.ndarray  # (3,)
    axis: np.ndarray  # (3,) unit
    radius: float
    height: float

    def intersect(self, ro: np.ndarray, D: np.ndarray) -> np.ndarray:
        a = self.axis
        r = self.radius
        ob = ro - self.base
        oz = ob @ a if ob.ndim > 1 else np.full(len(D), float(ob @ a))
        dz = D @ a
        op = ob - oz[:, None] * a if ob.ndim > 1 else ob[None, :] - oz[:, None] * a
        dp = D - dz[:, None] * a
        qa = _dot(dp, dp)
        qb = _dot(op, dp)
        qc = _dot(op, op) - r * r
        disc = qb * qb - qa * qc
        ok = (disc >= 0.0) & (qa > 1e-12)
        t = np.where(ok, (-qb - np.sqrt(np.where(ok, disc, 0.0))) / np.where(ok, qa, 1.0), INF)
        z = oz + t * dz
        best = np.where(ok & (t > EPS) & (z >= 0.0) & (z <= self.height), t, INF)
        # the two caps
        with np.errstate(divide="ignore", invalid="ignore"):
            for zc in (0.0, self.height):
                tc = (zc - oz) / dz
                pc = op + tc[:, None] * dp
                inside = (_dot(pc, pc) <= r * r) & (tc > EPS) & (dz != 0.0)
                best = np.minimum(best, np.where(inside, tc, INF))
        return best

    def normal(self, P: np.ndarray) -> np.ndarray:
        a = self.axis
        p = P - self.base
        z = p @ a
        radial = p - z[:, None] * a
        rn = np.sqrt(_dot(radial, radial))
        # distance to each face; the nearest face is the one hit
        d_side = np.abs(rn - self.radius)
        d_bot = np.abs(z)
        d_top = np.abs(z - self.height)
        side = radial / np.maximum(rn, 1e-12)[:, None]
        n = np.where((d_side <= np.minimum(d_bot, d_top))[:, None], side,
                     np.where((d_bot < d_top)[:, None], -a, a))
        return n


Primitive = Sphere | Capsule | OrientedBox | Cylinder


def translate(prim: Primitive, offset: np.ndarray) -> Primitive:
    """The same primitive moved by ``offset``."""
    if isinstance(prim, Sphere):
        return Sphere(prim.center + offset, prim.radius)
    if isinstance(prim, Capsule):
        return Capsule(prim.a + offset, prim.b + offset, prim.radius)
    if isinstance(prim, OrientedBox):
        return OrientedBox(prim.center + offset, prim.half, prim.rot)
    if isinstance(prim, Cylinder):
        return Cylinder(prim.base + offset, prim.axis, prim.radius, prim.height)
    raise TypeError(type(prim))


def ray_sphere_any(ro: np.ndarray, D: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of rays that touch a bounding sphere anywhere ahead (or start inside it)."""
    oc = ro - center
    b = _dot(oc, D)
    c = _dot(oc, oc) - radius * radius
    disc = b * b - c
    return (disc >= 0.0) & ((-b + np.sqrt(np.maximum(disc, 0.0))) > EPS)


def rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
