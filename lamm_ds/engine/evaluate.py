"""Energy/force errors of a model on stored datasets or any ASE-readable file."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lamm_ds.engine.export import UnseenElementsError, format_elements, unseen_elements, unseen_elements_message
from lamm_ds.graphs import build_sample, collate
from lamm_ds.model.potential import Potential
from lamm_ds.structure import Structure

log = logging.getLogger("lamm_ds")


def load_structures(source: str | Path, require_labels: bool = True) -> tuple[str, Sequence[Structure]]:
    """(name, structures) from a lamm-ds dataset directory or an ASE-readable file (name: the
    manifest's, or the file's stem). ``require_labels``: refuse input without energy or forces."""
    from lamm_ds.shards import LmdbDataset, is_dataset_dir

    if is_dataset_dir(source):
        ds = LmdbDataset(source)
        lc = ds.manifest["label_counts"]
        if require_labels and not (lc.get("energy") or lc.get("forces")):
            raise ValueError(f"{source}: the dataset has no energy or force labels: nothing to score")
        return ds.name, ds
    from lamm_ds.ingest.readers import LabelKeys, iter_source, missing_labels_error

    structures = list(iter_source(Path(source), LabelKeys()))
    if not structures:
        raise ValueError(f"{source}: no structures")
    if require_labels and not any(s.energy is not None or s.forces is not None for s in structures):
        # labels under other keys would otherwise give NaN errors with exit code 0
        raise ValueError(f"{missing_labels_error(Path(source), LabelKeys())} (evaluate reads the standard keys: "
                         "ingest the file with those flags and evaluate the dataset directory)")
    return Path(source).stem, structures


def choose_head(model: Potential, name: str | None, explicit: str | None = None, *, what: str | None = None,
                hint: str = "set head: in its eval_datasets entry") -> str:
    """The energy head for an evaluation set.

    ``explicit`` wins (an unknown head is an error listing the heads); else a single-head model's
    head; else the head named ``name`` (a configured set's name, or a lamm-ds dataset's manifest
    name; pass ``None`` for a plain file, whose name says nothing about its level of theory); else
    ``ValueError`` listing the heads, saying what to do (``hint``). Never a silent first-head fallback.
    """
    heads = model.dataset_names
    if explicit is not None:
        if explicit not in heads:
            raise ValueError(f"unknown head {explicit!r}; this model has heads: {', '.join(heads)}")
        return explicit
    if len(heads) == 1:
        return heads[0]
    if name is not None and name in heads:
        return name
    label = what or (repr(name) if name is not None else "this input")
    named = f" and none is named {name!r}" if name is not None else ""
    raise ValueError(f"cannot tell which energy head to use for {label}: the model has {len(heads)} heads "
                     f"({', '.join(heads)}){named}; {hint}")


def elements_of(structures) -> list[int]:
    """Sorted atomic numbers occurring in ``structures`` (a lamm-ds dataset: from its manifest)."""
    manifest = getattr(structures, "manifest", None)
    if isinstance(manifest, dict) and "elements" in manifest:
        return sorted(int(z) for z in manifest["elements"])
    present: set[int] = set()
    for k in range(len(structures)):
        present.update(int(z) for z in np.unique(structures[k].numbers))
    return sorted(present)


def _unseen_in(model: Potential, head: str, structures) -> list[int]:
    trained = getattr(model, "trained_elements", None)
    if not trained or head not in trained:  # coverage unknown: nothing to check (and no pass over the data)
        return []
    return unseen_elements(model, head, elements_of(structures))


def check_elements(model: Potential, head: str, structures, source: str | None = None,
                   override: str = "allow_unseen_elements=True") -> None:
    """Raise :class:`UnseenElementsError` if ``structures`` hold elements ``head`` was not trained on,
    checked once over the union of their elements (so the message lists every offender). No-op
    when the model does not record the head's coverage."""
    unseen = _unseen_in(model, head, structures)
    if unseen:
        raise UnseenElementsError(unseen_elements_message(model, head, unseen, source, override))


def evaluate_entries(model: Potential, entries, allow_unseen_elements: bool = True) -> dict[str, dict]:
    """:func:`evaluate` for each configured ``DatasetConfig`` (name, path, optional head).

    Training-time evaluation: elements a head was not trained on are logged as a warning and listed
    under ``unseen_elements`` in that set's result (``allow_unseen_elements=False`` raises instead).
    """
    results = {}
    for entry in entries:
        _, structures = load_structures(entry.path)
        head = choose_head(model, entry.name, entry.head, what=f"eval dataset {entry.name!r}")
        results[entry.name] = evaluate(model, structures, head=head, allow_unseen_elements=allow_unseen_elements,
                                       source=f"eval dataset {entry.name!r} ({entry.path})")
    return results


@dataclass
class PreparedEvalSet:
    """An evaluation set read and turned into graphs once, for repeated evaluation during training."""

    name: str
    head: str | None
    structures: list
    samples: list
    cutoff: float
    max_neighbors: int | None
    strict: bool = True

    def evaluate(self, model: Potential, batch_size: int = 32, allow_unseen_elements: bool = True) -> dict:
        used = (model.cfg.cutoff, model.cfg.max_neighbors, model.cfg.max_neighbors_strict)
        if used != (self.cutoff, self.max_neighbors, self.strict):
            raise ValueError(f"evaluation set {self.name!r} was prepared at cutoff {self.cutoff} / max_neighbors "
                             f"{self.max_neighbors} (strict {self.strict}), the model uses {used[0]} / {used[1]} "
                             f"(strict {used[2]})")
        head = choose_head(model, self.name, self.head, what=f"eval dataset {self.name!r}")
        return evaluate(model, self.structures, head=head, batch_size=batch_size, samples=self.samples,
                        allow_unseen_elements=allow_unseen_elements, source=f"eval dataset {self.name!r}")


def prepare_eval_sets(entries, cutoff: float, max_neighbors: int | None,
                      max_structures: int = 0, strict: bool = True) -> list[PreparedEvalSet]:
    """Read each configured evaluation set once and build its neighbour lists.

    ``max_structures > 0`` keeps that many structures, evenly spaced over the file (a fixed subset,
    so successive evaluations are comparable); 0 keeps all.
    """
    out = []
    for entry in entries:
        _, structures = load_structures(entry.path)
        keep = np.arange(len(structures))
        if 0 < max_structures < len(structures):
            keep = np.unique(np.linspace(0, len(structures) - 1, max_structures).round().astype(int))
        chosen = [structures[int(k)] for k in keep]
        samples = [build_sample(s, cutoff, max_neighbors, strict=strict) for s in chosen]
        out.append(PreparedEvalSet(entry.name, entry.head, chosen, samples, cutoff, max_neighbors, strict))
    return out


def evaluate_prepared(model: Potential, sets: list[PreparedEvalSet]) -> dict[str, dict]:
    return {s.name: s.evaluate(model) for s in sets}


def append_curve_point(path: str | Path, step: int, evaluation: dict[str, dict]) -> None:
    """One line of ``eval_curve.jsonl``: the step (optimiser steps done) and each set's metrics."""
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": int(step), **evaluation}) + "\n")


def read_curve(path: str | Path) -> list[dict]:
    """The points of an ``eval_curve.jsonl``, in step order (a later line for a step wins)."""
    points: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            points[int(rec["step"])] = rec
    return [points[k] for k in sorted(points)]


@torch.no_grad()
def _predict(model, batch):
    return model(batch)


def batch_outputs(model: Potential, chunk: Sequence[Structure], dataset_id: int,
                  prepared: Sequence | None = None, check_finite: bool = True):
    """(energy (B,) tensor, forces: one (n_atoms, 3) array per structure, stress (B, 3, 3) tensor or
    None) of ``chunk``, float64 on the CPU, in the model's dtype (fp32 for a half-precision model)
    and on its device.

    ``prepared``: graphs already built for the chunk at the model's cutoff (their dataset id is
    replaced). ``check_finite``: non-finite outputs raise ``ValueError`` naming the structure (a NaN
    must not become a number in a table; training-time evaluation keeps NaN, which its curve shows)."""
    cfg = model.cfg
    if prepared is None:
        graphs = [build_sample(s, cfg.cutoff, cfg.max_neighbors, dataset_id, strict=cfg.max_neighbors_strict)
                  for s in chunk]
    else:
        graphs = [dataclasses.replace(g, dataset_id=dataset_id) for g in prepared]
    param = next(model.parameters())
    dtype = torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype
    out = _predict(model, collate(graphs, dtype).to(param.device))  # conservative models enable grad for -dE/dx
    energy = out["energy"].detach().double().cpu()
    offsets = np.concatenate([[0], np.cumsum([s.natoms for s in chunk])])
    forces = np.split(out["forces"].detach().double().cpu().numpy(), offsets[1:-1])
    stress = out["stress"].detach().double().cpu() if "stress" in out else None
    if not check_finite:
        return energy, forces, stress
    for g in range(len(chunk)):
        if not torch.isfinite(energy[g]) or not np.isfinite(forces[g]).all() or \
                (stress is not None and not torch.isfinite(stress[g]).all()):
            s = chunk[g]
            raise ValueError(f"{s.source or 'input'}: structure {s.source_index}: the model predicts a non-finite "
                             "energy, force or stress")
    return energy, forces, stress


def _empty_errors() -> dict:
    return {"structures": 0, "energy": [], "energy_per_atom": [], "forces": []}


def _metrics(err: dict, structures: int) -> dict:
    def mae(x):
        return float(np.mean(np.abs(x))) if len(x) else math.nan

    def rmse(x):
        return float(np.sqrt(np.mean(np.square(x)))) if len(x) else math.nan

    f = np.concatenate(err["forces"]) if err["forces"] else np.zeros(0)
    return {
        "structures": structures,
        "energy_labelled": len(err["energy"]),
        "force_labelled": len(err["forces"]),
        "energy_mae": mae(err["energy"]), "energy_rmse": rmse(err["energy"]),
        "energy_mae_per_atom": mae(err["energy_per_atom"]), "energy_rmse_per_atom": rmse(err["energy_per_atom"]),
        "forces_mae": mae(f), "forces_rmse": rmse(f),
    }


def evaluate(model: Potential, structures: Sequence[Structure], head: str, batch_size: int = 16,
             return_predictions: bool = False, samples: Sequence | None = None,
             allow_unseen_elements: bool = False, source: str | None = None, check_finite: bool = False) -> dict:
    """MAE/RMSE of energy (eV per structure and eV/atom) and forces (eV/Å per component).

    ``samples``: graphs already built for ``structures`` at the model's cutoff (any dataset id).
    Elements ``head`` was not trained on (``model.trained_elements``, checked once over all
    structures) raise :class:`~lamm_ds.engine.export.UnseenElementsError`, whose message names
    ``source``; ``allow_unseen_elements=True`` evaluates anyway, logs a warning and lists them in
    the result under ``unseen_elements``. ``check_finite``: a non-finite prediction raises
    ``ValueError`` naming the structure (``lamm-ds evaluate``) instead of giving NaN errors. Structures
    with ``info["config_type"]`` also get their own errors under ``by_config_type``.
    """
    if samples is not None and len(samples) != len(structures):
        raise ValueError(f"{len(samples)} prepared graphs for {len(structures)} structures")
    if head not in model.dataset_names:
        raise ValueError(f"unknown head {head!r}; this model has heads: {', '.join(model.dataset_names)}")
    unseen = _unseen_in(model, head, structures)
    if unseen and not allow_unseen_elements:
        raise UnseenElementsError(unseen_elements_message(model, head, unseen, source))
    if unseen:
        log.warning("%shead %r was not trained on %s: its errors there are not meaningful",
                    f"{source}: " if source else "", head, format_elements(unseen))
    was_training = model.training
    model.eval()
    dataset_id = model.dataset_index(head)
    errors: dict[str | None, dict[str, list]] = {}  # per config_type (None: all structures)
    preds = {"energy_true": [], "energy_pred": [], "natoms": [], "forces_true": [], "forces_pred": []}
    n = len(structures)
    for start in range(0, n, batch_size):
        chunk = [structures[k] for k in range(start, min(n, start + batch_size))]
        prepared = None if samples is None else [samples[k] for k in range(start, min(n, start + batch_size))]
        energy, forces, _ = batch_outputs(model, chunk, dataset_id, prepared, check_finite)
        for g, s in enumerate(chunk):
            groups = [errors.setdefault(None, _empty_errors())]
            if "config_type" in s.info:
                groups.append(errors.setdefault(str(s.info["config_type"]), _empty_errors()))
            for err in groups:
                err["structures"] += 1
            if s.energy is not None:
                de = float(energy[g]) - s.energy
                for err in groups:
                    err["energy"].append(de)
                    err["energy_per_atom"].append(de / s.natoms)
                preds["energy_true"].append(s.energy)
                preds["energy_pred"].append(float(energy[g]))
                preds["natoms"].append(s.natoms)
            if s.forces is not None:
                fp = forces[g]
                for err in groups:
                    err["forces"].append((fp - s.forces).reshape(-1))
                preds["forces_true"].append(s.forces.reshape(-1))
                preds["forces_pred"].append(fp.reshape(-1))
    model.train(was_training)
    result = _metrics(errors.get(None, _empty_errors()), n)
    by_type = {k: _metrics(v, v["structures"]) for k, v in sorted(errors.items(), key=lambda kv: str(kv[0]))
               if k is not None}
    if by_type:
        result["by_config_type"] = by_type
    if unseen:
        result["unseen_elements"] = unseen
    if return_predictions:
        result["predictions"] = {k: (np.concatenate(v) if k.startswith("forces") and v else np.asarray(v))
                                 for k, v in preds.items()}
    return result


def result_keys(inputs: Sequence[tuple[str | Path, str]]) -> list[str]:
    """Unique result names for evaluation inputs given as (path, name).

    The name (dataset name or file stem) when unique; otherwise as many parent directory names
    (for a dataset directory: its own name first) as it takes to tell the inputs apart
    (``Si/test``, ``Mo/test``); the same path given twice gets ``#2``, ``#3``, ...
    """
    names = [str(n) for _, n in inputs]
    keys = list(names)
    for name in set(names):
        group = [k for k, n in enumerate(names) if n == name]
        if len(group) < 2:
            continue
        parents = []
        for k in group:  # a dataset directory's own name counts as one of its "parents"
            loc = Path(inputs[k][0]).resolve()
            parents.append((loc.parts if loc.is_dir() and loc.name != name else loc.parent.parts)[1:])
        for d in range(1, max(len(p) for p in parents) + 1):
            cand = ["/".join([*p[max(len(p) - d, 0):], name]) for p in parents]
            if len(set(cand)) == len(cand):
                for k, c in zip(group, cand):
                    keys[k] = c
                break
    seen: dict[str, int] = {}
    for k, key in enumerate(keys):
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            keys[k] = f"{key}#{seen[key]}"
    return keys


def plot_name(key: str) -> str:
    """File name of the parity plot of result ``key`` (``/`` -> ``_``)."""
    return "parity_" + key.replace("/", "_").replace("#", "_") + ".png"


def parity_plot(predictions: dict, path: str | Path, title: str) -> Path:
    """Energy-per-atom and force-component parity plots side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    panels = [
        ("energy (eV/atom)", np.asarray(predictions["energy_true"]) / np.maximum(predictions["natoms"], 1),
         np.asarray(predictions["energy_pred"]) / np.maximum(predictions["natoms"], 1)),
        ("force component (eV/Å)", predictions["forces_true"], predictions["forces_pred"]),
    ]
    for ax, (label, true, pred) in zip(axes, panels):
        true, pred = np.asarray(true), np.asarray(pred)
        if true.size:
            lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
            ax.scatter(true, pred, s=4, alpha=0.5)
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"predicted {label}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
