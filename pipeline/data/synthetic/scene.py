"""Random scene descriptions: a room, a camera, a light and 3-6 things standing on the floor.

World frame: z up, floor at z = 0, metres. The camera sits above the world origin inside a
rectangular room (walls of finite height, open to the sky). Camera axes follow OpenCV: x right,
y down, z forward; ``Camera.rot`` holds them as columns in world coordinates.

Sampling only draws numbers from the generator it is given, so a scene is a pure function of its
seed.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field, replace

import numpy as np

from pipeline.data.synthetic import spec
from pipeline.data.synthetic.geometry import (
    Capsule,
    Cylinder,
    OrientedBox,
    Primitive,
    Sphere,
    rotation_z,
    translate,
)


@dataclass(frozen=True)
class Camera:
    position: np.ndarray  # (3,) world
    rot: np.ndarray  # (3,3) columns: camera x (right), y (down), z (forward) in world coordinates
    fx: float
    fy: float
    cx: float
    cy: float
    size: int

    def to_camera(self, P: np.ndarray) -> np.ndarray:
        """World points (Nx3) -> camera-frame points (Nx3)."""
        return (P - self.position) @ self.rot

    def project(self, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points -> (pixel coordinates Nx2 (x, y), z-depth N). Pixel (i, j) spans [j, j+1)."""
        pc = self.to_camera(P)
        z = pc[:, 2]
        zs = np.where(z > 1e-9, z, 1e-9)
        uv = np.stack([self.fx * pc[:, 0] / zs + self.cx, self.fy * pc[:, 1] / zs + self.cy], -1)
        return uv, z


@dataclass(frozen=True)
class Part:
    """One primitive of a thing, with its surface colour and a mild sinusoidal texture."""

    prim: Primitive
    albedo: np.ndarray  # (3,) RGB in [0, 1]
    tex_freq: np.ndarray  # (3,) world-space frequency (radians per metre)
    tex_phase: float
    tex_amp: float


@dataclass
class Thing:
    """A thing built around the world origin, then ``moved`` to its place on the floor."""

    class_index: int
    parts: list[Part]
    bound_center: np.ndarray  # (3,) bounding sphere of all parts
    bound_radius: float
    footprint: tuple[float, float, float]  # (x, y, radius) on the floor, for placement
    keypoints: np.ndarray | None = None  # (K,3) world points
    keypoint_parts: list[list[int]] | None = None  # per keypoint: indices of parts containing it

    def moved(self, x: float, y: float) -> Thing:
        off = np.array([x, y, 0.0])
        return Thing(
            class_index=self.class_index,
            parts=[replace(p, prim=translate(p.prim, off)) for p in self.parts],
            bound_center=self.bound_center + off,
            bound_radius=self.bound_radius,
            footprint=(self.footprint[0] + x, self.footprint[1] + y, self.footprint[2]),
            keypoints=None if self.keypoints is None else self.keypoints + off,
            keypoint_parts=self.keypoint_parts,
        )


@dataclass(frozen=True)
class Room:
    rot: np.ndarray  # (3,3) room axes (rotation about z) in world coordinates
    xmin: float
    xmax: float
    ymin: float
    ymax: float
    height: float
    floor_kind: int  # 0 checker, 1 planks
    floor_colors: np.ndarray  # (2,3)
    floor_tile: float
    wall_kind: int  # 0 bricks, 1 stripes, 2 plain (noise)
    wall_colors: np.ndarray  # (2,3)
    wall_tile: float
    sky_colors: np.ndarray  # (2,3) horizon, zenith


@dataclass
class SceneSpec:
    camera: Camera
    room: Room
    things: list[Thing]
    light_dir: np.ndarray  # (3,) unit, pointing toward the light
    light_color: np.ndarray  # (3,)
    ambient: float
    noise_sigma: float  # sensor noise, in 0..1 intensity units
    gains: np.ndarray = field(default_factory=lambda: np.ones(3))  # per-channel white balance


# --------------------------------------------------------------------------------------------
def _hsv(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    h = rng.uniform(0.0, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*s), rng.uniform(*v)))


def _texture(rng: np.random.Generator, amp: tuple[float, float]) -> dict:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return {"tex_freq": direction * rng.uniform(6.0, 25.0),
            "tex_phase": float(rng.uniform(0, 2 * np.pi)), "tex_amp": float(rng.uniform(*amp))}


def _part(rng: np.random.Generator, prim: Primitive, albedo: np.ndarray) -> Part:
    return Part(prim=prim, albedo=albedo, **_texture(rng, (0.0, 0.15)))


def _thing_color(rng: np.random.Generator) -> np.ndarray:
    # every thing class draws from the same distribution: colour says nothing about the class
    return _hsv(rng, (0.15, 0.9), (0.35, 0.95))


def _sphere(rng: np.random.Generator) -> Thing:
    r = rng.uniform(0.35, 0.8)
    c = np.array([0.0, 0.0, r])
    return Thing(spec.SPHERE, [_part(rng, Sphere(c, r), _thing_color(rng))], c, r, (0.0, 0.0, r))


def _box(rng: np.random.Generator) -> Thing:
    half = rng.uniform([0.25, 0.25, 0.2], [0.75, 0.75, 0.75])
    rot = rotation_z(rng.uniform(0, np.pi))
    c = np.array([0.0, 0.0, half[2]])
    foot = float(np.hypot(half[0], half[1]))
    prim = OrientedBox(c, half, rot)
    return Thing(spec.BOX, [_part(rng, prim, _thing_color(rng))], c, float(np.linalg.norm(half)),
                 (0.0, 0.0, foot))


def _cylinder(rng: np.random.Generator) -> Thing:
    r = rng.uniform(0.2, 0.5)
    if rng.uniform() < 0.85:  # upright
        h = rng.uniform(0.6, 1.8)
        base = np.zeros(3)
        axis = np.array([0.0, 0.0, 1.0])
        foot = r
    else:  # lying on its side
        h = rng.uniform(0.8, 1.8)
        a = rng.uniform(0, np.pi)
        axis = np.array([np.cos(a), np.sin(a), 0.0])
        base = np.array([0.0, 0.0, r]) - axis * h / 2
        foot = float(np.hypot(h / 2, r))
    center = base + axis * h / 2
    prim = Cylinder(base, axis, r, h)
    return Thing(spec.CYLINDER, [_part(rng, prim, _thing_color(rng))], center,
                 float(np.hypot(h / 2, r)), (0.0, 0.0, foot))


def _dir(pitch: float, side: float) -> np.ndarray:
    """Unit vector from 'straight down', swung forward by ``pitch`` and sideways by ``side``."""
    v = np.array([np.sin(pitch) * np.cos(side), np.sin(side), -np.cos(pitch) * np.cos(side)])
    return v / np.linalg.norm(v)


def _bend(d: np.ndarray, angle: float, toward: np.ndarray) -> np.ndarray:
    """Rotate unit ``d`` by ``angle`` toward the direction ``toward`` (in their common plane)."""
    perp = toward - (toward @ d) * d
    n = np.linalg.norm(perp)
    perp = perp / n if n > 1e-6 else np.array([0.0, 0.0, 1.0])
    return np.cos(angle) * d + np.sin(angle) * perp


def _figure(rng: np.random.Generator) -> Thing:
    """A jointed figure of capsules and spheres, in a random pose, facing a random direction."""
    s = rng.uniform(0.9, 1.15)
    c = rng.uniform(1.0, 1.3) * s  # chunkiness: limb radii scale
    thigh, shin, upper, fore = 0.45 * s, 0.45 * s, 0.30 * s, 0.28 * s
    torso, neck_len, sh_w, hip_w = 0.55 * s, 0.24 * s, 0.21 * s, 0.11 * s
    r_torso, r_head, r_neck = 0.15 * c, 0.13 * c, 0.05 * c
    r_ua, r_fa, r_hand, r_th, r_sh = 0.06 * c, 0.055 * c, 0.07 * c, 0.085 * c, 0.07 * c
    r_shbar, r_hipbar = 0.07 * c, 0.09 * c
    fwd = np.array([1.0, 0.0, 0.0])

    kp: dict[str, np.ndarray] = {}
    # legs (pelvis at the origin for now)
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        hip = np.array([0.0, sgn * hip_w, 0.0])
        t_pitch = rng.uniform(-0.6, 0.6)
        d_th = _dir(t_pitch, sgn * rng.uniform(0.0, 0.2))
        knee = hip + thigh * d_th
        d_sh = _dir(t_pitch - rng.uniform(0.0, 1.0), sgn * rng.uniform(0.0, 0.15))
        kp[f"{side}_hip"], kp[f"{side}_knee"], kp[f"{side}_foot"] = hip, knee, knee + shin * d_sh
    lift = r_sh - min(kp["left_foot"][2], kp["right_foot"][2])  # lowest foot rests on the floor
    for k in list(kp):
        kp[k] = kp[k] + np.array([0.0, 0.0, lift])
    pelvis = np.array([0.0, 0.0, lift])
    lean = rng.uniform(-0.15, 0.25)
    up = np.array([np.sin(lean), 0.0, np.cos(lean)])
    kp["neck"] = pelvis + torso * up
    kp["head"] = kp["neck"] + neck_len * _bend(up, rng.uniform(-0.3, 0.3), fwd)
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        sh = kp["neck"] + np.array([0.0, sgn * sh_w, -0.04 * s])
        d_ua = _dir(rng.uniform(-0.6, 2.6), sgn * rng.uniform(0.0, 1.3))
        elbow = sh + upper * d_ua
        d_fa = _bend(d_ua, rng.uniform(0.0, 1.9), np.array([1.0, 0.0, 0.6]))
        kp[f"{side}_shoulder"], kp[f"{side}_elbow"] = sh, elbow
        kp[f"{side}_hand"] = elbow + fore * d_fa

    # face a random direction (the figure is moved into place later)
    rot = rotation_z(rng.uniform(0, 2 * np.pi))
    pts = {k: rot @ v for k, v in kp.items()}
    pelvis_w = rot @ pelvis

    skin = np.array(colorsys.hsv_to_rgb(rng.uniform(0.03, 0.1), rng.uniform(0.3, 0.6),
                                        rng.uniform(0.4, 0.95)))
    shirt, trousers = _thing_color(rng), _thing_color(rng)
    parts: list[Part] = []

    def cap(a: str | np.ndarray, b: str | np.ndarray, r: float, col: np.ndarray) -> None:
        pa = pts[a] if isinstance(a, str) else a
        pb = pts[b] if isinstance(b, str) else b
        parts.append(_part(rng, Capsule(pa, pb, r), col))

    cap(pelvis_w, "neck", r_torso, shirt)
    cap("neck", "head", r_neck, skin)
    parts.append(_part(rng, Sphere(pts["head"], r_head), skin))
    cap("left_shoulder", "right_shoulder", r_shbar, shirt)
    cap("left_hip", "right_hip", r_hipbar, trousers)
    for side in ("left", "right"):
        cap(f"{side}_shoulder", f"{side}_elbow", r_ua, shirt)
        cap(f"{side}_elbow", f"{side}_hand", r_fa, skin)
        parts.append(_part(rng, Sphere(pts[f"{side}_hand"], r_hand), skin))
        cap(f"{side}_hip", f"{side}_knee", r_th, trousers)
        cap(f"{side}_knee", f"{side}_foot", r_sh, trousers)

    keypoints = np.stack([pts[n] for n in spec.KEYPOINT_NAMES])
    inside = _inside(parts, keypoints)
    containing = [np.flatnonzero(row).tolist() for row in inside]
    center = (keypoints.min(0) + keypoints.max(0)) / 2
    radius = float(np.linalg.norm(keypoints - center, axis=1).max() + r_torso + 1e-3)
    foot = float(np.hypot(*keypoints[:, :2].T).max() + r_torso)
    return Thing(spec.FIGURE, parts, center, radius, (0.0, 0.0, foot), keypoints, containing)


def _inside(parts: list[Part], points: np.ndarray) -> np.ndarray:
    """(points, parts) bool: point lies in the part (spheres and capsules only)."""
    segs = []
    for p in parts:
        if isinstance(p.prim, Sphere):
            segs.append((p.prim.center, p.prim.center, p.prim.radius))
        elif isinstance(p.prim, Capsule):
            segs.append((p.prim.a, p.prim.b, p.prim.radius))
        else:
            raise TypeError(type(p.prim))
    a = np.stack([s[0] for s in segs])  # (P,3)
    ba = np.stack([s[1] for s in segs]) - a
    r = np.array([s[2] for s in segs])
    pa = points[:, None, :] - a[None]  # (K,P,3)
    h = np.clip((pa * ba).sum(-1) / np.maximum((ba * ba).sum(-1), 1e-12), 0.0, 1.0)
    d = np.linalg.norm(pa - h[..., None] * ba, axis=-1)
    return d <= r + 1e-9


_MAKERS = {spec.SPHERE: _sphere, spec.BOX: _box, spec.CYLINDER: _cylinder, spec.FIGURE: _figure}
# figures are a little more frequent: they carry the keypoints
_CLASS_P = np.array([0.23, 0.23, 0.23, 0.31])


def sample_scene(rng: np.random.Generator, image_size: int) -> SceneSpec:
    cam_cfg = spec.camera_for(image_size)
    # camera: height, downward pitch, yaw
    h = rng.uniform(1.1, 2.2)
    pitch = rng.uniform(np.radians(6), np.radians(30))
    yaw = rng.uniform(0, 2 * np.pi)
    fwd = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), -np.sin(pitch)])
    right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    down = np.cross(fwd, right)
    camera = Camera(np.array([0.0, 0.0, h]), np.stack([right, down, fwd], 1), cam_cfg["fx"],
                    cam_cfg["fy"], cam_cfg["cx"], cam_cfg["cy"], image_size)

    # room: roughly aligned with the view, far wall 8.5-14 m ahead, side walls 2.5-8 m away
    room_rot = rotation_z(yaw + rng.uniform(-0.6, 0.6))
    floor_base = _hsv(rng, (0.1, 0.6), (0.3, 0.85))
    wall_base = _hsv(rng, (0.0, 0.5), (0.45, 0.95))
    room = Room(
        rot=room_rot,
        xmin=-rng.uniform(2.0, 6.0), xmax=rng.uniform(8.5, 14.0),
        ymin=-rng.uniform(2.5, 8.0), ymax=rng.uniform(2.5, 8.0),
        height=rng.uniform(max(2.5, h + 0.5), 4.5),
        floor_kind=int(rng.integers(0, 2)),
        floor_colors=np.stack([floor_base, np.clip(floor_base * rng.uniform(0.6, 0.9), 0, 1)]),
        floor_tile=rng.uniform(0.4, 1.2),
        wall_kind=int(rng.integers(0, 3)),
        wall_colors=np.stack([wall_base, np.clip(wall_base * rng.uniform(0.55, 0.85), 0, 1)]),
        wall_tile=rng.uniform(0.25, 0.6),
        sky_colors=np.stack([
            np.array(colorsys.hsv_to_rgb(rng.uniform(0.5, 0.65), rng.uniform(0.0, 0.3),
                                         rng.uniform(0.75, 1.0))),
            np.array(colorsys.hsv_to_rgb(rng.uniform(0.55, 0.65), rng.uniform(0.3, 0.8),
                                         rng.uniform(0.55, 0.95))),
        ]),
    )

    # things: 3-6, on the visible floor, inside the room, not interpenetrating
    n_things = int(rng.integers(3, 7))
    hfov = np.arctan(cam_cfg["cx"] / cam_cfg["fx"])
    things: list[Thing] = []
    for _ in range(n_things):
        cls = int(rng.choice(len(_CLASS_P), p=_CLASS_P)) + spec.SPHERE
        shape = _MAKERS[cls](rng)
        for _attempt in range(40):
            dist = rng.uniform(2.0, 5.0 if cls != spec.FIGURE else 4.5)
            ang = yaw + rng.uniform(-0.9, 0.9) * hfov
            thing = shape.moved(dist * np.cos(ang), dist * np.sin(ang))
            if _fits(thing, things, room, camera):
                things.append(thing)
                break

    elev = rng.uniform(np.radians(25), np.radians(75))
    azim = rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(elev) * np.cos(azim), np.cos(elev) * np.sin(azim), np.sin(elev)])
    return SceneSpec(
        camera=camera,
        room=room,
        things=things,
        light_dir=light,
        light_color=np.array(colorsys.hsv_to_rgb(rng.uniform(0.05, 0.15), rng.uniform(0, 0.2),
                                                 rng.uniform(0.85, 1.0))),
        ambient=float(rng.uniform(0.25, 0.45)),
        noise_sigma=float(rng.uniform(1.0, 5.0) / 255.0),
        gains=rng.uniform(0.93, 1.07, size=3),
    )


def _fits(thing: Thing, others: list[Thing], room: Room, camera: Camera) -> bool:
    x, y, r = thing.footprint
    if np.hypot(x, y) < r + 1.0:  # keep clear of the camera
        return False
    p = room.rot.T @ np.array([x, y, 0.0])
    m = r + 0.2
    if not (room.xmin + m < p[0] < room.xmax - m and room.ymin + m < p[1] < room.ymax - m):
        return False
    for o in others:
        ox, oy, orad = o.footprint
        if np.hypot(x - ox, y - oy) < r + orad + 0.05:
            return False
    uv, z = camera.project(thing.bound_center[None])
    lo, hi = 0.08 * camera.size, 0.92 * camera.size
    return bool(z[0] > 0.5 and lo < uv[0, 0] < hi and lo < uv[0, 1] < hi)
