"""What the synthetic world contains: classes, the figure's keypoints, the camera, file encodings."""

from __future__ import annotations

from pipeline.data.card import ClassInfo, DatasetCard, KeypointSpec

GENERATOR = "densepipe.synthetic"
GENERATOR_VERSION = 2

# class index = position; COCO category id = index + 1
FLOOR, WALL, SKY, SPHERE, BOX, CYLINDER, FIGURE = range(7)
CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo(1, "floor", (140, 110, 80), False),
    ClassInfo(2, "wall", (180, 180, 160), False),
    ClassInfo(3, "sky", (120, 170, 230), False),
    ClassInfo(4, "sphere", (230, 60, 60), True),
    ClassInfo(5, "box", (60, 200, 80), True),
    ClassInfo(6, "cylinder", (70, 90, 230), True),
    ClassInfo(7, "figure", (240, 200, 40), True),
)
SUPERCATEGORY = {"floor": "room", "wall": "room", "sky": "outdoor", "sphere": "shape",
                 "box": "shape", "cylinder": "shape", "figure": "figure"}

KEYPOINT_NAMES: tuple[str, ...] = (
    "head", "neck",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_hand", "right_hand",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_foot", "right_foot",
)  # fmt: skip
KP = {n: i for i, n in enumerate(KEYPOINT_NAMES)}
# 1-based keypoint numbers, as in COCO
SKELETON: tuple[tuple[int, int], ...] = (
    (1, 2), (2, 3), (2, 4), (3, 5), (5, 7), (4, 6), (6, 8),
    (3, 9), (4, 10), (9, 10), (9, 11), (11, 13), (10, 12), (12, 14),
)  # fmt: skip
FLIP_MAP: tuple[tuple[str, str], ...] = tuple(
    (n, "right_" + n[5:]) for n in KEYPOINT_NAMES if n.startswith("left_")
)
# per-keypoint OKS sigmas, in the spirit of COCO's (larger for hips/knees/feet)
OKS_SIGMAS: tuple[float, ...] = (
    0.050, 0.050, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
    0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)  # fmt: skip

# camera: square image, focal length = FOCAL_FACTOR * size (about 58 degrees field of view)
FOCAL_FACTOR = 0.9

ENCODINGS = {
    "semantic_png": "uint8 L, class index, 255 = ignore",
    "depth_png": "uint16 I;16, z-depth in millimetres, 0 = unknown",
    "normals_png": "uint8 RGB, round((n + 1) / 2 * 255) of the camera-frame unit normal "
                   "(OpenCV: x right, y down, z forward); (0, 0, 0) = unknown",
    "panoptic_png": "uint8 RGB, segment id = R + 256 G + 256^2 B, 0 = void",
}


def camera_for(image_size: int) -> dict[str, float]:
    f = FOCAL_FACTOR * image_size
    return {"fx": f, "fy": f, "cx": image_size / 2.0, "cy": image_size / 2.0,
            "width": float(image_size), "height": float(image_size)}


def synthetic_card(image_size: int = 128) -> DatasetCard:
    """The dataset card of the synthetic world (camera intrinsics for ``image_size``)."""
    kp = KeypointSpec(
        category_id=CLASSES[FIGURE].id,
        names=KEYPOINT_NAMES,
        skeleton=SKELETON,
        flip_map=FLIP_MAP,
        oks_sigmas=OKS_SIGMAS,
    )
    return DatasetCard(
        name="synthetic",
        classes=list(CLASSES),
        keypoints=[kp],
        camera=camera_for(image_size),
        extra={"generator": GENERATOR, "generator_version": GENERATOR_VERSION,
               "encodings": dict(ENCODINGS)},
    )
