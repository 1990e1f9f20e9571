"""Multi-dataset interatomic potential: shared PaiNN backbone + per-dataset energy heads.

``Potential.forward(batch)`` returns a dict (per-graph tensors have B rows, per-atom N rows):
  energy (B,) eV; forces (N, 3) eV/Å; stress (B, 3, 3) eV/Å^3 (conservative + cfg.stress only,
  ASE sign convention, zeros for non-periodic graphs); energy_scale (B,) per-atom energy std of
  the graph's dataset (eV/atom); force_scale (B,) force std of the graph's dataset (eV/Å);
  pseudo_forces (N, 3) (only with cfg.denoise_head): the separate denoising head's prediction of
  the pseudo-force labels, in the labels' own units (see ``Potential.__init__``).
Graph g uses head ``dataset_names[batch.dataset_id[g]]``. Outputs are in the geometry dtype
(fp32, or fp64 for an fp64 batch) even when the module is bf16.
Conservative forces and stress are computed inside ``forward`` (DeepSpeed hooks the outputs, so
``autograd.grad`` on them outside would break); the graph is kept (create_graph) in training.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lamm_ds.graphs.batch import AtomsBatch
from lamm_ds.model.heads import DatasetStats, DirectForceHead, EnergyHead
from lamm_ds.model.numerics import geometry_dtype
from lamm_ds.model.painn import PaiNN, PaiNNConfig

_MIN_VOLUME = 1e-6  # Å^3; below this a "periodic" cell is degenerate and gets no stress


class Potential(nn.Module):
    #: ``{head name: sorted atomic numbers that head was trained on}``, or ``None`` when unknown.
    #: Stored in exported files; used to refuse structures with elements a head never saw
    #: (:func:`lamm_ds.engine.export.unseen_elements`). A head without an entry has unknown coverage.
    trained_elements: dict[str, list[int]] | None = None

    def __init__(self, cfg: PaiNNConfig, dataset_names: list[str],
                 stats: dict[str, DatasetStats] | None = None) -> None:
        super().__init__()
        if not dataset_names:
            raise ValueError("at least one dataset name is required")
        self.cfg = cfg
        self.backbone = PaiNN(cfg)
        self.heads = nn.ModuleDict()
        self.force_head = DirectForceHead(cfg.hidden) if cfg.forces == "direct" else None
        # Noisy-nodes / DeNS-style denoising: pseudo-force labels get their own equivariant head on
        # the backbone features, so the real force path (direct head or -dE/dx of an energy head) is
        # not asked to fit synthetic restoring forces. Its output is not multiplied by a dataset
        # force std: the labels are ~unit variance by construction (lamm_ds.denoise), whatever the
        # dataset, and the loss compares them unnormalised (lamm_ds.loss.universal).
        self.denoise_head = DirectForceHead(cfg.hidden) if cfg.denoise_head else None
        self._add_initial_heads(dataset_names, stats)

    def _add_initial_heads(self, dataset_names: list[str], stats: dict[str, DatasetStats] | None) -> None:
        for name in dataset_names:
            if stats is not None and name not in stats:
                raise KeyError(f"no DatasetStats given for dataset {name!r}")
            self.add_dataset(name, None if stats is None else stats[name])

    def _install_head(self, name: str, head: nn.Module, init_from: str | None, copied: str) -> int:
        """Add ``head`` for dataset ``name`` (its ``copied`` block taken from head ``init_from``,
        when given) on the backbone's device and dtype; returns its dataset index."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"dataset name must be a non-empty string without '.', got {name!r}")
        if name in self.heads:
            raise ValueError(f"dataset {name!r} already has a head")
        if init_from is not None:
            setattr(head, copied, copy.deepcopy(getattr(self.heads[init_from], copied)))
        ref = next(self.backbone.parameters())
        self.heads[name] = head.to(device=ref.device, dtype=ref.dtype)
        return len(self.heads) - 1

    @property
    def dataset_names(self) -> list[str]:
        return list(self.heads.keys())

    def dataset_index(self, name: str) -> int:
        """The ``dataset_id`` batches must carry for ``name`` (head insertion order)."""
        try:
            return self.dataset_names.index(name)
        except ValueError:
            raise KeyError(f"unknown dataset {name!r}; known: {self.dataset_names}") from None

    def add_dataset(self, name: str, stats: DatasetStats | None = None, init_from: str | None = None) -> int:
        """New energy head (backbone and force head shared); returns its dataset index.

        ``init_from`` copies the MLP weights of an existing head (a warm start for fine-tuning).
        ``trained_elements`` keeps its entries; the new head gets none (unknown coverage) until the
        training that fits it records one.
        """
        head = EnergyHead(self.cfg.hidden, stats or DatasetStats.identity(self.cfg.max_z), self.cfg.max_z)
        return self._install_head(name, head, init_from, "mlp")

    def _stacked(self, attr: str) -> torch.Tensor:
        return torch.stack([getattr(h.stats, attr) for h in self.heads.values()])

    def _atom_energy_norm(self, s: torch.Tensor, atom_ds: torch.Tensor) -> torch.Tensor:
        """Normalised per-atom energies, each atom through its own dataset's head."""
        heads = list(self.heads.values())
        if len(heads) == 1:
            return heads[0](s)
        if torch.compiler.is_compiling():
            # Every head on every atom, then each atom's own: no per-step head counts as Python ints,
            # which would make the compiled graph specialise (and recompile) on each batch's mix.
            # Same values and gradients as below; the heads are small next to the backbone.
            every = torch.cat([head(s).unsqueeze(1) for head in heads], dim=1)      # (N, heads)
            return every.gather(1, atom_ds.unsqueeze(1)).squeeze(1)
        counts = torch.bincount(atom_ds, minlength=len(heads))
        if counts.numel() > len(heads):
            raise ValueError(f"batch has dataset_id >= number of heads ({len(heads)})")
        order = torch.argsort(atom_ds, stable=True)
        chunks = s.index_select(0, order).split(counts.tolist())
        # Every head runs (maybe on 0 atoms) so all parameters take part in every step: DDP/ZeRO
        # ranks then reduce identical gradient sets even when their batches hold different datasets.
        e_sorted = torch.cat([head(c) for head, c in zip(heads, chunks)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return e_sorted.index_select(0, inverse)

    # Backbone-specific steps of forward(); EquiformerV2Potential overrides them. ``feats`` is
    # whatever the backbone returns (PaiNN: scalar and vector node features).

    def _features(self, batch: AtomsBatch, vectors: torch.Tensor, conservative: bool, return_features: bool):
        need_vectors = not conservative or return_features or self.denoise_head is not None
        return self.backbone(batch, vectors, need_vectors=need_vectors)

    def _normalised_atom_energy(self, feats, batch: AtomsBatch, atom_ds: torch.Tensor, gdtype) -> torch.Tensor:
        return self._atom_energy_norm(feats[0], atom_ds).to(gdtype)

    def _graph_energy_offset(self, batch: AtomsBatch, gdtype) -> torch.Tensor | None:
        return None

    def _direct_forces(self, feats) -> torch.Tensor:
        return self.force_head(*feats)

    def _feature_outputs(self, feats) -> dict[str, torch.Tensor]:
        return {"node_scalar": feats[0], "node_vector": feats[1]}

    def forward(self, batch: AtomsBatch, return_features: bool = False) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        conservative = cfg.forces == "conservative"
        want_stress = conservative and cfg.stress
        gdtype = geometry_dtype(batch.pos.dtype)
        grad_on = torch.is_grad_enabled()
        out: dict[str, torch.Tensor] = {}
        with torch.set_grad_enabled(grad_on or conservative):
            pos = batch.pos.to(gdtype)
            cell = batch.cell.to(gdtype)
            if conservative and not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            pos_leaf = pos
            # einsum/bmm would be lowered to bf16 under autocast: keep geometry out of it
            with torch.autocast(device_type=pos.device.type, enabled=False):
                if want_stress:
                    strain = torch.zeros(batch.num_graphs, 3, 3, dtype=gdtype, device=pos.device, requires_grad=True)
                    sym = 0.5 * (strain + strain.transpose(1, 2))
                    pos = pos + torch.einsum("ni,nij->nj", pos, sym.index_select(0, batch.batch))
                    cell = cell + torch.bmm(cell, sym)
                    volume = torch.linalg.det(batch.cell.to(gdtype)).abs()
                vectors = batch.edge_vectors(pos, cell)
            feats = self._features(batch, vectors, conservative, return_features)
            pseudo = self.denoise_head(*feats).to(gdtype) if self.denoise_head is not None else None

            atom_ds = batch.dataset_id.index_select(0, batch.batch)
            e_norm = self._normalised_atom_energy(feats, batch, atom_ds, gdtype)
            std = self._stacked("energy_std").to(gdtype)
            mean = self._stacked("energy_mean").to(gdtype)
            refs = self._stacked("references").to(gdtype)
            fstd = self._stacked("force_std").to(gdtype)
            atom_e = e_norm * std[atom_ds] + mean[atom_ds] + refs[atom_ds, batch.z]
            energy = torch.zeros(batch.num_graphs, dtype=gdtype, device=pos.device).index_add(0, batch.batch, atom_e)
            offset = self._graph_energy_offset(batch, gdtype)
            if offset is not None:
                energy = energy + offset
            out["energy"] = energy

            if conservative:
                inputs = [pos_leaf, strain] if want_stress else [pos_leaf]
                # create_graph only in training (a force/stress loss needs it); retain the graph
                # whenever the caller has grad on, so out["energy"] stays differentiable.
                grads = torch.autograd.grad(energy.sum(), inputs, create_graph=self.training and grad_on,
                                            retain_graph=grad_on, allow_unused=True)
                out["forces"] = -grads[0] if grads[0] is not None else torch.zeros_like(pos_leaf)
                if want_stress:
                    periodic = batch.pbc.any(dim=1) & (volume > _MIN_VOLUME)
                    dstrain = grads[1] if grads[1] is not None else torch.zeros_like(strain)
                    scale = torch.where(periodic, 1.0 / volume.clamp_min(_MIN_VOLUME), torch.zeros_like(volume))
                    out["stress"] = dstrain * scale[:, None, None]
            else:
                out["forces"] = self._direct_forces(feats).to(gdtype) * fstd[atom_ds].unsqueeze(-1)

            if pseudo is not None:
                out["pseudo_forces"] = pseudo
            out["energy_scale"] = std[batch.dataset_id]
            out["force_scale"] = fstd[batch.dataset_id]
            if return_features:
                out.update(self._feature_outputs(feats))
        if not grad_on:
            out = {k: t.detach() for k, t in out.items()}
        return out
