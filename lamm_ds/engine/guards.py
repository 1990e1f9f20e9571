"""Checks a training run makes before it spends compute: every dataset must be able to reach the
loss, and the model records which elements each head was trained on."""

from __future__ import annotations

import numpy as np

from lamm_ds.engine.config import RunConfig


class UselessDatasetError(ValueError):
    """A configured dataset cannot contribute any term to the loss."""


def predicts_stress(model_cfg) -> bool:
    """Whether a model's forward gives stress: as the strain derivative (``stress``, conservative
    forces) or from EquiformerV2's direct rank-2 head (``stress_head``)."""
    return bool(getattr(model_cfg, "stress", False) or getattr(model_cfg, "stress_head", False))


def dataset_contributions(dataset, cfg: RunConfig, stress_model: bool) -> list[str]:
    """The loss terms a dataset can feed under ``cfg`` (empty: training on it would do nothing)."""
    idx = dataset.index
    has_e, has_f = np.asarray(idx["has_energy"], bool), np.asarray(idx["has_forces"], bool)
    has_s = np.asarray(idx["has_stress"], bool)
    terms = []
    if cfg.loss.energy_weight > 0 and has_e.any():
        terms.append("energy")
    if cfg.loss.force_weight > 0 and has_f.any():
        terms.append("forces")
    if cfg.loss.stress_weight > 0 and stress_model and has_s.any():
        terms.append("stress")
    if cfg.denoise_unlabelled and cfg.loss.pseudo_force_weight > 0:
        unlabelled = ~(has_e | has_f)
        if unlabelled.any() or (cfg.denoise.labelled_probability > 0 and len(has_e)):
            terms.append("denoising")
    return terms


def check_datasets_contribute(datasets, cfg: RunConfig, stress_model: bool) -> None:
    """Refuse a run in which some dataset can add nothing to the loss (a likely mislabelled ingest:
    e.g. labels stored under keys the ingest did not read). Names the dataset and its labels."""
    for entry, ds in zip(cfg.data.datasets, datasets):
        if dataset_contributions(ds, cfg, stress_model):
            continue
        counts = ds.manifest.get("label_counts", {})
        why = []
        if not cfg.denoise_unlabelled and counts.get("unlabelled"):
            why.append("its unlabelled structures need denoise_unlabelled=true")
        if counts.get("energy") and cfg.loss.energy_weight <= 0:
            why.append("loss.energy_weight is 0")
        if counts.get("forces") and cfg.loss.force_weight <= 0:
            why.append("loss.force_weight is 0")
        if counts.get("stress") and not (cfg.loss.stress_weight > 0 and stress_model):
            why.append("stress needs loss.stress_weight > 0 and a model with stress")
        raise UselessDatasetError(
            f"dataset {entry.name!r} ({ds.path}) can contribute nothing to the loss: labels "
            f"energy {counts.get('energy', 0)}, forces {counts.get('forces', 0)}, stress {counts.get('stress', 0)}, "
            f"unlabelled {counts.get('unlabelled', 0)} of {len(ds)} structures"
            + (f"; {'; '.join(why)}" if why else "")
            + ". If its labels live under other keys, re-ingest with --energy-key/--forces-key; "
            "otherwise remove it from data.datasets")


def dataset_elements(datasets) -> dict[str, list[int]]:
    """Head name -> sorted atomic numbers present in that dataset (from its manifest)."""
    return {ds.name: sorted(int(z) for z in ds.manifest.get("elements", [])) for ds in datasets}


def merge_trained_elements(previous: dict[str, list[int]] | None, datasets) -> dict[str, list[int]]:
    """The element coverage of a model after training on ``datasets`` (a fine-tune keeps what the
    pre-trained heads had seen and adds the new datasets' elements to their heads)."""
    merged = {k: sorted(set(v)) for k, v in (previous or {}).items()}
    for name, elements in dataset_elements(datasets).items():
        merged[name] = sorted(set(merged.get(name, [])) | set(elements))
    return merged


def nonfinite_structures(out: dict, batch, head_names: list[str], datasets, limit: int = 8) -> str:
    """Which structures of a batch gave a non-finite energy or (pseudo-)force (all of them if none did:
    then the loss itself overflowed), as 'name[index] (source file: structure k)'."""
    import torch

    energy = out["energy"].detach()
    bad = ~torch.isfinite(energy)
    for key in ("forces", "pseudo_forces"):  # pseudo_forces: a separate denoising head's output
        if key in out:
            atom_bad = ~torch.isfinite(out[key].detach()).all(dim=-1)
            bad = bad | torch.zeros_like(bad).index_add_(0, batch.batch, atom_bad.to(bad.dtype)).bool()
    graphs = torch.nonzero(bad).flatten().tolist() or list(range(batch.num_graphs))
    by_name = {d.name: d for d in datasets}
    parts = []
    for g in graphs[:limit]:
        name = head_names[int(batch.dataset_id[g])]
        index = int(batch.sample_id[g])
        where = ""
        if name in by_name:
            try:
                s = by_name[name][index]
                where = f" ({s.source}: structure {s.source_index})"
            except Exception:  # describing the failure must not hide it
                pass
        parts.append(f"{name}[{index}]{where}")
    more = f" and {len(graphs) - limit} more" if len(graphs) > limit else ""
    kind = "non-finite predictions for" if bad.any() else "a non-finite loss over"
    return f"{kind} {', '.join(parts)}{more}"


def check_eval_heads(model, entries) -> None:
    """Every configured evaluation set must name its head unambiguously and hold labels to score,
    checked before training (not at the final evaluation, after hours of compute)."""
    from lamm_ds.engine.config import ConfigError
    from lamm_ds.engine.evaluate import choose_head, load_structures

    for entry in entries:
        try:
            choose_head(model, entry.name, entry.head, what=f"eval dataset {entry.name!r} ({entry.path})")
            load_structures(entry.path)  # reads the file once more at the end: evaluation sets are small
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"eval_datasets: {exc}") from None
