"""Built-in task ``panoptic`` (``task``: the plugin), with what only it uses: the fusion of the
semantic and instance predictions (``fusion``), PQ (``metrics``; ``reference`` is the
straightforward baseline it is checked against), the streaming evaluator (``evaluator``), the COCO
panoptic files (``files``) and ``densepipe panoptic-eval`` (``cli``). Kept light: importing the
package imports none of them."""
