"""lamm-ds: DeepSpeed-based semi-supervised pre-training of large neural-network interatomic potentials."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Load an exported model file (``model.safetensors``) without DeepSpeed; see :mod:`lamm_ds.engine.export`."""
    from lamm_ds.engine.export import load_model as _load

    return _load(path, device)
