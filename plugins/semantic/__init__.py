"""Built-in task ``semantic`` (``task``: the plugin), with what only it uses: the confusion-matrix
scores (``confusion``) and the label-folder evaluation (``files``) behind ``densepipe semseg-eval``
(``cli``). Kept light: importing the package imports none of them."""
