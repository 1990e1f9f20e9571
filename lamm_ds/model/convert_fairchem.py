"""Convert a fairchem 1.x EquiformerV2 checkpoint into an exported lamm-ds model.

A fairchem checkpoint is a ``torch.save`` dict with ``state_dict`` (keys possibly prefixed
``module.``), ``config`` (the training YAML as a dict), and optionally ``normalizers`` and
``elementrefs``. Two model layouts exist:

* hydra (2024+): ``config["model"] = {"name": "hydra", "backbone": {...}, "heads": {...}}`` with
  keys ``backbone.*`` and ``output_heads.<head>.energy_block.*`` / ``output_heads.<head>.force_block.*``;
* monolithic (2023 OC20 checkpoints, class ``EquiformerV2``): ``config["model"] = "equiformer_v2"``
  plus ``config["model_attributes"]`` (or a dict with ``name: equiformer_v2``), keys at the top level
  with ``energy_block.*`` / ``force_block.*``.

A hydra ``rank2_symmetric_head`` (OMat24; DeNS: ``dens_rank2_symmetric_head``) with
``decompose=True`` becomes the direct stress head (:mod:`lamm_ds.model.rank2_stress`), its
``stress_isotropic`` / ``stress_anisotropic`` normalisers folded into it.

The lamm-ds module tree uses the same sub-module names, so weights map by prefix; fairchem's
constant buffers (Wigner/grid/index tables) are rebuilt by lamm-ds and skipped. Normalisation is
folded into the dataset head: fairchem predicts ``E = std * (sum_i e_i / avg_num_nodes + sum_i
lin_ref[Z_i]) + mean + sum_i elementref[Z_i]`` and ``F = force_std * f``; lamm-ds stores
``std`` as energy_std, ``mean`` as the per-structure energy offset, ``std * lin_ref + elementref``
as references and ``force_std`` as force_std.

A checkpoint is read with ``torch.load(weights_only=True)``, which builds tensors and plain
containers only and never runs code from the file (numpy scalars and dtypes are allowed too, see
:data:`lamm_ds.model.fairchem_checkpoint.SAFE_GLOBALS`). A file that needs anything else is refused, naming the global it asked for;
``trust_pickle=True`` (``--trust-pickle``) unpickles it fully, which can run arbitrary code: only
for files you trust.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from lamm_ds.model.convert_fairchem_painn import convert_painn_checkpoint, is_painn
from lamm_ds.model.equiformer_v2 import EquiformerV2Config, EquiformerV2Potential
from lamm_ds.model.fairchem_checkpoint import (SAFE_GLOBALS, WEIGHTS, ConversionError, UnsafeCheckpointError,
                                               element_references, load_checkpoint, normaliser,
                                               normalizers, strip_module, uses_ema, warn_residual_energies)
from lamm_ds.model.heads import DatasetStats

# the reading side lives in fairchem_checkpoint; these names stay importable from here
__all__ = ["SAFE_GLOBALS", "WEIGHTS", "ConversionError", "UnsafeCheckpointError", "config_from_fairchem",
           "convert_checkpoint", "convert_fairchem", "load_checkpoint", "model_section"]

log = logging.getLogger("lamm_ds")

# fairchem EquiformerV2Backbone.__init__ defaults (used for keys a config leaves out)
_FAIRCHEM_DEFAULTS = dict(
    max_neighbors=500, max_radius=5.0, max_num_elements=90, num_layers=12, sphere_channels=128,
    attn_hidden_channels=128, num_heads=8, attn_alpha_channels=32, attn_value_channels=16,
    ffn_hidden_channels=512, norm_type="rms_norm_sh", lmax_list=[6], mmax_list=[2], grid_resolution=None,
    edge_channels=128, use_atom_edge_embedding=True, share_atom_edge_embedding=False, use_m_share_rad=False,
    distance_function="gaussian", use_s2_act_attn=False, use_attn_renorm=True, use_gate_act=False,
    use_grid_mlp=False, use_sep_s2_act=True, alpha_drop=0.1, drop_path_rate=0.05, proj_drop=0.0,
    weight_init="normal", avg_num_nodes=None, avg_degree=None, use_energy_lin_ref=False, load_energy_lin_ref=False,
)
_AVG_NUM_NODES = 77.81317
_AVG_DEGREE = 23.395238876342773
# keys that do not change the computation (graph generation, bookkeeping, unused options)
_IGNORED = {"name", "model", "use_pbc", "use_pbc_single", "regress_forces", "otf_graph", "num_sphere_samples",
            "num_distance_basis", "attn_activation", "ffn_activation", "activation_checkpoint", "direct_forces"}
# fairchem's neighbour cap: strict k nearest (its default), or with False (OMat24 configs) every
# neighbour within the (k+1)-th nearest's squared distance + 0.01 Å^2 (lamm_ds.neighbors, strict=False)
_STRICT_KEY = "enforce_max_neighbors_strictly"
# what lamm-ds implements; anything else is refused rather than silently converted wrong
_REQUIRED = dict(share_atom_edge_embedding=False, use_m_share_rad=False, distance_function="gaussian",
                 use_s2_act_attn=False, use_attn_renorm=True, use_gate_act=False, use_sep_s2_act=True, proj_drop=0.0)
_ENERGY_HEADS = {"equiformer_v2_energy_head", "equiformerV2_scalar_head", "eqV2_DeNS_scalar_head"}
_FORCE_HEADS = {"equiformer_v2_force_head", "equiformerV2_vector_head", "eqV2_DeNS_vector_head"}
# fairchem's rank-2 symmetric tensor head (OMat24 / DeNS stress): lamm_ds.model.rank2_stress. Its
# options -> our config; the defaults are fairchem's. default_norm_type only applies to backbones
# without a norm_type (EquiformerV2 has one); use_denoising only acts while denoising.
_RANK2_HEADS = {"rank2_symmetric_head", "dens_rank2_symmetric_head"}
_RANK2_OPTIONS = dict(use_source_target_embedding=("stress_head_source_target", False),
                      num_mlp_layers=("stress_head_mlp_layers", 2), edge_level_mlp=("stress_head_edge_mlp", False),
                      extensive=("stress_head_extensive", False), avg_num_nodes=("stress_head_avg_num_nodes", 1.0))
_RANK2_IGNORED = {"module", "output_name", "decompose", "default_norm_type", "use_denoising"}
# fairchem sub-module prefix -> ours, inside the head
_RANK2_KEYS = (("sphharm_norm.", "sh_norm."), ("xedge_layer_norm.", "edge_norm."),
               ("block.scalar_MLP.", "iso_mlp."), ("block.irrep2_MLP.", "aniso_mlp."))
_STRESS_PARTS = {"stress_isotropic": 0, "stress_anisotropic": 2}  # normaliser / output key -> irrep degree
# DeNS (denoising non-equilibrium structures): the backbone encodes the noise's forces (and, with
# use_noise_schedule_sigma_encoding, its sigma) as node features; when nothing is denoised those
# inputs are zero and what is left is the encoders' l = 0 biases, added to every node: our
# ``l0_offset``. The heads name their blocks scalar_block / vector_block; the force head's
# denoising_pos_block only predicts the noise and is not converted.
_DENS_BACKBONE = "equiformer_v2_dens_backbone"
_DENS_OPTIONS = {"use_force_encoding", "use_noise_schedule_sigma_encoding"}
_DENS_OFFSET_BIASES = ("backbone.force_embedding.bias", "backbone.noise_schedule_sigma_embedding.bias")
_DENS_ENCODER_WEIGHTS = {f"backbone.{m}.{p}" for m in ("force_embedding", "noise_schedule_sigma_embedding")
                         for p in ("weight", "bias")}
_SKIP = re.compile(r"(^|\.)(SO3_rotation|mappingReduced|SO3_grid|mapping)\.|(^|\.)(expand_index|balance_degree_weight"
                   r"|to_grid_mat|from_grid_mat)$|distance_expansion\.offset$|^energy_lin_ref$")


_NOT_CONVERTED = "is not EquiformerV2 or PaiNN (the fairchem models lamm-ds converts)"


def model_section(config: dict) -> tuple[dict, dict, bool]:
    """(backbone kwargs, heads, monolithic?) from a fairchem checkpoint's ``config``."""
    model = config.get("model")
    if isinstance(model, str):
        if model != "equiformer_v2":
            raise ConversionError(f"model {model!r} {_NOT_CONVERTED}")
        return dict(config.get("model_attributes") or {}), {}, True
    if not isinstance(model, dict):
        raise ConversionError("checkpoint config has no 'model' section")
    name = model.get("name")
    if name == "equiformer_v2":
        return {k: v for k, v in model.items() if k != "name"}, {}, True
    if name == "hydra":
        backbone = dict(model.get("backbone") or {})
        kind = backbone.get("model")
        if kind not in ("equiformer_v2_backbone", "equiformer_v2", _DENS_BACKBONE):
            raise ConversionError(f"hydra backbone {kind!r} {_NOT_CONVERTED}")
        return backbone, dict(model.get("heads") or {}), False
    raise ConversionError(f"model {name!r} {_NOT_CONVERTED}")


def config_from_fairchem(kwargs: dict, energy_reduce: str = "sum", dens: bool = False) -> EquiformerV2Config:
    """Our config for a fairchem backbone's keyword arguments. Options that would change the
    computation and that lamm-ds does not implement are refused, never ignored. ``dens``: a DeNS
    backbone (its two options are known; the model gets an ``l0_offset``)."""
    kw = {**_FAIRCHEM_DEFAULTS, **kwargs}
    unknown = sorted(set(kwargs) - set(_FAIRCHEM_DEFAULTS) - _IGNORED - {_STRICT_KEY} - (_DENS_OPTIONS if dens else set()))
    if unknown:
        raise ConversionError(f"unknown EquiformerV2 option(s) {', '.join(unknown)}: lamm-ds cannot tell whether they "
                              "change the model's predictions, so it does not convert the checkpoint")
    for key, want in _REQUIRED.items():
        if kw[key] != want:
            raise ConversionError(f"EquiformerV2 option {key}={kw[key]!r} is not supported by lamm-ds (needs {want!r})")
    if len(kw["lmax_list"]) != 1 or len(kw["mmax_list"]) != 1:
        raise ConversionError("only single-resolution EquiformerV2 (one lmax/mmax) is supported")
    return EquiformerV2Config(
        num_layers=kw["num_layers"], lmax=kw["lmax_list"][0], mmax=kw["mmax_list"][0],
        sphere_channels=kw["sphere_channels"], attn_hidden_channels=kw["attn_hidden_channels"],
        num_heads=kw["num_heads"], attn_alpha_channels=kw["attn_alpha_channels"],
        attn_value_channels=kw["attn_value_channels"], ffn_hidden_channels=kw["ffn_hidden_channels"],
        edge_channels=kw["edge_channels"], grid_resolution=kw["grid_resolution"], cutoff=float(kw["max_radius"]),
        max_neighbors=kw["max_neighbors"], max_neighbors_strict=bool(kwargs.get(_STRICT_KEY, True)),
        max_z=kw["max_num_elements"] - 1, norm_type=kw["norm_type"],
        use_grid_mlp=kw["use_grid_mlp"], use_atom_edge_embedding=kw["use_atom_edge_embedding"],
        alpha_drop=kw["alpha_drop"], drop_path_rate=kw["drop_path_rate"],
        avg_degree=kw["avg_degree"] or _AVG_DEGREE, avg_num_nodes=kw["avg_num_nodes"] or _AVG_NUM_NODES,
        energy_reduce=energy_reduce, weight_init=kw["weight_init"], l0_offset=dens,
        # an energy-only model (IS2RE) has no force block: -dE/dx then, as for PaiNN (the command says so)
        forces="direct" if kw.get("regress_forces", True) else "conservative")


def _head_names(heads: dict) -> tuple[str | None, str | None, str | None, list[str]]:
    """(energy head, force head, stress head, heads not converted). A rank-2 head is the stress
    head when it predicts ``stress`` (fairchem's default output_name); one for another tensor
    (e.g. a dielectric tensor) is not converted."""
    energy = force = stress = None
    other = []
    for name, spec in heads.items():
        spec = spec or {}
        module = spec.get("module")
        if module in _ENERGY_HEADS and energy is None:
            energy = name
        elif module in _FORCE_HEADS and force is None:
            force = name
        elif module in _RANK2_HEADS and stress is None and spec.get("output_name", "stress") == "stress":
            stress = name
        else:
            other.append(name)
    return energy, force, stress, other


def stress_head_config(name: str, spec: dict) -> dict:
    """``EquiformerV2Config`` fields for fairchem rank-2 head ``name``; options lamm-ds does not
    implement (or does not know) are refused, naming them."""
    unknown = sorted(set(spec) - set(_RANK2_OPTIONS) - _RANK2_IGNORED)
    if unknown:
        raise ConversionError(f"rank-2 head {name!r}: unknown option(s) {', '.join(unknown)}: lamm-ds cannot tell "
                              "whether they change its predictions, so it does not convert the checkpoint")
    if not spec.get("decompose", False):
        raise ConversionError(f"rank-2 head {name!r}: decompose=False (one MLP per Cartesian component, "
                              "Rank2Block) is not supported; lamm-ds converts the isotropic + anisotropic "
                              "decomposition (decompose=True, the OMat24 configuration)")
    out = {"stress_head": True}
    for theirs, (ours, default) in _RANK2_OPTIONS.items():
        out[ours] = spec.get(theirs, default)
    layers = out["stress_head_mlp_layers"]
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ConversionError(f"rank-2 head {name!r}: num_mlp_layers={layers!r} (needs an integer >= 1)")
    for key in ("stress_head_source_target", "stress_head_edge_mlp", "stress_head_extensive"):
        if not isinstance(out[key], bool):
            raise ConversionError(f"rank-2 head {name!r}: option {key} must be true/false, got {out[key]!r}")
    try:
        out["stress_head_avg_num_nodes"] = float(out["stress_head_avg_num_nodes"])
    except (TypeError, ValueError):
        raise ConversionError(f"rank-2 head {name!r}: avg_num_nodes={spec.get('avg_num_nodes')!r} "
                              "is not a number") from None
    if not out["stress_head_avg_num_nodes"] > 0:
        raise ConversionError(f"rank-2 head {name!r}: avg_num_nodes must be > 0, "
                              f"got {out['stress_head_avg_num_nodes']}")
    return out


def _check_stress_outputs(config: dict) -> None:
    """fairchem rebuilds ``stress`` from the outputs its config names: those must be ours."""
    spec = (config.get("outputs") or {}).get("stress")
    if not isinstance(spec, dict) or "decomposition" not in spec:
        return
    parts = {k: (v or {}).get("irrep_dim") for k, v in (spec["decomposition"] or {}).items()}
    if parts != _STRESS_PARTS:
        raise ConversionError(f"config outputs.stress.decomposition is {parts}; lamm-ds converts "
                              f"{_STRESS_PARTS} (name: irrep_dim)")


def map_state_dict(state: dict, monolithic: bool, energy_head: str | None, force_head: str | None,
                   dataset: str, stress_head: str | None = None) -> tuple[dict, list[str]]:
    """fairchem keys -> lamm-ds keys; returns (mapped, skipped fairchem keys)."""
    mapped, skipped = {}, []
    for raw_key, value in state.items():
        new = _map_key(raw_key, monolithic, energy_head, force_head, dataset, stress_head)
        if new is None:
            skipped.append(raw_key)
        else:
            mapped[new] = value
    return mapped, skipped


def _map_key(raw_key: str, monolithic: bool, energy_head: str | None, force_head: str | None,
             dataset: str, stress_head: str | None = None) -> str | None:
    """The lamm-ds key of one fairchem key; None for a head lamm-ds does not convert."""
    key = strip_module(raw_key)
    if monolithic:
        if key.startswith("energy_block."):
            return f"heads.{dataset}.{key}"
        if key.startswith("force_block."):
            return f"force_head.{key}"
        return f"backbone.{key}"
    if key.startswith("backbone."):
        return key
    for block in ("energy_block.", "scalar_block."):  # scalar_block: DeNS's energy head
        if energy_head and key.startswith(f"output_heads.{energy_head}.{block}"):
            return f"heads.{dataset}.energy_block." + key[len(f"output_heads.{energy_head}.{block}"):]
    for block in ("force_block.", "vector_block."):   # vector_block: DeNS's force head
        if force_head and key.startswith(f"output_heads.{force_head}.{block}"):
            return "force_head.force_block." + key[len(f"output_heads.{force_head}.{block}"):]
    if stress_head and key.startswith(f"output_heads.{stress_head}."):
        rest = key[len(f"output_heads.{stress_head}."):]
        for theirs, ours in _RANK2_KEYS:
            if rest.startswith(theirs):
                return f"stress_head.{ours}{rest[len(theirs):]}"
        return f"stress_head.{rest}"  # not ours: convert_checkpoint refuses it by name
    return None


def _dens_offset(mapped: dict, backbone_kw: dict) -> dict:
    """DeNS: the encoders' l = 0 biases summed into ``backbone.l0_offset``, the rest of the encoders
    (weights that only see the noise) dropped. The force head's denoising_pos_block never gets
    here: ``_map_key`` does not map it."""
    biases = [_DENS_OFFSET_BIASES[0]]
    if backbone_kw.get("use_noise_schedule_sigma_encoding", False):
        biases.append(_DENS_OFFSET_BIASES[1])
    missing = [b for b in biases if b not in mapped]
    if missing:
        raise ConversionError(f"DeNS checkpoint lacks {missing}")
    offset = sum(mapped[b].double() for b in biases)
    return {**{k: v for k, v in mapped.items() if k not in _DENS_ENCODER_WEIGHTS}, "backbone.l0_offset": offset}


def ema_state(ckpt: dict, monolithic: bool, energy_head: str | None, force_head: str | None, dataset: str,
              params: set[str], dens_backbone_kw: dict | None = None, stress_head: str | None = None) -> dict:
    """lamm-ds key -> EMA tensor. fairchem's EMA keeps ``shadow_params``, one per trainable parameter
    in ``model.parameters()`` order, which is the order of the parameters among the state_dict keys.
    Trainable here: keys that map to a lamm-ds parameter, and every key of a head (or block) that is
    not converted, except fairchem's shared non-trainable buffers (rotation, grid and index tensors). The count and every shape must agree, or nothing is used."""
    shadows = list(ckpt["ema"]["shadow_params"])
    order = []
    for raw_key, value in ckpt["state_dict"].items():
        new = _map_key(raw_key, monolithic, energy_head, force_head, dataset, stress_head)
        dens_extra = dens_backbone_kw is not None and new in _DENS_ENCODER_WEIGHTS
        unconverted_weight = new is None and not _SKIP.search(strip_module(raw_key))  # not a shared buffer
        if unconverted_weight or new in params or dens_extra:
            order.append((new, tuple(torch.as_tensor(value).shape)))
    shapes = [tuple(torch.as_tensor(s).shape) for s in shadows]
    if len(order) != len(shadows) or [shape for _, shape in order] != shapes:
        first = next((k for k, ((_, a), b) in enumerate(zip(order, shapes)) if a != b), min(len(order), len(shapes)))
        raise ConversionError(f"cannot align the checkpoint's {len(shadows)} EMA tensors with its {len(order)} "
                              f"trainable weights (first mismatch at position {first}); pass --weights raw to "
                              "convert the raw weights instead")
    out = {new: torch.as_tensor(s) for (new, _), s in zip(order, shadows) if new is not None}
    return _dens_offset(out, dens_backbone_kw) if dens_backbone_kw is not None else out


def _stress_normalizers(ckpt: dict) -> tuple[float, float, float]:
    """(isotropic mean, isotropic std, anisotropic std) of fairchem's stress normalisers.

    The isotropic mean is a constant pressure, folded into the head; an anisotropic mean would add
    the same number to all five l = 2 components, a fixed traceless tensor in the lab frame that
    does not rotate with the structure: refused, as a non-zero force mean is."""
    iso_mean, iso_std = normaliser(ckpt, "stress_isotropic")
    aniso_mean, aniso_std = normaliser(ckpt, "stress_anisotropic")
    if aniso_mean != 0.0:
        raise ConversionError(f"stress_anisotropic normaliser mean {aniso_mean} != 0 is not supported (it would "
                              "add a constant traceless stress that does not rotate with the structure)")
    return iso_mean, iso_std, aniso_std


def convert_checkpoint(ckpt: dict | str | os.PathLike, dataset: str = "fairchem",
                       dtype: torch.dtype = torch.float32, trust_pickle: bool = False,
                       weights: str = "auto", scale_file: str | os.PathLike | None = None) -> EquiformerV2Potential:
    """A lamm-ds model equivalent to the fairchem checkpoint (eval mode): an
    :class:`EquiformerV2Potential`, or for a PaiNN checkpoint a
    :class:`~lamm_ds.model.painn_fairchem.FairchemPaiNNPotential`
    (:mod:`lamm_ds.model.convert_fairchem_painn`; ``scale_file`` is its scale-factor file).

    ``weights``: ``auto`` (default) takes the EMA copy when the checkpoint has one and its config an
    ``ema_decay``, as fairchem's own prediction path does; ``ema`` / ``raw`` force one or the other.
    The result's ``weights_source`` says which was used.

    A path is read with :func:`load_checkpoint` (weights-only unless ``trust_pickle``). The result's
    ``trained_elements`` is ``None``: a checkpoint does not say which elements it was trained on.
    """
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt, trust_pickle=trust_pickle)
    if "state_dict" not in ckpt or "config" not in ckpt:
        raise ConversionError("not a fairchem checkpoint (needs 'state_dict' and 'config')")
    if not isinstance(ckpt["state_dict"], dict) or not isinstance(ckpt["config"], dict):
        raise ConversionError("not a fairchem checkpoint ('state_dict' and 'config' must be dicts)")
    if is_painn(ckpt["config"]):
        return convert_painn_checkpoint(ckpt, dataset, dtype, weights, scale_file)
    if scale_file is not None:
        raise ConversionError("--scale-file applies to PaiNN checkpoints only (EquiformerV2 has no scale factors)")
    backbone_kw, heads, monolithic = model_section(ckpt["config"])
    energy_head, force_head, stress_head, other_heads = _head_names(heads)
    reduce = "sum"
    if energy_head is not None:
        reduce = heads[energy_head].get("reduce", "sum")
    regress_forces = bool(backbone_kw.get("regress_forces", True))
    if not monolithic and (energy_head is None or (force_head is None and regress_forces)):
        raise ConversionError(f"hydra model needs an EquiformerV2 energy and force head, has {sorted(heads)}")
    if not regress_forces:
        log.warning("convert-fairchem: this EquiformerV2 checkpoint predicts no forces (regress_forces=false, e.g. "
                    "an IS2RE model); the converted model gives -dE/dx, which the checkpoint itself never predicted")
    if other_heads:
        log.warning("convert-fairchem: heads %s are not converted (lamm-ds has energy, direct forces and a "
                    "rank-2 stress head)", other_heads)
    dens = not monolithic and ckpt["config"]["model"].get("backbone", {}).get("model") == _DENS_BACKBONE
    cfg = config_from_fairchem(backbone_kw, reduce, dens=dens)
    if stress_head is not None:
        _check_stress_outputs(ckpt["config"])
        cfg = dataclasses.replace(cfg, **stress_head_config(stress_head, heads[stress_head]))
    mapped, skipped = map_state_dict(ckpt["state_dict"], monolithic, energy_head, force_head, dataset, stress_head)
    if dens:
        mapped = _dens_offset(mapped, backbone_kw)
        log.warning("convert-fairchem: DeNS checkpoint: its denoising parts (the force/sigma encoders' weights, the "
                    "force head's denoising_pos_block) are not converted; their constant when nothing is denoised "
                    "(the encoders' l=0 bias) becomes backbone.l0_offset, so predictions match DeNS's on clean input")

    e_mean, e_std, f_mean, f_std = normalizers(ckpt)
    if abs(f_mean) > 0:
        raise ConversionError(f"force normaliser mean {f_mean} != 0 is not supported")
    refs = np.zeros(cfg.max_z + 1)
    lin_ref = mapped.pop("backbone.energy_lin_ref", None)
    use_lin_ref = {**_FAIRCHEM_DEFAULTS, **backbone_kw}["use_energy_lin_ref"]
    if lin_ref is not None and use_lin_ref:
        refs += e_std * lin_ref.double().numpy()[:cfg.max_z + 1]
    refs += element_references(ckpt, cfg.max_z)
    warn_residual_energies(ckpt, adds_linear_reference=bool(lin_ref is not None and use_lin_ref))

    stats = DatasetStats(refs, energy_mean=0.0, energy_std=e_std, force_std=f_std)
    model = EquiformerV2Potential(cfg, [dataset], {dataset: stats}).to(dtype)
    model.heads[dataset].offset.energy_offset.fill_(e_mean)
    if stress_head is not None:
        norm = model.stress_head.norm
        for buf, value in zip((norm.iso_mean, norm.iso_std, norm.aniso_std), _stress_normalizers(ckpt)):
            buf.fill_(value)
    ours = model.state_dict()
    loadable = {}
    for key, value in mapped.items():
        if key in ours:
            if tuple(ours[key].shape) != tuple(value.shape):
                raise ConversionError(f"{key}: shape {tuple(value.shape)} in the checkpoint, lamm-ds expects "
                                      f"{tuple(ours[key].shape)}")
            loadable[key] = value.to(ours[key].dtype)
        elif _SKIP.search(key):
            skipped.append(key)
        else:
            raise ConversionError(f"checkpoint tensor {key!r} has no counterpart in lamm-ds's EquiformerV2")
    params = {n for n, _ in model.named_parameters()}
    missing = sorted(params - set(loadable))
    if missing:
        raise ConversionError(f"checkpoint lacks weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.weights_source = "raw"
    if uses_ema(ckpt, weights):
        for key, value in ema_state(ckpt, monolithic, energy_head, force_head, dataset, params,
                                    backbone_kw if dens else None, stress_head).items():
            loadable[key] = value.to(ours[key].dtype)
        model.weights_source = "ema"
    model.load_state_dict(loadable, strict=False)
    return model.eval()


def convert_fairchem(checkpoint: str | os.PathLike, out: str | os.PathLike, dataset: str = "fairchem",
                     trust_pickle: bool = False, weights: str = "auto",
                     scale_file: str | os.PathLike | None = None) -> Path:
    """``lamm-ds convert-fairchem``: write the converted model as a lamm-ds export.

    ``trust_pickle=True`` unpickles a checkpoint that weights-only loading refuses (can run code
    from the file: only for files you trust). Errors name the checkpoint.
    """
    from lamm_ds.engine.export import export_model

    ckpt = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    try:
        model = convert_checkpoint(ckpt, dataset, weights=weights, scale_file=scale_file)
    except ConversionError as exc:
        raise ConversionError(f"{checkpoint}: {exc}") from None
    extra = {"converted_from": str(checkpoint), "source": f"fairchem {SOURCE_NAMES[model.model_kind]}",
             "weights": model.weights_source}
    if hasattr(model, "scale_source"):
        extra["scale_factors"] = model.scale_source
    return export_model(model, out, extra)


#: model kind -> the fairchem model family it was converted from
SOURCE_NAMES = {"equiformer_v2": "EquiformerV2", "painn_fairchem": "PaiNN"}
