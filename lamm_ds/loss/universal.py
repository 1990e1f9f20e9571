"""Universal multi-task loss with per-sample label masks, exact under data parallelism.

Every term is ``weight * local_error_sum / max(global_count, 1) * world_size``. DeepSpeed averages
gradients equally over ranks, so summing this over ranks and dividing by ``world_size`` gives the
exact global mean of every term, however unevenly graphs/atoms are spread over ranks
(docs: /work/shared/notes/deepspeed-on-cpu.md section 3.1). The engine computes
``global_counts = all_reduce(local_counts(batch), SUM)`` once per step.

Terms (errors are divided by the graph's dataset normalisation std from the model output,
``energy_scale`` / ``force_scale`` (B,), 1 when absent):

* energy: per-atom energy error ``(E_pred - E) / natoms / energy_scale`` over graphs with ``has_energy``;
* force: per-atom force error over free atoms of graphs with ``has_forces & ~is_pseudo``;
* pseudo: same, over free atoms of graphs with ``is_pseudo & has_forces`` (denoising labels),
  compared with ``pseudo_forces`` when the model has a separate denoising head (then unnormalised:
  that head predicts the ~unit-variance labels in their own units), else with ``forces``;
* stress: per-graph over ``has_stress`` graphs (divided by ``stress_scale`` if present), using
  ``energy_metric`` on the 9 components (mean over components).

Masked-out entries are removed by indexing, not multiplied by zero, so a NaN or infinity in an
unlabelled slot cannot leak into the loss or its gradient.

A per-graph ``graph_weight`` (e.g. a dataset's ``loss_weight``: replayed pre-training data during
fine-tuning) multiplies that graph's errors in every term; the denominators still count every
labelled graph/atom, so a weight of 1 everywhere is exactly the unweighted loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lamm_ds.graphs.batch import AtomsBatch

TERMS = ("energy", "force", "pseudo", "stress")

# Columns of the per-dataset sums tensor (see per_dataset_metrics); errors in physical units.
DATASET_METRIC_FIELDS = (
    "graphs",
    "energy_count", "energy_abs_sum", "energy_sq_sum",      # per-atom energy error, eV/atom
    "force_count", "force_abs_sum", "force_sq_sum",          # force components (3 per atom), eV/Å
    "pseudo_count", "pseudo_abs_sum", "pseudo_sq_sum",       # pseudo-force components, eV/Å
)


@dataclass
class LossConfig:
    """Term weights and metrics.

    energy_metric: "mae" (|err|) or "mse" (err**2) of the normalised per-atom energy error.
    force_metric: "l2" (Euclidean norm of each atom's force error, averaged over atoms) or "mse"
    (mean squared component error). Also used for the pseudo-force term.
    """

    energy_weight: float = 1.0
    force_weight: float = 10.0
    pseudo_force_weight: float = 1.0
    stress_weight: float = 0.0
    energy_metric: str = "mae"
    force_metric: str = "l2"

    def __post_init__(self) -> None:
        if self.energy_metric not in ("mae", "mse"):
            raise ValueError(f"energy_metric must be 'mae' or 'mse', got {self.energy_metric!r}")
        if self.force_metric not in ("l2", "mse"):
            raise ValueError(f"force_metric must be 'l2' or 'mse', got {self.force_metric!r}")


def _masks(batch: AtomsBatch) -> dict[str, torch.Tensor]:
    """Boolean selectors: graph masks for energy/stress, atom masks for force/pseudo."""
    free = ~batch.fixed
    real = batch.has_forces & ~batch.is_pseudo
    pseudo = batch.is_pseudo & batch.has_forces
    return {
        "energy": batch.has_energy,
        "force": real[batch.batch] & free,
        "pseudo": pseudo[batch.batch] & free,
        "stress": batch.has_stress,
    }


def local_counts(batch: AtomsBatch) -> torch.Tensor:
    """Denominators of the terms on this rank, float64 (4,) in TERMS order: energy-labelled graphs,
    force-labelled free atoms, pseudo-labelled free atoms, stress-labelled graphs. All-reduce with SUM."""
    m = _masks(batch)
    return torch.stack([m[t].sum() for t in TERMS]).to(torch.float64)


def _upcast(out: dict) -> dict:
    """bf16/fp16 model outputs are compared in float32: a bf16 atom count or error sum is off by ~0.4%."""
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() and v.element_size() < 4 else v
            for k, v in out.items()}


def _per_graph(out: dict, key: str, batch: AtomsBatch, like: torch.Tensor) -> torch.Tensor:
    v = out.get(key)
    if v is None:
        return torch.ones(batch.num_graphs, dtype=like.dtype, device=like.device)
    return v.to(like.dtype).reshape(-1)


def _energy_err(out: dict, batch: AtomsBatch, sel: torch.Tensor, normalise: bool) -> torch.Tensor:
    e_pred = out["energy"].reshape(-1)
    err = (e_pred[sel] - batch.energy[sel].to(e_pred.dtype)) / batch.natoms[sel].to(e_pred.dtype)
    if normalise:
        err = err / _per_graph(out, "energy_scale", batch, e_pred)[sel]
    return err


def _force_prediction(out: dict, term: str) -> tuple[torch.Tensor, bool]:
    """The prediction a force-like term ("force" or "pseudo") is compared with, and whether its
    error is divided by the dataset ``force_scale``. A separate denoising head (``pseudo_forces``)
    is not scaled by the dataset force std, so neither is its error."""
    if term == "pseudo" and "pseudo_forces" in out:
        return out["pseudo_forces"], False
    return out["forces"], True


def _force_err(out: dict, batch: AtomsBatch, sel: torch.Tensor, normalise: bool, term: str = "force") -> torch.Tensor:
    f_pred, scaled = _force_prediction(out, term)
    err = f_pred[sel] - batch.forces[sel].to(f_pred.dtype)
    if normalise and scaled:
        err = err / _per_graph(out, "force_scale", batch, f_pred)[batch.batch[sel]].unsqueeze(-1)
    return err


def _stress_err(out: dict, batch: AtomsBatch, sel: torch.Tensor) -> torch.Tensor:
    s_pred = out["stress"]
    err = (s_pred[sel] - batch.stress[sel].to(s_pred.dtype)).reshape(-1, 9)
    return err / _per_graph(out, "stress_scale", batch, s_pred)[sel].unsqueeze(-1)


def _weighted_sum(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return values.sum() if weight is None else (values * weight.to(values.dtype)).sum()


def _error_sums(out: dict, batch: AtomsBatch, cfg: LossConfig, masks: dict,
                graph_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Un-normalised-by-count error sums of each term (differentiable), each graph's errors times
    its ``graph_weight`` (None: 1)."""
    def weight(term: str) -> torch.Tensor | None:
        if graph_weight is None:
            return None
        sel = masks[term]
        return graph_weight[sel] if term in ("energy", "stress") else graph_weight[batch.batch[sel]]

    sums = {}
    e = _energy_err(out, batch, masks["energy"], normalise=True)
    sums["energy"] = _weighted_sum(e.abs() if cfg.energy_metric == "mae" else e.square(), weight("energy"))
    for term in ("force", "pseudo"):
        f = _force_err(out, batch, masks[term], normalise=True, term=term)
        if cfg.force_metric == "l2":
            # vector_norm's backward is 0 (not NaN) at a zero error
            sums[term] = _weighted_sum(torch.linalg.vector_norm(f, dim=-1), weight(term))
        else:  # mean over the 3 components, summed over atoms
            sums[term] = _weighted_sum(f.square().sum(-1), weight(term)) / 3.0
    if "stress" in out:
        s = _stress_err(out, batch, masks["stress"])
        sums["stress"] = _weighted_sum((s.abs() if cfg.energy_metric == "mae" else s.square()).mean(-1),
                                       weight("stress"))
    elif cfg.stress_weight != 0.0:
        raise KeyError("stress_weight > 0 but the model output has no 'stress'")
    else:
        sums["stress"] = out["energy"].new_zeros(())
    return sums


def universal_loss(
    out: dict,
    batch: AtomsBatch,
    cfg: LossConfig,
    global_counts: torch.Tensor | None = None,
    world_size: int = 1,
    graph_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted multi-task loss of this rank and detached metrics.

    ``global_counts``: all-reduced ``local_counts`` (None = this batch's own counts, i.e. single process).
    ``graph_weight``: (B,) non-negative per-graph loss weights (None: all 1).
    Returns ``loss = sum_t w_t * local_sum_t / max(global_count_t, 1) * world_size``.

    Metrics (0-dim detached tensors; no host sync): ``loss``, ``loss_<term>`` (unweighted, same
    scaling as the loss, so their mean over ranks is the global value), and local, unnormalised
    ``energy_mae_per_atom`` (eV/atom), ``force_mae`` / ``pseudo_force_mae`` (eV/Å per component),
    ``stress_mae`` (eV/Å^3 per component). Empty terms give exactly 0.
    """
    out = _upcast(out)
    masks = _masks(batch)
    counts = local_counts(batch) if global_counts is None else global_counts
    dtype = out["energy"].dtype
    denom = counts.to(device=out["energy"].device, dtype=dtype).clamp_min(1.0) / float(world_size)
    sums = _error_sums(out, batch, cfg, masks, graph_weight)
    weights = {"energy": cfg.energy_weight, "force": cfg.force_weight,
               "pseudo": cfg.pseudo_force_weight, "stress": cfg.stress_weight}
    loss = out["energy"].new_zeros(())
    metrics: dict[str, torch.Tensor] = {}
    for i, term in enumerate(TERMS):
        value = sums[term] / denom[i]
        if weights[term] != 0.0:  # skipping keeps a 0-weight term from adding 0*inf = NaN
            loss = loss + weights[term] * value
        metrics[f"loss_{term}"] = value.detach()
    if "pseudo_forces" in out:
        # An exact zero that depends on the denoising head (an empty slice: no 0 * inf = NaN), so its
        # parameters get a gradient on every rank even when this batch holds no pseudo-labelled graph
        # or the pseudo weight is 0: ZeRO/DDP ranks must reduce identical gradient sets.
        loss = loss + out["pseudo_forces"][:0].sum()
    metrics["loss"] = loss.detach()
    with torch.no_grad():
        metrics.update(_local_maes(out, batch, masks))
    return loss, metrics


def _local_maes(out: dict, batch: AtomsBatch, masks: dict) -> dict[str, torch.Tensor]:
    res = {}
    e = _energy_err(out, batch, masks["energy"], normalise=False)
    res["energy_mae_per_atom"] = e.abs().sum() / max(e.numel(), 1)
    for term, name in (("force", "force_mae"), ("pseudo", "pseudo_force_mae")):
        f = _force_err(out, batch, masks[term], normalise=False, term=term)
        res[name] = f.abs().sum() / max(f.numel(), 1)
    if "stress" in out:
        s = out["stress"][masks["stress"]] - batch.stress[masks["stress"]].to(out["stress"].dtype)
        res["stress_mae"] = s.abs().sum() / max(s.numel(), 1)
    return {k: v.detach() for k, v in res.items()}


@torch.no_grad()
def per_dataset_metrics(out: dict, batch: AtomsBatch, names: list[str]) -> torch.Tensor:
    """Per-dataset error sums and counts, float64 (len(names), len(DATASET_METRIC_FIELDS)).

    Row k belongs to ``dataset_id == k``. All-reduce (SUM) across ranks, then call
    ``summarize_per_dataset``. Errors are unnormalised (eV/atom, eV/Å).
    """
    out = _upcast(out)
    k = len(names)
    dev = out["energy"].device
    res = torch.zeros(k, len(DATASET_METRIC_FIELDS), dtype=torch.float64, device=dev)
    col = {f: i for i, f in enumerate(DATASET_METRIC_FIELDS)}
    ds = batch.dataset_id.to(dev)
    masks = _masks(batch)

    def add(field: str, index: torch.Tensor, values: torch.Tensor) -> None:
        res[:, col[field]].index_add_(0, index, values.to(torch.float64))

    add("graphs", ds, torch.ones_like(ds, dtype=torch.float64))
    sel = masks["energy"]
    e = _energy_err(out, batch, sel, normalise=False)
    add("energy_count", ds[sel], torch.ones_like(e))
    add("energy_abs_sum", ds[sel], e.abs())
    add("energy_sq_sum", ds[sel], e.square())
    for term in ("force", "pseudo"):
        sel = masks[term]
        f = _force_err(out, batch, sel, normalise=False, term=term)
        atom_ds = ds[batch.batch[sel]]
        add(f"{term}_count", atom_ds, torch.full_like(f[:, 0], 3.0))
        add(f"{term}_abs_sum", atom_ds, f.abs().sum(-1))
        add(f"{term}_sq_sum", atom_ds, f.square().sum(-1))
    return res


def summarize_per_dataset(sums: torch.Tensor, names: list[str]) -> dict[str, float]:
    """``energy_mae_per_atom/<name>``, ``energy_rmse_per_atom/<name>``, ``force_mae/<name>``,
    ``force_rmse/<name>``, ``pseudo_force_mae/<name>``, ``graphs/<name>``; a metric whose count is 0 is omitted."""
    s = sums.detach().cpu().double()
    col = {f: i for i, f in enumerate(DATASET_METRIC_FIELDS)}
    res: dict[str, float] = {}
    for k, name in enumerate(names):
        row = s[k]
        res[f"graphs/{name}"] = float(row[col["graphs"]])
        n = float(row[col["energy_count"]])
        if n > 0:
            res[f"energy_mae_per_atom/{name}"] = float(row[col["energy_abs_sum"]]) / n
            res[f"energy_rmse_per_atom/{name}"] = (float(row[col["energy_sq_sum"]]) / n) ** 0.5
        n = float(row[col["force_count"]])
        if n > 0:
            res[f"force_mae/{name}"] = float(row[col["force_abs_sum"]]) / n
            res[f"force_rmse/{name}"] = (float(row[col["force_sq_sum"]]) / n) ** 0.5
        n = float(row[col["pseudo_count"]])
        if n > 0:
            res[f"pseudo_force_mae/{name}"] = float(row[col["pseudo_abs_sum"]]) / n
    return res
