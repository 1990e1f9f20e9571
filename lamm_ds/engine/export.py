"""One-file fp32 model export (safetensors + JSON metadata: no pickle) and loading without DeepSpeed.

Format version 2 stores a SHA-256 (metadata ``checksum``) over every tensor (sorted by name: dtype,
shape, raw bytes) and every other metadata entry; :func:`load_model` recomputes it, so a file whose
bytes changed after export is refused instead of loading silently. Version-1 files (no checksum)
still load, with a logged warning that they cannot be verified.

``trained_elements`` (metadata, JSON ``{head: [Z, ...]}``): the atomic numbers each energy head was
trained on, when known; :func:`unseen_elements` compares a structure against it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lamm_ds.model.heads import DatasetStats
from lamm_ds.model.painn import PaiNNConfig
from lamm_ds.model.potential import Potential

log = logging.getLogger("lamm_ds")

FORMAT = "lamm-ds-model"
VERSION = 2
_CHECKSUM_KEY = "checksum"


class UnseenElementsError(ValueError):
    """A structure holds elements the chosen energy head was not trained on."""


def _model_kinds() -> dict:
    """Model kind (export metadata "model_kind", RunConfig.model_kind) -> (config class, potential class)."""
    from lamm_ds.model.equiformer_v2 import EquiformerV2Config, EquiformerV2Potential
    from lamm_ds.model.painn_fairchem import FairchemPaiNNConfig, FairchemPaiNNPotential

    return {"painn": (PaiNNConfig, Potential), "equiformer_v2": (EquiformerV2Config, EquiformerV2Potential),
            "painn_fairchem": (FairchemPaiNNConfig, FairchemPaiNNPotential)}


def model_kind_of(model) -> str:
    return getattr(model, "model_kind", "painn")


def build_potential(kind: str, cfg, dataset_names: list[str], stats: dict | None = None):
    """A fresh potential of the given model kind (``cfg`` is that kind's config dataclass)."""
    kinds = _model_kinds()
    if kind not in kinds:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(kinds)}")
    return kinds[kind][1](cfg, dataset_names, stats)


def _checksum(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over a canonical serialisation of the tensors (sorted names; dtype, shape, raw bytes)
    and of the metadata without its ``checksum`` entry."""
    h = hashlib.sha256(b"lamm-ds-model-checksum\0")

    def chunk(data) -> None:  # length-prefixed, so no two different inputs serialise alike
        data = memoryview(data).cast("B")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        chunk(json.dumps([key, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
        chunk(t.reshape(-1).view(torch.uint8).numpy())
    chunk(json.dumps({k: v for k, v in meta.items() if k != _CHECKSUM_KEY}, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def _clean_trained_elements(model) -> dict[str, list[int]] | None:
    """``model.trained_elements`` as {head: sorted unique ints}, only for heads the model has."""
    te = getattr(model, "trained_elements", None)
    if te is None:
        return None
    out = {}
    for head, numbers in te.items():
        if head not in model.dataset_names:
            log.warning("export: trained_elements names %r, which is not a head of the model; dropped", head)
            continue
        out[str(head)] = sorted({int(z) for z in numbers})
    return out


def export_model(model: Potential, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model`` as fp32 tensors plus its config and a checksum; atomic (temp file + rename).

    ``model.trained_elements`` (``{head: [Z, ...]}``), when set, is stored too.
    """
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
    trained = _clean_trained_elements(model)
    if trained is not None:
        meta["trained_elements"] = json.dumps(trained, sort_keys=True)
    meta[_CHECKSUM_KEY] = _checksum(state, meta)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_export_metadata(path: str | os.PathLike) -> dict:
    """The metadata of an exported model file (format and version checked, checksum not: see
    :func:`load_model`); errors name the file."""
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a directory, not a model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such model file") from None
    except Exception as exc:
        raise ValueError(f"{path}: not a readable lamm-ds model file (truncated, corrupt or not a "
                         f"safetensors file): {exc}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a lamm-ds model export (format {meta.get('format')!r})")
    try:
        version = int(meta.get("version", -1))
    except ValueError:
        version = -1
    if not 1 <= version <= VERSION:
        raise ValueError(f"{path}: model format version {meta.get('version')!r}, this lamm-ds reads 1..{VERSION}")
    return meta


def _parse_trained_elements(raw: str | None, names: list[str]) -> dict[str, list[int]] | None:
    if raw is None:
        return None
    value = json.loads(raw)
    if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
        raise ValueError(f"trained_elements must map head names to lists of atomic numbers, got {raw[:80]!r}")
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"trained_elements names heads {unknown} the model does not have")
    return {str(k): sorted({int(z) for z in v}) for k, v in value.items()}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Potential:
    """A :class:`Potential` from an exported file, in eval mode, fp32.

    The checksum (format version 2) is verified: a file changed since export raises ``ValueError``.
    ``model.trained_elements`` is restored (``None`` when the file does not record it).
    """
    meta = read_export_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:
        raise ValueError(f"{path}: cannot read the model tensors (truncated or corrupt file): {exc}") from None
    version = int(meta["version"])
    if version >= 2:
        stored = meta.get(_CHECKSUM_KEY)
        if not stored or _checksum(state, meta) != stored:
            raise ValueError(f"{path}: checksum mismatch: the file is corrupt (tensor bytes or metadata "
                             f"changed since export)")
    else:
        log.warning("%s: model format version %d has no checksum, so this file cannot be verified "
                    "(re-export it to add one)", path, version)
    kind = meta.get("model_kind", "painn")
    kinds = _model_kinds()
    if kind not in kinds:
        raise ValueError(f"{path}: model kind {kind!r} is not known to this lamm-ds ({sorted(kinds)})")
    config_cls, potential_cls = kinds[kind]
    try:
        cfg = config_cls.from_dict(json.loads(meta["model_config"]))
        names = json.loads(meta["dataset_names"])
        trained = _parse_trained_elements(meta.get("trained_elements"), names)
        model = potential_cls(cfg, names, {n: DatasetStats.identity(cfg.max_z) for n in names})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt model metadata: {exc}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the stored config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.trained_elements = trained
    return model.to(device).eval()


# -- element coverage ----------------------------------------------------------------------------

def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z{z}"


def format_elements(numbers: Iterable[int]) -> str:
    """``"Ge (Z=32), Sn (Z=50)"``."""
    return ", ".join(f"{_symbol(int(z))} (Z={int(z)})" for z in numbers)


def unseen_elements(model, head: str, numbers) -> list[int]:
    """Sorted atomic numbers in ``numbers`` that energy head ``head`` was not trained on.

    Empty when the model does not record coverage for that head (``model.trained_elements`` is
    ``None`` or has no entry for ``head``: old files, converted fairchem checkpoints, a new head).
    """
    trained = getattr(model, "trained_elements", None)
    if not trained or head not in trained:
        return []
    present = {int(z) for z in np.unique(np.asarray(numbers, dtype=np.int64).reshape(-1))}
    return sorted(present - {int(z) for z in trained[head]})


def heads_covering(model, numbers) -> list[str]:
    """Heads whose recorded training elements include every element in ``numbers``."""
    trained = getattr(model, "trained_elements", None) or {}
    want = {int(z) for z in numbers}
    return [h for h in model.dataset_names if h in trained and want <= set(trained[h])]


def unseen_elements_message(model, head: str, unseen: list[int], where: str | None = None,
                            override: str = "allow_unseen_elements=True") -> str:
    """The error text for :class:`UnseenElementsError`: the elements, the head, heads that cover them."""
    others = [h for h in heads_covering(model, unseen) if h != head]
    cover = (f"head(s) trained on them: {', '.join(repr(h) for h in others)}" if others
             else "no head of this model was trained on them")
    prefix = f"{where}: " if where else ""
    return (f"{prefix}element(s) {format_elements(unseen)} not in the training data of head {head!r}, so its "
            f"predictions for them are meaningless; {cover}. Use {override} to compute them anyway")
