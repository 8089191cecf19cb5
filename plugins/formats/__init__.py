"""Dataset format plugins (``data.source``): each reads one published on-disk layout unchanged
and yields densepipe samples (``pipeline.data.formats`` holds the contract)."""
