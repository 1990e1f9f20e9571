"""Training: typed configs, the one training loop (DeepSpeed engine, also run in-process), export and evaluation."""
