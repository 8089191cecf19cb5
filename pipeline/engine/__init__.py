"""Training engine: the loop (``trainer``), hooks, checkpoints, loaders, mixed precision, LR
schedule, DDP under torchrun (``distributed``) and the evaluation loop."""
