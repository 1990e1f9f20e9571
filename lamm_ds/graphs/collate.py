"""Per-structure graph samples (built in DataLoader workers) and their collation into an AtomsBatch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lamm_ds.graphs.batch import AtomsBatch
from lamm_ds.neighbors import radius_graph
from lamm_ds.structure import Structure


@dataclass
class GraphSample:
    """A structure plus its neighbour list, as numpy arrays (cheap to send between processes)."""

    structure: Structure
    edge_i: np.ndarray
    edge_j: np.ndarray
    shifts: np.ndarray
    dataset_id: int = 0
    sample_id: int = -1
    draw_id: int = -1

    @property
    def num_edges(self) -> int:
        return int(self.edge_i.shape[0])


def build_sample(
    structure: Structure,
    cutoff: float,
    max_neighbors: int | None,
    dataset_id: int = 0,
    sample_id: int = -1,
    draw_id: int = -1,
    backend: str = "vesin",
    strict: bool = True,
) -> GraphSample:
    """Neighbour list of one structure at the given cutoff and cap (``strict=False``: fairchem's
    non-strict cap, see :func:`lamm_ds.neighbors.radius_graph`)."""
    g = radius_graph(structure.positions, structure.cell, structure.pbc, cutoff, max_neighbors, backend, strict)
    return GraphSample(structure, g.i, g.j, g.shifts, dataset_id, sample_id, draw_id)


def collate(samples: list[GraphSample], dtype: torch.dtype = torch.float32) -> AtomsBatch:
    """Concatenate graph samples into one flat batch; missing labels become zeros with a False mask."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    natoms = np.array([s.structure.natoms for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(natoms)[:-1]])
    n_total = int(natoms.sum())
    forces = np.zeros((n_total, 3))
    fixed = np.zeros(n_total, dtype=bool)
    for s, off in zip(samples, offsets):
        st = s.structure
        if st.forces is not None:
            forces[off:off + st.natoms] = st.forces
        if st.fixed is not None:
            fixed[off:off + st.natoms] = st.fixed
    edge_i = np.concatenate([s.edge_i + off for s, off in zip(samples, offsets)])
    edge_j = np.concatenate([s.edge_j + off for s, off in zip(samples, offsets)])
    # convert in numpy: torch's int64->float conversion spins up intra-op threads, slow under load
    shifts = np.concatenate([s.shifts.reshape(-1, 3) for s in samples]).astype(np.float64)

    def f(a):
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    def long(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.long)

    def flag(a):
        return torch.as_tensor(np.asarray(a, dtype=bool))

    return AtomsBatch(
        pos=f(np.concatenate([s.structure.positions for s in samples])),
        z=long(np.concatenate([s.structure.numbers for s in samples])),
        batch=long(np.repeat(np.arange(len(samples)), natoms)),
        cell=f(np.stack([s.structure.cell for s in samples])),
        pbc=flag(np.stack([s.structure.pbc for s in samples])),
        edge_index=long(np.stack([edge_i, edge_j])),
        shifts=f(shifts),
        natoms=long(natoms),
        dataset_id=long([s.dataset_id for s in samples]),
        sample_id=long([s.sample_id for s in samples]),
        energy=f([s.structure.energy if s.structure.energy is not None else 0.0 for s in samples]),
        has_energy=flag([s.structure.energy is not None for s in samples]),
        forces=f(forces),
        has_forces=flag([s.structure.forces is not None for s in samples]),
        stress=f(np.stack([s.structure.stress if s.structure.stress is not None else np.zeros((3, 3))
                           for s in samples])),
        has_stress=flag([s.structure.stress is not None for s in samples]),
        fixed=flag(fixed),
        is_pseudo=flag([False] * len(samples)),
        draw_id=long([s.draw_id for s in samples]),
    )
