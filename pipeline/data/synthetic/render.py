"""Ray-cast a scene description into an image and exact labels for every task.

One ray per pixel centre (no anti-aliasing, so every label is exact at its pixel centre). Each
ray's first hit decides the class, instance, z-depth and normal of its pixel; the colour adds
procedural texture, Lambertian shading with shadows cast by the things, ambient light and sensor
noise.

Label rules:
- A thing with fewer than ``MIN_VISIBLE_PIXELS`` visible pixels is dropped: its pixels become
  ``IGNORE_INDEX`` in ``semantic`` and 0 in ``instance_ids`` (depth and normals stay valid).
- Keypoint visibility (COCO): 0 = behind the camera or projects outside the image (x = y = 0);
  2 = the first surface along the ray from the camera through the keypoint belongs to a body part
  that contains the keypoint, *and* the figure's mask touches the keypoint's pixel or one of its 8
  neighbours; 1 = otherwise (hidden by another thing or by another part of the same figure).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.data.card import IGNORE_INDEX
from pipeline.data.synthetic import spec
from pipeline.data.synthetic.geometry import ray_sphere_any
from pipeline.data.synthetic.scene import Room, SceneSpec, sample_scene

MIN_VISIBLE_PIXELS = 20
_SKY, _FLOOR, _WALL_X, _WALL_Y = 0, 1, 2, 3


@dataclass
class InstanceRecord:
    """One visible thing. ``instance_id`` is its value in ``RenderedScene.instance_ids``."""

    instance_id: int
    class_index: int
    category_id: int
    area: int  # visible pixels
    bbox: tuple[float, float, float, float]  # x, y, w, h of the visible part (COCO)
    keypoints: np.ndarray | None  # Kx3 float32 (x, y, visibility) for the figure, else None


@dataclass
class RenderedScene:
    image: np.ndarray  # HxWx3 uint8 RGB
    semantic: np.ndarray  # HxW uint8 class index, IGNORE_INDEX where a dropped thing is
    instance_ids: np.ndarray  # HxW int32, 0 = no (kept) thing, k = instances[k - 1]
    depth: np.ndarray  # HxW float32 z-depth in metres, 0 = unknown (sky)
    normals: np.ndarray  # HxWx3 float32 camera-frame unit normals (OpenCV), 0 = unknown (sky)
    instances: list[InstanceRecord]
    camera: dict[str, float]  # fx, fy, cx, cy, width, height


def render_scene(
    seed: int | np.random.SeedSequence | np.random.Generator, image_size: int = 128
) -> RenderedScene:
    """Sample a random scene from ``seed`` and render it at ``image_size`` x ``image_size``."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return render(sample_scene(rng, image_size), rng)


def _hash(a: np.ndarray, b: np.ndarray | float = 0.0) -> np.ndarray:
    return np.modf(np.abs(np.sin(a * 12.9898 + b * 78.233) * 43758.5453))[0]


def _room_hits(room: Room, ro: np.ndarray, D: np.ndarray):
    """Exit of each ray from the room box: (t, surface kind, room-frame hit point)."""
    o = room.rot.T @ ro
    d = D @ room.rot
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = np.where(d[:, 0] > 0, (room.xmax - o[0]) / d[:, 0],
                      np.where(d[:, 0] < 0, (room.xmin - o[0]) / d[:, 0], np.inf))
        ty = np.where(d[:, 1] > 0, (room.ymax - o[1]) / d[:, 1],
                      np.where(d[:, 1] < 0, (room.ymin - o[1]) / d[:, 1], np.inf))
        tz = np.where(d[:, 2] > 0, (room.height - o[2]) / d[:, 2],
                      np.where(d[:, 2] < 0, -o[2] / d[:, 2], np.inf))
    t = np.minimum(np.minimum(tx, ty), tz)
    kind = np.where(t == tz, np.where(d[:, 2] < 0, _FLOOR, _SKY),
                    np.where(t == tx, _WALL_X, _WALL_Y))
    return t, kind, o + t[:, None] * d


def _room_albedo(room: Room, kind: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Procedural texture of floor and walls at room-frame points ``p`` (Nx3)."""
    out = np.zeros((len(p), 3))
    f = kind == _FLOOR
    if f.any():
        x, y = p[f, 0], p[f, 1]
        s = room.floor_tile
        c0, c1 = room.floor_colors
        if room.floor_kind == 0:  # checker
            w = ((np.floor(x / s) + np.floor(y / s)) % 2)[:, None]
            col = c0 * (1 - w) + c1 * w
        else:  # staggered planks
            row = np.floor(y / (0.5 * s))
            col_i = np.floor((x + _hash(row, 3.0) * 3 * s) / (3 * s))
            w = _hash(row, col_i)[:, None]
            col = (c0 * (1 - w) + c1 * w) * (0.9 + 0.2 * _hash(col_i, row)[:, None])
            seam = np.modf(y / (0.5 * s))[0] < 0.06
            col[seam] *= 0.7
        grain = 1 + 0.05 * np.sin(x * 23.0 + 3 * np.sin(y * 5.0)) * np.sin(y * 17.0)
        out[f] = col * grain[:, None]
    w_ = (kind == _WALL_X) | (kind == _WALL_Y)
    if w_.any():
        s_ = np.where(kind[w_] == _WALL_X, p[w_, 1], p[w_, 0])
        z = p[w_, 2]
        c0, c1 = room.wall_colors
        t = room.wall_tile
        if room.wall_kind == 0:  # bricks
            row = np.floor(z / t)
            u = (s_ + (row % 2) * t) / (2 * t)
            col_i = np.floor(u)
            mortar = (np.modf(z / t)[0] < 0.08) | (np.modf(u)[0] < 0.04)
            col = c0 * (0.85 + 0.3 * _hash(row, col_i))[:, None]
            col[mortar] = c1 * 0.9
        elif room.wall_kind == 1:  # soft vertical stripes
            w = (0.5 + 0.5 * np.sin(s_ * np.pi / t))[:, None]
            col = c0 * (1 - w) + c1 * w
        else:  # plain paint, low-frequency blotches
            n = 0.06 * (np.sin(s_ * 2.1 + z * 1.3) + np.sin(s_ * 5.3 - z * 4.1))
            col = c0 * (1 + n)[:, None]
        out[w_] = col * (1 - 0.15 * np.exp(-z / 0.12))[:, None]  # darker near the floor
    return out


def _sky_color(room: Room, D: np.ndarray) -> np.ndarray:
    e = np.clip(D[:, 2] / 0.45, 0.0, 1.0)[:, None]
    az = np.arctan2(D[:, 1], D[:, 0])
    cloud = np.clip(np.sin(az * 7.0 + 4 * D[:, 2]) * np.sin(D[:, 2] * 25.0 + az * 3.0), 0, 1)
    col = room.sky_colors[0] * (1 - e) + room.sky_colors[1] * e
    return col * (1 - 0.25 * cloud[:, None]) + 0.25 * cloud[:, None]


@functools.lru_cache(maxsize=4)
def _pixel_rays(
    size: int, fx: float, fy: float, cx: float, cy: float
) -> tuple[np.ndarray, np.ndarray]:
    """Unit camera-frame rays through the pixel centres (row-major) and their z components
    (z-depth = distance along the ray * z component)."""
    jj, ii = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    dc = np.stack([(jj.ravel() + 0.5 - cx) / fx, (ii.ravel() + 0.5 - cy) / fy,
                   np.ones(size * size)], -1)
    norm = np.linalg.norm(dc, axis=1)
    d, z = dc / norm[:, None], 1.0 / norm
    d.flags.writeable = False
    z.flags.writeable = False
    return d, z


def render(scene: SceneSpec, rng: np.random.Generator) -> RenderedScene:
    cam = scene.camera
    S = cam.size
    d_cam, zscale = _pixel_rays(S, cam.fx, cam.fy, cam.cx, cam.cy)
    D = d_cam @ cam.rot.T
    ro = cam.position

    # -- first hits ---------------------------------------------------------------------------
    t_room, kind, p_room = _room_hits(scene.room, ro, D)
    t_best = np.where(kind == _SKY, np.inf, t_room)  # the open top hides nothing
    parts = [(k, p) for k, th in enumerate(scene.things) for p in th.parts]
    part_id = np.full(S * S, -1, dtype=np.int64)
    g = 0
    for th in scene.things:
        idx = np.flatnonzero(ray_sphere_any(ro, D, th.bound_center, th.bound_radius))
        for part in th.parts:
            if len(idx):
                t = part.prim.intersect(ro, D[idx])
                closer = t < t_best[idx]
                sel = idx[closer]
                t_best[sel] = t[closer]
                part_id[sel] = g
            g += 1
    owner = np.array([k for k, _ in parts] + [-1], dtype=np.int64)[part_id]  # -1: room
    is_thing = part_id >= 0
    sky = ~is_thing & (kind == _SKY)
    geo = ~sky
    P = ro + np.where(geo, t_best, 0.0)[:, None] * D

    # -- normals and albedo -------------------------------------------------------------------
    n_w = np.zeros((S * S, 3))
    albedo = np.zeros((S * S, 3))
    room_px = geo & ~is_thing
    n_room = np.zeros((int(room_px.sum()), 3))
    k_room = kind[room_px]
    d_room = D[room_px] @ scene.room.rot
    n_room[k_room == _FLOOR, 2] = 1.0
    wx = k_room == _WALL_X
    wy = k_room == _WALL_Y
    n_room[wx, 0] = -np.sign(d_room[wx, 0])
    n_room[wy, 1] = -np.sign(d_room[wy, 1])
    n_w[room_px] = n_room @ scene.room.rot.T
    albedo[room_px] = _room_albedo(scene.room, k_room, p_room[room_px])
    order = np.argsort(part_id, kind="stable")
    bounds = np.searchsorted(part_id[order], np.arange(len(parts) + 1))
    for gi, (_, part) in enumerate(parts):
        sel = order[bounds[gi]:bounds[gi + 1]]
        if len(sel) == 0:
            continue
        Ps = P[sel]
        n_w[sel] = part.prim.normal(Ps)
        tex = 1.0 + part.tex_amp * np.sin(Ps @ part.tex_freq + part.tex_phase)
        albedo[sel] = part.albedo * tex[:, None]
    # unit length, and facing the viewer (they do by construction; guard against round-off)
    n_w[geo] /= np.linalg.norm(n_w[geo], axis=1, keepdims=True)
    flip = (n_w * D).sum(1) > 0
    n_w[flip] *= -1

    # -- shading with shadows -----------------------------------------------------------------
    L = scene.light_dir
    ndl = np.clip(n_w @ L, 0.0, None)
    lit = np.flatnonzero(geo & (ndl > 0))
    if len(lit) and scene.things:
        ros = P[lit] + n_w[lit] * 1e-4
        Ds = np.broadcast_to(L, ros.shape)
        shadow = np.zeros(len(lit), dtype=bool)
        for th in scene.things:
            cand = np.flatnonzero(ray_sphere_any(ros, Ds, th.bound_center, th.bound_radius)
                                  & ~shadow)
            for part in th.parts:
                if len(cand) == 0:
                    break
                hit = np.isfinite(part.prim.intersect(ros[cand], Ds[cand]))
                shadow[cand[hit]] = True
                cand = cand[~hit]
        ndl[lit[shadow]] = 0.0
    light = scene.ambient + (1 - scene.ambient) * ndl[:, None] * scene.light_color
    color = albedo * light
    color[sky] = _sky_color(scene.room, D[sky])
    color = color * scene.gains + rng.normal(0.0, scene.noise_sigma, size=color.shape)
    image = np.clip(np.rint(color * 255.0), 0, 255).astype(np.uint8).reshape(S, S, 3)

    # -- labels -------------------------------------------------------------------------------
    n_things = len(scene.things)
    counts = np.bincount(owner[is_thing], minlength=n_things)
    kept = [k for k in range(n_things) if counts[k] >= MIN_VISIBLE_PIXELS]
    new_id = np.zeros(n_things + 1, dtype=np.int32)  # index owner + 1 (room -> 0)
    for i, k in enumerate(kept):
        new_id[k + 1] = i + 1
    instance_ids = new_id[owner + 1]
    thing_cls = np.array([th.class_index for th in scene.things] + [0], dtype=np.uint8)
    semantic = np.where(kind == _FLOOR, spec.FLOOR,
                        np.where(kind == _SKY, spec.SKY, spec.WALL)).astype(np.uint8)
    semantic[is_thing] = thing_cls[owner[is_thing]]
    semantic[is_thing & (instance_ids == 0)] = IGNORE_INDEX
    depth = np.where(geo, t_best * zscale, 0.0).astype(np.float32)
    normals = (n_w @ cam.rot).astype(np.float32)
    normals[sky] = 0.0

    instance_ids = instance_ids.reshape(S, S)
    figures = [k for k in kept if scene.things[k].keypoints is not None]
    keypoints = _keypoints(scene, figures, [kept.index(k) + 1 for k in figures], instance_ids)
    records = []
    for i, k in enumerate(kept):
        th = scene.things[k]
        ys, xs = np.nonzero(instance_ids == i + 1)
        bbox = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1))
        records.append(InstanceRecord(i + 1, th.class_index, spec.CLASSES[th.class_index].id,
                                      int(len(xs)), bbox, keypoints.get(k)))
    return RenderedScene(
        image=image,
        semantic=semantic.reshape(S, S),
        instance_ids=instance_ids,
        depth=depth.reshape(S, S),
        normals=normals.reshape(S, S, 3),
        instances=records,
        camera=spec.camera_for(S),
    )


def _keypoints(
    scene: SceneSpec, figures: list[int], ids: list[int], instance_ids: np.ndarray
) -> dict[int, np.ndarray]:
    """COCO keypoints (Kx3: x, y, visibility) of the things ``figures`` whose instance ids are
    ``ids`` (see the module docstring for the visibility rule)."""
    if not figures:
        return {}
    cam = scene.camera
    S = cam.size
    kp = np.concatenate([scene.things[k].keypoints for k in figures])  # type: ignore[misc]
    ro = cam.position
    vec = kp - ro
    D = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    # distance to every part along every keypoint ray: (parts, rays)
    owners = [k for k, th in enumerate(scene.things) for _ in th.parts]
    t_all = np.stack([p.prim.intersect(ro, D) for th in scene.things for p in th.parts])
    t_first = t_all.min(0)
    first_part = {k: owners.index(k) for k in figures}  # global index of each figure's part 0
    t_own = np.full(len(kp), np.inf)
    row = 0
    for k in figures:
        th = scene.things[k]
        for containing in th.keypoint_parts or []:
            for pi in containing:
                t_own[row] = min(t_own[row], t_all[first_part[k] + pi, row])
            row += 1
    uv, z = cam.project(kp)
    K = len(spec.KEYPOINT_NAMES)
    out: dict[int, np.ndarray] = {}
    for f, (k, iid) in enumerate(zip(figures, ids, strict=True)):
        res = np.zeros((K, 3), dtype=np.float32)
        for j in range(K):
            r = f * K + j
            u, v = uv[r]
            if not (z[r] > 0 and 0.0 <= u < S and 0.0 <= v < S):
                continue  # not labelled: (0, 0, 0)
            visible = np.isfinite(t_own[r]) and t_own[r] <= t_first[r] + 1e-7
            if visible:
                i0, j0 = int(v), int(u)
                window = instance_ids[max(i0 - 1, 0):i0 + 2, max(j0 - 1, 0):j0 + 2]
                visible = bool((window == iid).any())
            res[j] = (u, v, 2.0 if visible else 1.0)
        out[k] = res
    return out
