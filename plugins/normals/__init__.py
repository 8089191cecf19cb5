"""Built-in task ``normals`` (``task``: the plugin), with its metrics (``metrics``)."""
