"""The synthetic world: ray-cast scenes with exact labels for every task, written as COCO.

Public API::

    write_synthetic_dataset(root, *, num_train, num_val, image_size, seed, workers=1) -> dict
    synthetic_card(image_size=128) -> DatasetCard
    render_scene(seed, image_size=128) -> RenderedScene
    scene_seed(seed, split, index) -> np.random.SeedSequence   # the seed of a written image

See ``writer`` for the layout on disk and ``render`` for the label rules.
"""

from pipeline.data.synthetic.render import InstanceRecord, RenderedScene, render_scene
from pipeline.data.synthetic.spec import synthetic_card
from pipeline.data.synthetic.writer import (
    decode_depth,
    decode_normals,
    encode_depth,
    encode_normals,
    panoptic_from_scene,
    scene_seed,
    write_synthetic_dataset,
)

__all__ = [
    "InstanceRecord",
    "RenderedScene",
    "decode_depth",
    "decode_normals",
    "encode_depth",
    "encode_normals",
    "panoptic_from_scene",
    "render_scene",
    "scene_seed",
    "synthetic_card",
    "write_synthetic_dataset",
]
