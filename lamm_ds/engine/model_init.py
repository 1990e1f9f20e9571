"""The model a run trains: a fresh one (references and normalisation fitted per dataset), or a
pre-trained one for fine-tuning (new heads, optional force-mode switch, frozen backbone, a
report of elements it never saw)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from lamm_ds.engine.checkpoint import CheckpointError
from lamm_ds.engine.config import RunConfig, model_config
from lamm_ds.engine.data import fit_stats
from lamm_ds.engine.export import build_potential, load_model
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
    """A fresh model, or (fine-tuning) a pre-trained one with heads added for new datasets."""
    ft = cfg.finetune
    if ft.init is None:
        return build_model(cfg, datasets)
    model = load_pretrained(ft.init)
    model = finetune_force_mode(model, ft.forces, ft.init, rank)
    if rank == 0:
        report_new_elements(model, datasets)
    for entry, d in zip(cfg.data.datasets, datasets, strict=True):
        if d.name not in model.dataset_names:
            stats = fit_stats(d, model.cfg.max_z, cfg.data.stats_samples, cfg.seed, entry)
            model.add_dataset(d.name, stats, init_from=ft.head_init_from)
            if rank == 0:
                log.info("fine-tuning: new head %r (references fitted on %s)", d.name, d.path)
    if ft.freeze_backbone:
        for n, p in model.named_parameters():
            if not n.startswith("heads."):
                p.requires_grad_(False)
    return model.train()


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


def report_new_elements(model: Potential, datasets) -> None:
    """Say loudly which elements of the fine-tuning data the pre-trained backbone never saw."""
    from ase.data import chemical_symbols

    seen = getattr(model, "trained_elements", None)
    wanted = sorted({int(z) for d in datasets for z in d.manifest.get("elements", [])})
    if seen is None:
        log.warning("fine-tuning: the pre-trained model does not record which elements it was trained on "
                    "(exported by an older lamm-ds, or converted); elements new to it cannot be reported")
        return
    known = set().union(*map(set, seen.values())) if seen else set()
    new = [z for z in wanted if z not in known]
    if new:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in new)
        log.warning("fine-tuning: %d element(s) the pre-trained model never saw: %s. Their embedding rows were "
                    "never trained and start from their random initial values, and no pre-trained head has a "
                    "reference energy for them (the new head fits one from the fine-tuning data). Expect the "
                    "fine-tune to gain little over training from scratch for structures holding them.",
                    len(new), names)


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
