"""One-file fp32 model export (safetensors + JSON metadata: no pickle) and loading without DeepSpeed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lamm_ds.model.heads import DatasetStats
from lamm_ds.model.painn import PaiNNConfig
from lamm_ds.model.potential import Potential

FORMAT = "lamm-ds-model"
VERSION = 1


def export_model(model: Potential, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model`` as fp32 tensors plus its config; atomic (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "model_config": json.dumps(model.cfg.to_dict()),
        "dataset_names": json.dumps(model.dataset_names),
        "extra": json.dumps(extra or {}),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_export_metadata(path: str | os.PathLike) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such model file") from None
    except Exception as exc:
        raise ValueError(f"{path}: not a readable lamm-ds model file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a lamm-ds model export (format {meta.get('format')!r})")
    if int(meta.get("version", -1)) != VERSION:
        raise ValueError(f"{path}: model format version {meta.get('version')}, this lamm-ds reads {VERSION}")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Potential:
    """A :class:`Potential` from an exported file, in eval mode, fp32."""
    meta = read_export_metadata(path)
    cfg = PaiNNConfig.from_dict(json.loads(meta["model_config"]))
    names = json.loads(meta["dataset_names"])
    model = Potential(cfg, names, {n: DatasetStats.identity(cfg.max_z) for n in names})
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the stored config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.to(device).eval()
