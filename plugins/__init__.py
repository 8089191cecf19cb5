"""The built-in task plugins (semantic, instance, keypoints, panoptic, depth, normals,
colorization), registered through the ``densepipe.tasks`` entry points like any third party's."""
