"""Convert a fairchem 1.x PaiNN checkpoint into an exported lamm-ds model (kind ``painn_fairchem``).

Two layouts exist, as for EquiformerV2 (:mod:`lamm_ds.model.convert_fairchem`):

* monolithic (the OC20 ``painn_h512`` checkpoints): ``config["model"] = "painn"`` with
  ``config["model_attributes"]`` (or a dict with ``name: painn``), keys ``atom_emb.*``,
  ``message_layers.*``, ``update_layers.*``, ``upd_out_scalar_scale_<k>.scale_factor``,
  ``out_energy.*``, ``out_forces.*``;
* hydra: backbone ``painn_backbone`` with heads ``painn_energy_head`` / ``painn_force_head``
  (keys ``backbone.*``, ``output_heads.<head>.out_energy.*`` / ``.out_forces.*``).

fairchem's per-layer scale factors (``ScaleFactor``) come from the state_dict; a checkpoint's
``scale_dict`` overrides them, as fairchem's trainer does on load. An unfitted factor (0) is
the identity. When the state_dict's factors are unfitted but the config names a ``scale_file``,
fairchem would have taken the factors from that file: the file must then be given
(``scale_file=`` / ``--scale-file``, JSON or a weights-only ``.pt``), or nothing is converted.

Refused rather than converted wrong: radial bases other than Gaussian, envelopes other than the
polynomial one, unknown options, and ``direct_forces: false`` (fairchem's "gradient" forces there
are minus the gradient of the *sum of the final node embeddings*, not of the energy, so no
energy model reproduces them). A model without forces (``regress_forces: false``) converts with
conservative forces (-dE/dx), which the checkpoint itself never predicted: the command says so.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from lamm_ds.model.fairchem_checkpoint import (ConversionError, element_references, normalizers, strip_module,
                                               uses_ema, warn_residual_energies)
from lamm_ds.model.heads import DatasetStats
from lamm_ds.model.painn_fairchem import FairchemPaiNNConfig, FairchemPaiNNPotential
from lamm_ds.safe_load import RefusedPickleError, load_weights_only

log = logging.getLogger("lamm_ds")

# fairchem PaiNN.__init__ defaults
_DEFAULTS = dict(hidden_channels=512, num_layers=6, num_rbf=128, cutoff=12.0, max_neighbors=50, rbf=None,
                 envelope=None, regress_forces=True, direct_forces=True, use_pbc=True, use_pbc_single=False,
                 otf_graph=True, num_elements=83, scale_file=None)
# graph-generation switches and bookkeeping that do not change what the network computes on a graph
_IGNORED = {"name", "model", "use_pbc", "use_pbc_single", "otf_graph"}
_BACKBONES = {"painn_backbone", "painn"}
_ENERGY_HEAD, _FORCE_HEAD = "painn_energy_head", "painn_force_head"
_SCALE_KEY = re.compile(r"^(?:backbone\.)?upd_out_scalar_scale_(\d+)\.scale_factor$")
_RBF_OFFSET = re.compile(r"^(?:backbone\.)?radial_basis\.rbf\.offset$")


def is_painn(config: dict) -> bool:
    """Whether a fairchem checkpoint's config describes a PaiNN model (either layout)."""
    model = config.get("model")
    if isinstance(model, str):
        return model == "painn"
    if isinstance(model, dict):
        if model.get("name") == "painn":
            return True
        if model.get("name") == "hydra":
            return (model.get("backbone") or {}).get("model") in _BACKBONES
    return False


def _model_section(config: dict) -> tuple[dict, dict, bool]:
    """(backbone kwargs, heads, monolithic?)."""
    model = config["model"]
    if isinstance(model, str):
        return dict(config.get("model_attributes") or {}), {}, True
    if model.get("name") == "painn":
        return {k: v for k, v in model.items() if k != "name"}, {}, True
    return dict(model.get("backbone") or {}), dict(model.get("heads") or {}), False


def config_from_fairchem(kwargs: dict) -> FairchemPaiNNConfig:
    """Our config for fairchem PaiNN keyword arguments; options lamm-ds cannot reproduce are refused."""
    unknown = sorted(set(kwargs) - set(_DEFAULTS) - _IGNORED)
    if unknown:
        raise ConversionError(f"unknown PaiNN option(s) {', '.join(unknown)}: lamm-ds cannot tell whether they "
                              "change the model's predictions, so it does not convert the checkpoint")
    kw = {**_DEFAULTS, **kwargs}
    rbf = kw["rbf"] or {"name": "gaussian"}
    envelope = kw["envelope"] or {"name": "polynomial", "exponent": 5}
    if str(rbf.get("name", "")).lower() != "gaussian" or set(rbf) - {"name"}:
        raise ConversionError(f"PaiNN radial basis {rbf!r} is not supported by lamm-ds (needs {{'name': 'gaussian'}})")
    if str(envelope.get("name", "")).lower() != "polynomial" or set(envelope) - {"name", "exponent"}:
        raise ConversionError(f"PaiNN envelope {envelope!r} is not supported by lamm-ds (needs the polynomial one)")
    if kw["regress_forces"] and not kw["direct_forces"]:
        raise ConversionError("PaiNN with direct_forces=false is not converted: fairchem's forces there are minus "
                              "the gradient of the sum of the final node embeddings, not of the energy, which no "
                              "energy model reproduces")
    return FairchemPaiNNConfig(
        hidden=int(kw["hidden_channels"]), layers=int(kw["num_layers"]), num_rbf=int(kw["num_rbf"]),
        cutoff=float(kw["cutoff"]), max_neighbors=kw["max_neighbors"], max_neighbors_strict=True,
        max_z=int(kw["num_elements"]), envelope_exponent=int(envelope.get("exponent", 5)),
        forces="direct" if kw["regress_forces"] else "conservative")


def _head_names(heads: dict) -> tuple[str, str | None]:
    energy = [n for n, spec in heads.items() if (spec or {}).get("module") == _ENERGY_HEAD]
    force = [n for n, spec in heads.items() if (spec or {}).get("module") == _FORCE_HEAD]
    other = sorted(set(heads) - set(energy) - set(force))
    if len(energy) != 1 or len(force) > 1 or other:
        raise ConversionError(f"hydra PaiNN needs one {_ENERGY_HEAD} and at most one {_FORCE_HEAD}; has "
                              f"{ {n: (s or {}).get('module') for n, s in heads.items()} }")
    return energy[0], (force[0] if force else None)


def _map_key(key: str, monolithic: bool, energy_head: str | None, force_head: str | None,
             dataset: str) -> str | None:
    """The lamm-ds key of one fairchem key (``module.`` stripped); None for buffers lamm-ds rebuilds
    and the scale factors (handled apart). Unknown keys raise."""
    if _SCALE_KEY.match(key) or _RBF_OFFSET.match(key):
        return None
    if monolithic:
        body = key
        if body.startswith("out_energy."):
            return f"heads.{dataset}.mlp." + body[len("out_energy."):]
        if body.startswith("out_forces."):
            return "force_head." + body[len("out_forces."):]
    else:
        if key.startswith(f"output_heads.{energy_head}.out_energy."):
            return f"heads.{dataset}.mlp." + key[len(f"output_heads.{energy_head}.out_energy."):]
        if force_head and key.startswith(f"output_heads.{force_head}.out_forces."):
            return "force_head." + key[len(f"output_heads.{force_head}.out_forces."):]
        if not key.startswith("backbone."):
            raise ConversionError(f"checkpoint tensor {key!r} belongs to no converted part of the model")
        body = key[len("backbone."):]
    for theirs, ours in (("atom_emb.embeddings.", "backbone.embedding."), ("message_layers.", "backbone.messages."),
                         ("update_layers.", "backbone.updates.")):
        if body.startswith(theirs):
            return ours + body[len(theirs):]
    raise ConversionError(f"checkpoint tensor {key!r} has no counterpart in lamm-ds's fairchem PaiNN")


def _load_scale_file(path: str | os.PathLike) -> dict:
    """A fairchem scale file: JSON ``{name: value}`` or a ``.pt`` dict, read weights-only."""
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"scale file {p}: no such file")
    try:
        if p.suffix == ".json":
            scales = json.loads(p.read_text())
        else:
            scales = load_weights_only(p, [], map_location="cpu")
    except (ValueError, RefusedPickleError, OSError) as exc:
        raise ConversionError(f"scale file {p}: not a readable JSON or weights-only torch file ({exc})") from None
    if not isinstance(scales, dict):
        raise ConversionError(f"scale file {p}: holds a {type(scales).__name__}, not a dict of scale factors")
    scales.pop("comment", None)
    return scales


def _scale_factors(state: dict, ckpt: dict, fc_kwargs: dict, layers: int, scale_file) -> tuple[torch.Tensor, str]:
    """Per-layer scale factors (unfitted = 1) and where they came from."""
    factors = torch.zeros(layers, dtype=torch.float64)
    for key, value in state.items():
        m = _SCALE_KEY.match(key)
        if m:
            factors[int(m.group(1))] = float(torch.as_tensor(value).reshape(()))
    source = "state_dict"
    overrides = {}
    if scale_file is not None:
        overrides, source = _load_scale_file(scale_file), f"scale file {scale_file}"
    elif isinstance(ckpt.get("scale_dict"), dict) and ckpt["scale_dict"]:
        overrides, source = ckpt["scale_dict"], "the checkpoint's scale_dict"
    elif not bool((factors != 0).any()) and fc_kwargs.get("scale_file"):
        raise ConversionError(f"the checkpoint's scale factors are unfitted but its config names scale_file "
                              f"{fc_kwargs['scale_file']!r}, which fairchem would have applied; pass that file "
                              "(--scale-file, JSON or .pt) to convert it")
    for name, value in overrides.items():
        m = re.fullmatch(r"(?:backbone\.)?upd_out_scalar_scale_(\d+)", str(name))
        if m is None or int(m.group(1)) >= layers:
            raise ConversionError(f"{source}: scale factor {name!r} is not one of PaiNN's "
                                  f"upd_out_scalar_scale_0..{layers - 1}")
        factors[int(m.group(1))] = float(torch.as_tensor(value).reshape(()))
    return torch.where(factors == 0, torch.ones_like(factors), factors), source


def _ema_weights(ckpt: dict, items: list[tuple[str, torch.Tensor]], mapped_keys: list[str | None]) -> dict:
    """lamm-ds key -> EMA tensor. fairchem's EMA shadows its trainable parameters in order: every
    state_dict entry except the (non-trainable) scale factors and the basis centres."""
    shadows = list(ckpt["ema"]["shadow_params"])
    order = [(new, tuple(torch.as_tensor(v).shape)) for (key, v), new in zip(items, mapped_keys)
             if not (_SCALE_KEY.match(key) or _RBF_OFFSET.match(key))]
    shapes = [tuple(torch.as_tensor(s).shape) for s in shadows]
    if [shape for _, shape in order] != shapes:
        raise ConversionError(f"cannot align the checkpoint's {len(shadows)} EMA tensors with its {len(order)} "
                              "trainable weights; pass --weights raw to convert the raw weights instead")
    return {new: torch.as_tensor(s) for (new, _), s in zip(order, shadows)}


def convert_painn_checkpoint(ckpt: dict, dataset: str = "fairchem", dtype: torch.dtype = torch.float32,
                             weights: str = "auto", scale_file: str | os.PathLike | None = None
                             ) -> FairchemPaiNNPotential:
    """A lamm-ds :class:`FairchemPaiNNPotential` equivalent to the fairchem PaiNN checkpoint (eval mode).

    ``weights`` as in :func:`lamm_ds.model.convert_fairchem.convert_checkpoint`; ``scale_file``
    overrides the scale factors (see the module docstring).
    """
    fc_kwargs, heads, monolithic = _model_section(ckpt["config"])
    cfg = config_from_fairchem(fc_kwargs)
    energy_head, force_head = (None, None) if monolithic else _head_names(heads)
    if cfg.forces == "direct" and not monolithic and force_head is None:
        raise ConversionError("hydra PaiNN with regress_forces has no painn_force_head")
    if cfg.forces == "conservative":
        log.warning("convert-fairchem: this PaiNN checkpoint predicts no forces (regress_forces=false); the "
                    "converted model gives -dE/dx, which the checkpoint itself never predicted")

    items = [(strip_module(k), v) for k, v in ckpt["state_dict"].items()]
    mapped_keys = [_map_key(k, monolithic, energy_head, force_head, dataset) for k, _ in items]
    for (key, value), new in zip(items, mapped_keys):
        if _RBF_OFFSET.match(key):
            want = torch.linspace(0.0, 1.0, cfg.num_rbf, dtype=torch.float64)
            if value.shape != want.shape or not torch.allclose(value.double(), want, atol=1e-6):
                raise ConversionError(f"{key}: Gaussian centres differ from fairchem's linspace(0, 1, {cfg.num_rbf})")
    mapped = {new: v for (_, v), new in zip(items, mapped_keys) if new is not None}
    scales, scale_source = _scale_factors(dict(items), ckpt, fc_kwargs, cfg.layers, scale_file)

    e_mean, e_std, f_mean, f_std = normalizers(ckpt)
    if abs(f_mean) > 0:
        raise ConversionError(f"force normaliser mean {f_mean} != 0 is not supported")
    warn_residual_energies(ckpt, adds_linear_reference=False)
    stats = DatasetStats(element_references(ckpt, cfg.max_z), energy_mean=0.0, energy_std=e_std, force_std=f_std)
    model = FairchemPaiNNPotential(cfg, [dataset], {dataset: stats}).to(dtype)
    model.heads[dataset].offset.energy_offset.fill_(e_mean)
    model.backbone.scales.scale.copy_(scales.float())

    model.weights_source = "raw"
    if uses_ema(ckpt, weights):
        mapped.update({k: v for k, v in _ema_weights(ckpt, items, mapped_keys).items() if k is not None})
        model.weights_source = "ema"
    ours = model.state_dict()
    loadable = {}
    for key, value in mapped.items():
        if key not in ours:
            raise ConversionError(f"checkpoint tensor for {key!r} has no counterpart in lamm-ds's fairchem PaiNN")
        if key == "backbone.embedding.weight":   # fairchem's row Z - 1 is our row Z (row 0 unused)
            if value.shape != (cfg.max_z, cfg.hidden):
                raise ConversionError(f"atom_emb.embeddings.weight: shape {tuple(value.shape)}, expected "
                                      f"{(cfg.max_z, cfg.hidden)}")
            value = torch.cat([torch.zeros(1, cfg.hidden, dtype=value.dtype), value])
        if tuple(ours[key].shape) != tuple(value.shape):
            raise ConversionError(f"{key}: shape {tuple(value.shape)} in the checkpoint, lamm-ds expects "
                                  f"{tuple(ours[key].shape)}")
        loadable[key] = value.to(ours[key].dtype)
    missing = sorted({n for n, _ in model.named_parameters()} - set(loadable))
    if missing:
        raise ConversionError(f"checkpoint lacks weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.load_state_dict(loadable, strict=False)
    model.scale_source = scale_source
    return model.eval()
