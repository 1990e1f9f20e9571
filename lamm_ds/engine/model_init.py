"""The model a run trains: a fresh one (references and normalisation fitted per dataset), or a
pre-trained one for fine-tuning (new heads copied from the closest pre-trained head, optional
force-mode switch, frozen parts, elements it never saw reported and started from similar ones)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from lamm_ds.engine.checkpoint import CheckpointError
from lamm_ds.engine.config import ConfigError, RunConfig, model_config
from lamm_ds.engine.data import fit_stats, parse_replay
from lamm_ds.engine.export import build_potential, format_elements, load_model
from lamm_ds.model.elements import closest_head, init_new_element_rows
from lamm_ds.model.layers import num_layers, parameter_depth
from lamm_ds.model.potential import Potential

log = logging.getLogger("lamm_ds")


def build_model(cfg: RunConfig, datasets) -> Potential:
    """A fresh model of the configured kind: references and normalisation fitted on each dataset,
    initial weights from ``cfg.seed``."""
    mcfg = model_config(cfg)
    stats = {d.name: fit_stats(d, mcfg.max_z, cfg.data.stats_samples, cfg.seed, entry)
             for entry, d in zip(cfg.data.datasets, datasets, strict=True)}
    torch.manual_seed(cfg.seed)
    return build_potential(cfg.model_kind, mcfg, [d.name for d in datasets], stats)


def build_or_init_model(cfg: RunConfig, datasets, rank: int) -> Potential:
    """A fresh model, or (fine-tuning) a pre-trained one: new elements' embeddings initialised, heads
    added for new datasets, the chosen parts frozen."""
    ft = cfg.finetune
    if ft.init is None:
        return build_model(cfg, datasets)
    model = load_pretrained(ft.init)
    model = finetune_force_mode(model, ft.forces, ft.init, rank)
    new = report_new_elements(model, datasets) if rank == 0 else new_elements(model, datasets)
    if new and ft.new_elements == "similar":
        init_new_elements(model, new, rank)
    check_replay_heads(model, cfg, datasets)
    for entry, d in zip(cfg.data.datasets, datasets, strict=True):
        if d.name not in model.dataset_names:
            stats = fit_stats(d, model.cfg.max_z, cfg.data.stats_samples, cfg.seed, entry)
            source = head_to_copy(model, ft.head_init_from, d)
            model.add_dataset(d.name, stats, init_from=source)
            if rank == 0:
                log.info("fine-tuning: new head %r (references fitted on %s; %s)", d.name, d.path,
                         f"MLP copied from head {source!r}" if source else "random MLP")
    freeze(model, ft)
    return model.train()


def check_replay_heads(model: Potential, cfg: RunConfig, datasets) -> None:
    """A replayed set must be one the model was pre-trained on: it trains into that set's own head."""
    replayed = {parse_replay(item)[0] for item in cfg.finetune.replay}
    for entry, d in zip(cfg.data.datasets, datasets):
        if entry.path in replayed and d.name not in model.dataset_names:
            raise ConfigError(f"finetune.replay: {entry.path} holds dataset {d.name!r}, which is not a head of the "
                              f"pre-trained model (heads: {model.dataset_names}); replay mixes in the model's own "
                              "pre-training sets")


def head_to_copy(model: Potential, choice: str | None, dataset) -> str | None:
    """The pre-trained head a new head copies: a named one, the closest by composition ("auto"), or none."""
    if choice is None:
        return None
    if choice != "auto":
        if choice not in model.dataset_names:
            raise ConfigError(f"finetune.head_init_from={choice!r} is not a head of the pre-trained model; "
                              f"its heads: {model.dataset_names}")
        return choice
    trained = {h: zs for h, zs in (getattr(model, "trained_elements", None) or {}).items()
               if h in model.dataset_names}
    wanted = [int(z) for z in dataset.manifest.get("elements", [])]
    picked = closest_head(wanted, trained)
    if picked is None and len(model.dataset_names) == 1:
        return model.dataset_names[0]  # one head, coverage unknown (e.g. a converted fairchem model)
    return picked


def freeze(model: Potential, ft) -> None:
    """``requires_grad_(False)`` on the frozen parts: the whole backbone, its input side, or its first layers."""
    if ft.freeze_layers > num_layers(model):
        raise ConfigError(f"finetune.freeze_layers={ft.freeze_layers}, but the model has {num_layers(model)} layers")
    for name, p in model.named_parameters():
        depth = parameter_depth(model, name)
        backbone_part = name.startswith("backbone.") and depth <= num_layers(model)
        if ((ft.freeze_backbone and name.startswith("backbone."))
                or (ft.freeze_embeddings and backbone_part and depth == 0)
                or (backbone_part and 1 <= depth <= ft.freeze_layers)):
            p.requires_grad_(False)


def init_new_elements(model: Potential, new: list[int], rank: int) -> None:
    """Each new element's embedding rows := the mean of its nearest trained elements' rows."""
    known = set().union(*map(set, model.trained_elements.values())) if model.trained_elements else set()
    sources = init_new_element_rows(model, new, known)
    if rank == 0:
        for z, like in sources.items():
            if like:
                log.info("fine-tuning: embedding rows of %s initialised as the mean of %s (nearest trained "
                         "elements in the periodic table)", format_elements([z]), format_elements(like))
            else:
                log.warning("fine-tuning: no trained element to initialise %s from; its rows stay random",
                            format_elements([z]))


DIRECT_FORCES_WARNING = (
    "fine-tuning %s keeps its direct force head (model.forces=direct): its forces are not the gradient of its "
    "energy, so molecular dynamics does not conserve energy (NVE drifts) and relaxations can go uphill. "
    "Pass finetune.forces=conservative to fine-tune with F = -dE/dx instead (the direct force head is dropped; "
    "training is slower: it needs a double backward), or finetune.forces=direct to keep direct forces knowingly.")


def finetune_force_mode(model: Potential, forces: str | None, source: str, rank: int) -> Potential:
    """The pre-trained model with the requested force mode; warns when a direct-force model is
    fine-tuned without the user having chosen direct forces."""
    current = model.cfg.forces
    if forces is None:
        if current == "direct" and rank == 0:
            log.warning(DIRECT_FORCES_WARNING, source)
        return model
    if forces == current:
        return model
    new_cfg = dataclasses.replace(model.cfg, forces=forces, stress=False)
    converted = type(model)(new_cfg, model.dataset_names)
    missing, unexpected = converted.load_state_dict(model.state_dict(), strict=False)
    converted.trained_elements = getattr(model, "trained_elements", None)
    if rank == 0:
        if forces == "conservative":
            log.warning("fine-tuning: switched %s from direct to conservative forces (F = -dE/dx); dropped the "
                        "direct force head (%d tensors)", source, len(unexpected))
        else:
            log.warning("fine-tuning: switched %s from conservative to direct forces; the new direct force "
                        "head (%d tensors) starts from random weights", source, len(missing))
    bad = [k for k in missing if not _is_force_head_key(k)] + [k for k in unexpected if not _is_force_head_key(k)]
    if bad:
        raise ValueError(f"{source}: cannot switch to forces={forces}: weights {bad[:5]} do not carry over")
    return converted.train()


def _is_force_head_key(key: str) -> bool:
    return key.startswith(("force_head.", "force_block.", "backbone.force_block."))


def new_elements(model: Potential, datasets) -> list[int]:
    """Elements of the fine-tuning data that the pre-trained backbone never saw (empty when unknown)."""
    seen = getattr(model, "trained_elements", None)
    if seen is None:
        return []
    known = set().union(*map(set, seen.values())) if seen else set()
    return sorted({int(z) for d in datasets for z in d.manifest.get("elements", [])} - known)


def report_new_elements(model: Potential, datasets) -> list[int]:
    """Say loudly which elements of the fine-tuning data the pre-trained backbone never saw; returns them."""
    if getattr(model, "trained_elements", None) is None:
        log.warning("fine-tuning: the pre-trained model does not record which elements it was trained on "
                    "(exported by an older lamm-ds, or converted); elements new to it cannot be reported")
        return []
    new = new_elements(model, datasets)
    if new:
        log.warning("fine-tuning: %d element(s) the pre-trained model never saw: %s. No pre-trained head has a "
                    "reference energy for them (the new head fits one from the fine-tuning data), and their "
                    "embedding rows were never trained (finetune.new_elements=similar starts them from the "
                    "nearest trained elements').", len(new), format_elements(new))
    return new


def load_pretrained(path: str) -> Potential:
    """An exported model file, or a run/checkpoint directory holding one (``model.safetensors``)."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / "model.safetensors", p.parent / "model.safetensors"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(f"{p}: no model.safetensors in this run/checkpoint directory "
                                  "(export one, or point --init at the file)")
        p = found
    return load_model(p)
