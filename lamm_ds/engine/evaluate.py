"""Energy/force errors of a model on stored datasets or any ASE-readable file."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lamm_ds.graphs import build_sample, collate
from lamm_ds.model.potential import Potential
from lamm_ds.structure import Structure


def load_structures(source: str | Path) -> tuple[str, Sequence[Structure]]:
    """(name, structures) from a lamm-ds dataset directory or an ASE-readable file."""
    from lamm_ds.shards import LmdbDataset, is_dataset_dir

    if is_dataset_dir(source):
        ds = LmdbDataset(source)
        return ds.name, ds
    from lamm_ds.ingest.readers import LabelKeys, iter_source

    return Path(source).stem, list(iter_source(Path(source), LabelKeys()))


def choose_head(model: Potential, name: str, explicit: str | None = None) -> str:
    """The energy head for a dataset: the explicit one, else the dataset's own name, else the first."""
    return explicit or (name if name in model.dataset_names else model.dataset_names[0])


def evaluate_entries(model: Potential, entries) -> dict[str, dict]:
    """:func:`evaluate` for each configured ``DatasetConfig`` (name, path, optional head)."""
    results = {}
    for entry in entries:
        _, structures = load_structures(entry.path)
        results[entry.name] = evaluate(model, structures, head=choose_head(model, entry.name, entry.head))
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

    def evaluate(self, model: Potential, batch_size: int = 32) -> dict:
        if (model.cfg.cutoff, model.cfg.max_neighbors) != (self.cutoff, self.max_neighbors):
            raise ValueError(f"evaluation set {self.name!r} was prepared at cutoff {self.cutoff} / max_neighbors "
                             f"{self.max_neighbors}, the model uses {model.cfg.cutoff} / {model.cfg.max_neighbors}")
        head = choose_head(model, self.name, self.head)
        return evaluate(model, self.structures, head=head, batch_size=batch_size, samples=self.samples)


def prepare_eval_sets(entries, cutoff: float, max_neighbors: int | None,
                      max_structures: int = 0) -> list[PreparedEvalSet]:
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
        samples = [build_sample(s, cutoff, max_neighbors) for s in chosen]
        out.append(PreparedEvalSet(entry.name, entry.head, chosen, samples, cutoff, max_neighbors))
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


def evaluate(model: Potential, structures: Sequence[Structure], head: str, batch_size: int = 16,
             return_predictions: bool = False, samples: Sequence | None = None) -> dict:
    """MAE/RMSE of energy (eV per structure and eV/atom) and forces (eV/Å per component).

    ``samples``: graphs already built for ``structures`` at the model's cutoff (any dataset id).
    """
    if samples is not None and len(samples) != len(structures):
        raise ValueError(f"{len(samples)} prepared graphs for {len(structures)} structures")
    was_training = model.training
    model.eval()
    cfg = model.cfg
    dataset_id = model.dataset_index(head)
    dtype = next(model.parameters()).dtype
    dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    device = next(model.parameters()).device
    e_err, e_err_atom, f_err = [], [], []
    preds = {"energy_true": [], "energy_pred": [], "natoms": [], "forces_true": [], "forces_pred": []}
    n = len(structures)
    for start in range(0, n, batch_size):
        chunk = [structures[k] for k in range(start, min(n, start + batch_size))]
        if samples is None:
            graphs = [build_sample(s, cfg.cutoff, cfg.max_neighbors, dataset_id) for s in chunk]
        else:
            graphs = [dataclasses.replace(samples[k], dataset_id=dataset_id)
                      for k in range(start, min(n, start + batch_size))]
        batch = collate(graphs, dtype)
        batch = batch.to(device)
        out = _predict(model, batch)  # conservative models enable grad for -dE/dx themselves
        energy = out["energy"].detach().double().cpu()
        forces = out["forces"].detach().double().cpu()
        offsets = np.concatenate([[0], np.cumsum([s.natoms for s in chunk])])
        for g, s in enumerate(chunk):
            if s.energy is not None:
                e_err.append(float(energy[g]) - s.energy)
                e_err_atom.append(e_err[-1] / s.natoms)
                preds["energy_true"].append(s.energy)
                preds["energy_pred"].append(float(energy[g]))
                preds["natoms"].append(s.natoms)
            if s.forces is not None:
                fp = forces[offsets[g]:offsets[g + 1]].numpy()
                f_err.append((fp - s.forces).reshape(-1))
                preds["forces_true"].append(s.forces.reshape(-1))
                preds["forces_pred"].append(fp.reshape(-1))
    model.train(was_training)

    def mae(x):
        return float(np.mean(np.abs(x))) if len(x) else math.nan

    def rmse(x):
        return float(np.sqrt(np.mean(np.square(x)))) if len(x) else math.nan

    f = np.concatenate(f_err) if f_err else np.zeros(0)
    result = {
        "structures": n,
        "energy_labelled": len(e_err),
        "force_labelled": len(f_err),
        "energy_mae": mae(e_err), "energy_rmse": rmse(e_err),
        "energy_mae_per_atom": mae(e_err_atom), "energy_rmse_per_atom": rmse(e_err_atom),
        "forces_mae": mae(f), "forces_rmse": rmse(f),
    }
    if return_predictions:
        result["predictions"] = {k: (np.concatenate(v) if k.startswith("forces") and v else np.asarray(v))
                                 for k, v in preds.items()}
    return result


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
