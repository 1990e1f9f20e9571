"""The flat mini-batch every model and loss in lamm-ds consumes.

Structures are concatenated: per-atom tensors have ``N`` rows (all atoms of the batch), per-graph
tensors ``B`` rows, per-edge tensors ``E`` rows. Edge ``e`` points from centre ``edge_index[0, e]``
to neighbour ``edge_index[1, e]`` in periodic image ``shifts[e]`` (integer multiples of the cell
rows), so ``r_ij = pos[j] + shifts @ cell[graph of i] - pos[i]``. Vectors are recomputed in torch
from ``pos``, ``cell`` and ``shifts`` so autograd forces (d/d pos) and stress (d/d strain) work.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class AtomsBatch:
    pos: torch.Tensor          # (N, 3) float, Å
    z: torch.Tensor            # (N,) long, atomic numbers
    batch: torch.Tensor        # (N,) long, graph index of each atom
    cell: torch.Tensor         # (B, 3, 3) float, rows are lattice vectors (zeros if non-periodic)
    pbc: torch.Tensor          # (B, 3) bool
    edge_index: torch.Tensor   # (2, E) long, [centre i; neighbour j]
    shifts: torch.Tensor       # (E, 3) float, integer image shifts
    natoms: torch.Tensor       # (B,) long
    dataset_id: torch.Tensor   # (B,) long, index into the run's dataset list
    sample_id: torch.Tensor    # (B,) long, index of the structure inside its dataset
    energy: torch.Tensor       # (B,) float, eV (0 where absent)
    has_energy: torch.Tensor   # (B,) bool
    forces: torch.Tensor       # (N, 3) float, eV/Å (0 where absent)
    has_forces: torch.Tensor   # (B,) bool
    stress: torch.Tensor       # (B, 3, 3) float, eV/Å^3 (0 where absent)
    has_stress: torch.Tensor   # (B,) bool
    fixed: torch.Tensor        # (N,) bool, atoms held fixed in the source calculation
    is_pseudo: torch.Tensor    # (B,) bool, forces are denoising pseudo-labels, not DFT
    draw_id: torch.Tensor      # (B,) long, position of the draw in the epoch stream (-1 if none)

    @property
    def num_graphs(self) -> int:
        return int(self.natoms.shape[0])

    @property
    def num_atoms(self) -> int:
        return int(self.z.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def edge_vectors(self, pos: torch.Tensor | None = None, cell: torch.Tensor | None = None) -> torch.Tensor:
        """``r_ij`` for every edge, differentiable w.r.t. ``pos`` and ``cell`` (defaults: the batch's own)."""
        pos = self.pos if pos is None else pos
        cell = self.cell if cell is None else cell
        i, j = self.edge_index
        offsets = torch.einsum("ek,ekl->el", self.shifts.to(cell.dtype), cell[self.batch[i]])
        return pos[j] - pos[i] + offsets

    def to(self, device=None, dtype: torch.dtype | None = None) -> "AtomsBatch":
        """Move to ``device``; ``dtype`` converts floating tensors only."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[f.name] = t.to(device) if device is not None else t
        return AtomsBatch(**out)

    def replace(self, **changes) -> "AtomsBatch":
        return replace(self, **changes)

    def select(self, graphs: torch.Tensor | list[int]) -> "AtomsBatch":
        """A new batch holding only the given graphs, in the given order (used to split a batch over ranks)."""
        graphs = torch.as_tensor(graphs, dtype=torch.long)
        atom_start = torch.cumsum(self.natoms, 0) - self.natoms
        atom_parts, new_batch = [], []
        for new_g, g in enumerate(graphs.tolist()):
            atom_parts.append(torch.arange(atom_start[g], atom_start[g] + self.natoms[g]))
            new_batch.append(torch.full((int(self.natoms[g]),), new_g, dtype=torch.long))
        atoms = torch.cat(atom_parts) if atom_parts else torch.zeros(0, dtype=torch.long)
        old_to_new = torch.full((self.num_atoms,), -1, dtype=torch.long)
        old_to_new[atoms] = torch.arange(len(atoms))
        edge_graph = self.batch[self.edge_index[0]]
        edge_parts = [torch.nonzero(edge_graph == g).flatten() for g in graphs.tolist()]
        edge_keep = torch.cat(edge_parts) if edge_parts else torch.zeros(0, dtype=torch.long)
        return AtomsBatch(
            pos=self.pos[atoms], z=self.z[atoms],
            batch=torch.cat(new_batch) if new_batch else torch.zeros(0, dtype=torch.long),
            cell=self.cell[graphs], pbc=self.pbc[graphs],
            edge_index=old_to_new[self.edge_index[:, edge_keep]], shifts=self.shifts[edge_keep],
            natoms=self.natoms[graphs], dataset_id=self.dataset_id[graphs], sample_id=self.sample_id[graphs],
            energy=self.energy[graphs], has_energy=self.has_energy[graphs],
            forces=self.forces[atoms], has_forces=self.has_forces[graphs],
            stress=self.stress[graphs], has_stress=self.has_stress[graphs],
            fixed=self.fixed[atoms], is_pseudo=self.is_pseudo[graphs], draw_id=self.draw_id[graphs],
        )
