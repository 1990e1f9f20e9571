"""Dataset-aware outputs: per-element reference energies, per-dataset normalisation, output heads.

Energy of a structure from dataset k (all in eV):  E = Σ_i (std_k * e_i + mean_k + ref_k[Z_i]),
where e_i is the head's per-atom output in normalised units. ``mean_k``/``std_k`` are statistics of
the per-atom residual (E - Σ ref)/N; ``force_std`` is the RMS of the force components, and scales
the shared direct-force head.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lamm_ds.model.numerics import PreciseBuffers

_TINY = 1e-8


@dataclass
class DatasetStats:
    references: np.ndarray      # (max_z + 1,) eV per element, 0 for elements never seen
    energy_mean: float = 0.0    # per-atom residual mean, eV/atom
    energy_std: float = 1.0     # per-atom residual std, eV/atom
    force_std: float = 1.0      # force-component RMS, eV/Å

    @classmethod
    def identity(cls, max_z: int) -> "DatasetStats":
        return cls(np.zeros(max_z + 1))


def composition_matrix(numbers_per_structure: Sequence[np.ndarray], max_z: int) -> np.ndarray:
    """(S, max_z + 1) element counts."""
    a = np.zeros((len(numbers_per_structure), max_z + 1))
    for row, numbers in enumerate(numbers_per_structure):
        numbers = np.asarray(numbers, dtype=np.int64)
        if numbers.size and (numbers.min() < 0 or numbers.max() > max_z):
            raise ValueError(f"atomic number outside [0, {max_z}] in structure {row}")
        a[row] = np.bincount(numbers, minlength=max_z + 1)
    return a


def fit_element_references(numbers_per_structure: Sequence[np.ndarray], energies: np.ndarray, max_z: int) -> np.ndarray:
    """Least-squares per-element energies, E_s ≈ Σ_Z n_sZ ref_Z; NaN energies are skipped.

    Only elements that occur get a column (absent ones stay 0). ``lstsq`` returns the minimum-norm
    solution when compositions are collinear (e.g. only stoichiometric oxides), instead of failing.
    """
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)
    if len(energies) != len(numbers_per_structure):
        raise ValueError("one energy per structure expected")
    refs = np.zeros(max_z + 1)
    keep = np.isfinite(energies)
    if not keep.any():
        return refs
    a = composition_matrix([n for n, k in zip(numbers_per_structure, keep) if k], max_z)
    present = np.flatnonzero(a.sum(0) > 0)
    if present.size:
        sol, *_ = np.linalg.lstsq(a[:, present], energies[keep], rcond=None)
        refs[present] = sol
    return refs


def fit_normalization(
    numbers_per_structure: Sequence[np.ndarray],
    energies: np.ndarray | None = None,
    forces: Sequence[np.ndarray | None] | None = None,
    references: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """(energy_mean, energy_std, force_std) of a dataset.

    energy_mean/std: of the per-atom residual (E - Σ ref[Z]) / N over structures with a finite energy;
    force_std: RMS of all force components. Missing data (or a degenerate spread) gives 0 / 1 / 1.
    """
    mean, std, fstd = 0.0, 1.0, 1.0
    if energies is not None:
        energies = np.asarray(energies, dtype=np.float64).reshape(-1)
        resid = []
        for numbers, e in zip(numbers_per_structure, energies):
            numbers = np.asarray(numbers, dtype=np.int64)
            if not np.isfinite(e) or numbers.size == 0:
                continue
            ref = float(references[numbers].sum()) if references is not None else 0.0
            resid.append((e - ref) / numbers.size)
        if resid:
            mean = float(np.mean(resid))
            sd = float(np.std(resid))
            std = sd if sd > _TINY else 1.0
    if forces is not None:
        sq, count = 0.0, 0
        for f in forces:
            if f is None:
                continue
            f = np.asarray(f, dtype=np.float64)
            sq += float(np.square(f).sum())
            count += f.size
        if count:
            rms = float(np.sqrt(sq / count))
            fstd = rms if rms > _TINY else 1.0
    return mean, std, fstd


def fit_dataset_stats(structures: Iterable, max_z: int, references: np.ndarray | None = None) -> DatasetStats:
    """References + normalisation from ``lamm_ds.structure.Structure`` records (energy/forces may be None).

    ``references``: per-element energies to use instead of the least-squares fit (the energy
    normalisation is then fitted on the residuals they leave)."""
    structures = list(structures)
    numbers = [np.asarray(s.numbers) for s in structures]
    energies = np.array([np.nan if s.energy is None else s.energy for s in structures], dtype=np.float64)
    if references is None:
        refs = fit_element_references(numbers, energies, max_z)
    else:
        refs = np.asarray(references, dtype=np.float64).reshape(-1)
        if refs.shape[0] != max_z + 1:
            raise ValueError(f"references must have max_z + 1 = {max_z + 1} entries, got {refs.shape[0]}")
    mean, std, fstd = fit_normalization(numbers, energies, [s.forces for s in structures], refs)
    return DatasetStats(refs, mean, std, fstd)


class EnergyOffset(PreciseBuffers):
    """A head's per-structure energy constant (eV; a converted fairchem energy normaliser's mean),
    an fp32 buffer immune to bf16 casts."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("energy_offset", torch.tensor(float(value), dtype=torch.float32))


def graph_energy_offsets(heads: nn.ModuleDict, dataset_id: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each graph's energy offset, from the head of its dataset (heads with an ``offset``)."""
    return torch.stack([h.offset.energy_offset for h in heads.values()]).to(dtype)[dataset_id]


class StatsBuffers(PreciseBuffers):
    """A dataset's references and scales as fp32 buffers (in state_dict, immune to bf16 casts)."""

    def __init__(self, stats: DatasetStats, max_z: int) -> None:
        super().__init__()
        refs = np.asarray(stats.references, dtype=np.float64).reshape(-1)
        if refs.shape[0] != max_z + 1:
            raise ValueError(f"references must have max_z + 1 = {max_z + 1} entries, got {refs.shape[0]}")
        self.register_buffer("references", torch.tensor(refs, dtype=torch.float32))
        self.register_buffer("energy_mean", torch.tensor(float(stats.energy_mean), dtype=torch.float32))
        self.register_buffer("energy_std", torch.tensor(float(stats.energy_std), dtype=torch.float32))
        self.register_buffer("force_std", torch.tensor(float(stats.force_std), dtype=torch.float32))

    def as_stats(self) -> DatasetStats:
        return DatasetStats(self.references.double().cpu().numpy(), float(self.energy_mean),
                            float(self.energy_std), float(self.force_std))


class EnergyHead(nn.Module):
    """Per-dataset MLP: scalar features -> per-atom energy in normalised units; holds the dataset stats."""

    def __init__(self, hidden: int, stats: DatasetStats, max_z: int) -> None:
        super().__init__()
        mid = max(hidden // 2, 1)
        self.mlp = nn.Sequential(nn.Linear(hidden, mid), nn.SiLU(), nn.Linear(mid, 1))
        self.stats = StatsBuffers(stats, max_z)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp(s).squeeze(-1)


class GatedEquivariantBlock(nn.Module):
    """Gated equivariant block (Schütt et al. 2021, Fig. 3): vectors are only rescaled by invariant gates."""

    def __init__(self, in_dim: int, out_dim: int, scalar_activation: bool, eps: float = 1e-8) -> None:
        super().__init__()
        self.out_dim, self.eps, self.scalar_activation = out_dim, eps, scalar_activation
        self.vec = nn.Linear(in_dim, 2 * out_dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(in_dim + out_dim, in_dim), nn.SiLU(), nn.Linear(in_dim, 2 * out_dim))

    def forward(self, s, v):
        v1, v2 = self.vec(v).split(self.out_dim, dim=-1)
        norm = torch.sqrt((v2 * v2).sum(1) + self.eps)
        s_out, gate = self.mlp(torch.cat([s, norm], dim=-1)).split(self.out_dim, dim=-1)
        if self.scalar_activation:
            s_out = F.silu(s_out)
        return s_out, gate.unsqueeze(1) * v1


class DirectForceHead(nn.Module):
    """Shared head: (s, v) -> one vector per atom (N, 3) in normalised units (times force_std = eV/Å)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        mid = max(hidden // 2, 1)
        self.block1 = GatedEquivariantBlock(hidden, mid, scalar_activation=True)
        self.block2 = GatedEquivariantBlock(mid, 1, scalar_activation=False)

    def forward(self, s, v):
        s, v = self.block1(s, v)
        _, v = self.block2(s, v)
        return v.squeeze(-1)
