"""Built-in task ``depth`` (``task``: the plugin), with its metrics (``metrics``)."""
