"""Built-in task ``colorization`` (``task``: the plugin), with what only it uses: CIE Lab
conversions (``color``), the quantized ab gamut (``ab_bins``) and the metrics (``metrics``)."""
