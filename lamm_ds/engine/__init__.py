"""Training: typed configs, the single-process loop, the DeepSpeed engine, export and evaluation."""
