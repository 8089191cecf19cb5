"""Built-in tasks ``instance`` (Mask R-CNN, ``instance``) and ``keypoints`` (Keypoint R-CNN,
``keypoints``), which share the R-CNN machinery and COCO evaluation: the detector, mask and
keypoint branches (``heads``), the Task methods and drawing both tasks share (``task``), COCO
results conversion (``results``), COCO AP through pycocotools (``coco``), the streaming evaluator
(``evaluator``) and ``densepipe coco-eval`` (``cli``). Kept light: importing the package imports
none of them."""
