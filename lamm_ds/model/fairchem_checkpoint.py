"""Reading fairchem 1.x checkpoints: the parts every converter shares.

A fairchem checkpoint is a ``torch.save`` dict with ``state_dict`` (keys possibly prefixed
``module.``), ``config`` (the training YAML as a dict), and optionally ``normalizers``,
``elementrefs``, ``ema`` and ``scale_dict``. It is read with ``torch.load(weights_only=True)``
(:func:`load_checkpoint`), which never runs code from the file.

Normalisers and element references are taken as fairchem's prediction path takes them: the
checkpoint's own (they override the config's on load), else numbers written in the training
dataset's config (``transforms.normalizer`` with ``mean`` and ``rmsd``/``stdev``; the 2023
``normalize_labels`` with ``target_mean``/``target_std``). What the config would fit or read
from a file, and the checkpoint does not hold, is unknown here: such a checkpoint is refused
rather than converted with a wrong scale.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from lamm_ds.safe_load import RefusedPickleError, load_weights_only

log = logging.getLogger("lamm_ds")


class ConversionError(ValueError):
    """The checkpoint is not a supported fairchem checkpoint; the message says why."""


class UnsafeCheckpointError(ConversionError):
    """Weights-only loading refused the checkpoint (it needs a global outside the allow-list)."""


def _numpy_safe_globals() -> list:
    """numpy scalars (e.g. a ``np.float64`` learning rate or metric in the config) and their dtypes.

    A pickled numpy scalar is ``scalar(dtype(code), raw bytes)``: no code from the file runs. Pickles
    written under numpy 1.x name ``numpy.core.multiarray.scalar``, under numpy 2.x
    ``numpy._core.multiarray.scalar``: both names are allowed. numpy arrays are not (fairchem
    stores normalisers and element references as tensors).
    """
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    # np.dtype rebuilds a scalar's dtype; unpickling then sets its state on the dtype's own class
    # (numpy >= 1.25: numpy.dtypes.Float64DType etc.), so the numeric dtype classes are needed too
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"} - {np.dtype}
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *sorted(dtype_classes, key=lambda c: c.__name__)]


#: what weights-only loading accepts beyond torch's defaults (tensors, dicts, lists, numbers, ...)
SAFE_GLOBALS = _numpy_safe_globals()


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """A fairchem checkpoint file as a dict; weights-only unless ``trust_pickle``. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if not head:
        raise ConversionError(f"{path}: empty file, not a PyTorch checkpoint")
    # torch.save writes a zip archive (PK...) or, in the legacy format, a pickle (0x80, protocol)
    if head != b"PK" and head[:1] != b"\x80":
        raise ConversionError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        if trust_pickle:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
        else:
            ckpt = load_weights_only(path, SAFE_GLOBALS, map_location="cpu")
    except RefusedPickleError as exc:
        if exc.globals:
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: the checkpoint needs the Python global(s) {', '.join(exc.globals)}, "
                f"which weights-only loading does not allow (unpickling them could run code from the file); "
                f"pass --trust-pickle (trust_pickle=True) to load it anyway, only for files you trust") from None
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: weights-only unpickling failed ({exc.detail}): a "
            f"corrupt file, or a pickle that is not a plain checkpoint; pass --trust-pickle "
            f"(trust_pickle=True) to unpickle it fully, only for files you trust") from None
    except Exception as exc:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{path}: not a fairchem checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt


def strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key



WEIGHTS = ("auto", "ema", "raw")


def uses_ema(ckpt: dict, weights: str) -> bool:
    """Whether to convert the EMA copy: ``auto`` does what fairchem's predictor does (the EMA weights
    when the checkpoint has them and its config sets an EMA decay)."""
    if weights not in WEIGHTS:
        raise ConversionError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    ema = ckpt.get("ema")
    has = isinstance(ema, dict) and bool(ema.get("shadow_params"))
    if weights == "ema" and not has:
        raise ConversionError("--weights ema: the checkpoint holds no EMA weights ('ema' is empty)")
    if weights == "auto":
        decay = ((ckpt.get("config") or {}).get("optim") or {}).get("ema_decay")
        return has and bool(decay)
    return weights == "ema"




def _scalar(value, what: str) -> float:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.numel() != 1 or not bool(torch.isfinite(t).all()):
        raise ConversionError(f"{what} must be one finite number, got shape {tuple(t.shape)}: "
                              f"{t.reshape(-1)[:6].tolist()}")
    return float(t.reshape(-1)[0])


def train_dataset_config(ckpt: dict) -> dict:
    """The training dataset's section of the checkpoint's config (fairchem saves ``dataset[0]`` or
    ``dataset["train"]`` there; older files keep the list or the split dict)."""
    ds = (ckpt.get("config") or {}).get("dataset") or {}
    if isinstance(ds, list):
        ds = ds[0] if ds else {}
    if isinstance(ds, dict) and isinstance(ds.get("train"), dict):
        ds = ds["train"]
    return ds if isinstance(ds, dict) else {}


#: fairchem's older names of the energy and force targets
_LEGACY = {"energy": "target", "forces": "grad_target"}


def normaliser_entry(ckpt: dict, key: str) -> dict | None:
    """fairchem's normaliser for output ``key`` as prediction uses it: the checkpoint's (it
    overrides the config's on load), else mean/rmsd written in the config; None when there is none.
    One the config fits or reads from a file, but the checkpoint does not hold, is refused."""
    norms = ckpt.get("normalizers") or {}
    for name in (key, _LEGACY.get(key)):
        if name and norms.get(name):
            return norms[name]
    ds = train_dataset_config(ckpt)
    conf = (ds.get("transforms") or {}).get("normalizer") or {}
    entry = conf.get(key)
    if isinstance(entry, dict) and "file" not in entry:
        return entry
    fit = conf.get("fit") or {}
    if entry is not None or "file" in conf or key in (fit.get("targets") or []):
        raise ConversionError(f"the checkpoint holds no {key!r} normaliser and its config fits it or reads it "
                              "from a file, which lamm-ds cannot see: its scale is unknown")
    if key in _LEGACY and ds.get("normalize_labels"):   # 2023 configs: the numbers inline
        prefix = "" if key == "energy" else "grad_"
        return {"mean": ds.get(f"{prefix}target_mean", 0.0), "rmsd": ds.get(f"{prefix}target_std", 1.0)}
    return None


def normaliser(ckpt: dict, key: str) -> tuple[float, float]:
    """(mean, rmsd) of output ``key``; (0, 1) when the checkpoint has none."""
    entry = normaliser_entry(ckpt, key) or {}
    rmsd = entry.get("rmsd", entry.get("std", entry.get("stdev", 1.0)))   # std / stdev: older names
    mean, rmsd = _scalar(entry.get("mean", 0.0), f"{key} normaliser mean"), _scalar(rmsd, f"{key} normaliser rmsd")
    if not rmsd > 0:
        raise ConversionError(f"{key} normaliser rmsd must be > 0, got {rmsd}")
    return mean, rmsd


def normalizers(ckpt: dict) -> tuple[float, float, float, float]:
    """(energy mean, energy std, force mean, force std) as fairchem's prediction path uses them."""
    return (*normaliser(ckpt, "energy"), *normaliser(ckpt, "forces"))


def element_references(ckpt: dict, max_z: int) -> np.ndarray:
    """Per-element energy references (index Z, 0..max_z) that fairchem adds after denormalising:
    the checkpoint's ``elementrefs``; refused when only the config names them (a file or a fit)."""
    refs = np.zeros(max_z + 1)
    stored = (ckpt.get("elementrefs") or {}).get("energy")
    if stored:
        er = torch.as_tensor(stored.get("element_references")).double().reshape(-1).numpy()
        if not np.all(np.isfinite(er)):
            raise ConversionError("element references hold NaN or inf")
        if np.any(er[max_z + 1:] != 0):
            raise ConversionError(f"element references beyond the model's elements (Z > {max_z})")
        refs[:min(len(er), max_z + 1)] += er[:max_z + 1]
        return refs
    conf = (train_dataset_config(ckpt).get("transforms") or {}).get("element_references")
    if conf:
        raise ConversionError("the checkpoint holds no element references but its config names them "
                              f"({conf!r}); fairchem would add them to every energy, and lamm-ds cannot see them")
    return refs


def warn_residual_energies(ckpt: dict, adds_linear_reference: bool) -> None:
    """OC22-style training subtracts a linear reference (``dataset.lin_ref``) from the energies; a
    model that does not add it back (EquiformerV2's ``use_energy_lin_ref``) predicts the residual,
    in fairchem and after conversion alike: say so."""
    lin_ref = train_dataset_config(ckpt).get("lin_ref")
    if lin_ref and not adds_linear_reference:
        log.warning("convert-fairchem: the checkpoint was trained on energies minus the linear reference %s and its "
                    "model does not add it back (use_energy_lin_ref is off): its energies, as fairchem's, are those "
                    "residuals, not total energies", lin_ref)
