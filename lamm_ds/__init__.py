"""lamm-ds: DeepSpeed-based semi-supervised pre-training of large neural-network interatomic potentials."""

__version__ = "0.1.0"
