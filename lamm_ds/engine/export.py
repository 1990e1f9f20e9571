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


def _model_kinds() -> dict:
    """Model kind (export metadata "model_kind", RunConfig.model_kind) -> (config class, potential class)."""
    from lamm_ds.model.equiformer_v2 import EquiformerV2Config, EquiformerV2Potential

    return {"painn": (PaiNNConfig, Potential), "equiformer_v2": (EquiformerV2Config, EquiformerV2Potential)}


def model_kind_of(model) -> str:
    return getattr(model, "model_kind", "painn")


def build_potential(kind: str, cfg, dataset_names: list[str], stats: dict | None = None):
    """A fresh potential of the given model kind (``cfg`` is that kind's config dataclass)."""
    kinds = _model_kinds()
    if kind not in kinds:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(kinds)}")
    return kinds[kind][1](cfg, dataset_names, stats)


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
        "model_kind": model_kind_of(model),
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
    kind = meta.get("model_kind", "painn")
    kinds = _model_kinds()
    if kind not in kinds:
        raise ValueError(f"{path}: model kind {kind!r} is not known to this lamm-ds ({sorted(kinds)})")
    config_cls, potential_cls = kinds[kind]
    cfg = config_cls.from_dict(json.loads(meta["model_config"]))
    names = json.loads(meta["dataset_names"])
    model = potential_cls(cfg, names, {n: DatasetStats.identity(cfg.max_z) for n in names})
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the stored config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return model.to(device).eval()
