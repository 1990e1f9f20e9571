"""Is our EquiformerV2 (``lamm_ds.model.equiformer_v2``) faster and leaner than fairchem's?

Times one training step (train mode: attention dropout and drop-path on; energy + direct forces;
loss = per-structure energy MSE + force MSE; ``loss.backward()`` into the parameters; no optimiser
step) of

* ours: ``EquiformerV2Potential`` (one dataset head, identity statistics);
* the reference: fairchem-core 1.x ``EquiformerV2Backbone`` + ``EqV2ScalarHead`` +
  ``EqV2VectorHead`` (the hydra model of the published checkpoints);

with the same hyperparameters (a published preset, default 31M), the same weights (ours are
converted from the fairchem model by ``lamm_ds.model.convert_fairchem``), the same batches and the
very same edges: fairchem's on-the-fly graph generation is replaced by our neighbour list (built once
by ``lamm_ds.graphs.build_sample``), so only the networks are compared.

Batches (real structures): ``--molecules`` acetylacetone molecules from
``../shared/data/acac/train_300K.xyz`` (non-periodic) and ``--cells`` rattled periodic fcc cells
(Cu/Al/Ni/Ag, 2x2x2 cubic, 32 atoms each, ``ase.build.bulk``); cutoff and neighbour cap of the preset.

Figures: atoms/s = atoms in the batch / median seconds per step over alternating rounds; peak
memory = the highest net CPU memory one step allocates on top of what existed before it, from the
allocation events of ``torch.profiler`` (``profile_memory=True``), measured in a separate pass.
One intra-op thread by default (``--threads``). ``--device cuda``: the same on the GPU (timings
device-synchronised; peak memory = ``torch.cuda.max_memory_allocated`` during one step over what was
allocated before it). Without the acac file (e.g. on a machine without ../shared) the molecules are
ASE g2 molecules of 8+ atoms instead (recorded as ``molecules_source``).

fairchem-core 1.x is an optional dependency (``pip install "fairchem-core<2" --no-deps``); its
compiled ``torch_scatter`` import is replaced by ``torch_geometric``'s native scatter and its package
``__init__`` (which imports huggingface_hub etc.) is bypassed. Without it the benchmark prints a JSON
line with ``"skipped": true`` and exits 0.

    .venv/bin/python bench/eqv2_throughput.py                       # 31M preset, a few minutes
    .venv/bin/python bench/eqv2_throughput.py --preset 83M --molecules 4 --cells 1

The last stdout line is one JSON object (also written to ``bench/results/eqv2_throughput.json``):
``speedup`` = ours atoms/s / fairchem atoms/s (target >= 1.2) and ``memory_ratio`` = ours peak /
fairchem peak (target <= 1.0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import types

import numpy as np
import torch

from _common import (REPO, RESULTS, cuda_peak_bytes, fairchem_core_modules, machine, peak_bytes, rotated, skip, timed,
                     write_result)

sys.path.insert(0, str(REPO))
TARGET_END_TO_END = 1.5
ACAC = REPO / ".." / "shared" / "data" / "acac" / "train_300K.xyz"


def import_fairchem():
    if not fairchem_core_modules(os.path.join("models", "equiformer_v2", "equiformer_v2.py"), ("models", "common")):
        return None
    from fairchem.core.models.base import GraphData
    from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone
    from fairchem.core.models.equiformer_v2.heads import EqV2ScalarHead, EqV2VectorHead

    return EquiformerV2Backbone, EqV2ScalarHead, EqV2VectorHead, GraphData


def fairchem_kwargs(cfg) -> dict:
    return dict(num_layers=cfg.num_layers, sphere_channels=cfg.sphere_channels,
                attn_hidden_channels=cfg.attn_hidden_channels, num_heads=cfg.num_heads,
                attn_alpha_channels=cfg.attn_alpha_channels, attn_value_channels=cfg.attn_value_channels,
                ffn_hidden_channels=cfg.ffn_hidden_channels, norm_type=cfg.norm_type, lmax_list=[cfg.lmax],
                mmax_list=[cfg.mmax], grid_resolution=cfg.grid_resolution, edge_channels=cfg.edge_channels,
                use_grid_mlp=cfg.use_grid_mlp, max_radius=cfg.cutoff, max_neighbors=cfg.max_neighbors,
                max_num_elements=cfg.max_z + 1, weight_init=cfg.weight_init, alpha_drop=cfg.alpha_drop,
                drop_path_rate=cfg.drop_path_rate)


def _molecules(n: int):
    """(atoms list, source): acetylacetone frames, else g2 molecules of 8+ atoms."""
    from ase.io import read

    if ACAC.is_file():
        return read(str(ACAC), index=f":{n}"), "acac train_300K.xyz"
    from ase.build import molecule
    from ase.collections import g2

    names = sorted(nm for nm in g2.names if len(molecule(nm)) >= 8)
    return [molecule(names[k % len(names)]) for k in range(n)], "ase g2 molecules (acac file not found)"


def make_structures(n_mol: int, n_cells: int):
    """``n_mol`` molecules (non-periodic) then ``n_cells`` rattled periodic fcc cells, as Structures."""
    from ase.build import bulk

    from lamm_ds.structure import Structure

    structures = []
    make_structures.source = None
    if n_mol:
        mols, make_structures.source = _molecules(n_mol)
        for a in mols:
            structures.append(Structure(a.numbers, a.positions, energy=0.0, forces=np.zeros((len(a), 3))))
    for k in range(n_cells):
        sym, a0 = [("Cu", 3.61), ("Al", 4.05), ("Ni", 3.52), ("Ag", 4.09)][k % 4]
        c = bulk(sym, "fcc", a=a0, cubic=True).repeat((2, 2, 2))
        c.rattle(0.05, seed=k)
        structures.append(Structure(c.numbers, c.positions, c.cell[:], [True] * 3, energy=0.0,
                                    forces=np.zeros((len(c), 3))))
    return structures


def make_batch(structures, cutoff: float, max_nb: int, device="cpu"):
    """Our graphs (vesin neighbour list, strict cap) collated into one batch: what our loader does."""
    from lamm_ds.graphs import build_sample, collate

    return collate([build_sample(s, cutoff, max_nb) for s in structures]).to(device)


#: box given to fairchem for molecules (pbc off, so only its shape matters; as the acac file's dummy box)
_MOLECULE_BOX = 50.0


def fairchem_data(structures, device="cpu"):
    """What fairchem's collater hands its model for ``structures``: positions, cells, pbc, counts."""
    pos = torch.as_tensor(np.concatenate([s.positions for s in structures]), dtype=torch.float32)
    cells = [s.cell if np.asarray(s.pbc).any() else _MOLECULE_BOX * np.eye(3) for s in structures]
    natoms = torch.tensor([s.natoms for s in structures])
    return types.SimpleNamespace(
        pos=pos.to(device), cell=torch.as_tensor(np.stack(cells), dtype=torch.float32).to(device),
        pbc=torch.as_tensor(np.stack([np.asarray(s.pbc, dtype=bool) for s in structures])).to(device),
        natoms=natoms.to(device), atomic_numbers=torch.as_tensor(np.concatenate([s.numbers for s in structures])).to(device),
        batch=torch.repeat_interleave(torch.arange(len(structures)), natoms).to(device),
        energy=torch.zeros(len(structures), device=device), forces=torch.zeros(int(natoms.sum()), 3, device=device))


class FairchemModel(torch.nn.Module):
    """fairchem's backbone + heads; ``forward(batch)`` on our batch with our edges (graph excluded),
    ``forward(data, otf=True)`` on fairchem's own inputs with its on-the-fly graph (radius_graph_pbc)."""

    def __init__(self, backbone, energy_head, force_head, graph_data_cls):
        super().__init__()
        self.backbone, self.energy_head, self.force_head = backbone, energy_head, force_head
        self.graph_data_cls = graph_data_cls
        self._own_generate_graph = backbone.generate_graph

    def forward(self, b, otf: bool = False):
        if otf:
            self.backbone.otf_graph, self.backbone.use_pbc = True, True
            self.backbone.generate_graph = self._own_generate_graph
            data = b
        else:
            vec = b.edge_vectors()
            graph = self.graph_data_cls(edge_index=b.edge_index.flip(0), edge_distance=vec.norm(dim=-1),
                                        edge_distance_vec=vec, cell_offsets=b.shifts, offset_distances=None,
                                        neighbors=None, node_offset=0, batch_full=b.batch, atomic_numbers_full=b.z)
            self.backbone.generate_graph = lambda data, **kw: graph
            data = types.SimpleNamespace(natoms=b.natoms, pos=b.pos, atomic_numbers=b.z, batch=b.batch)
        emb = self.backbone(data)
        return {"energy": self.energy_head(data, emb)["energy"], "forces": self.force_head(data, emb)["forces"]}


def train_step(model, b):
    out = model(b)
    _backward(model, b, out)


def _backward(model, b, out):
    loss = (out["energy"] - b.energy).pow(2).mean() + (out["forces"] - b.forces).pow(2).mean()
    loss.backward()
    for p in model.parameters():
        p.grad = None
    if b.pos.is_cuda:
        torch.cuda.synchronize(b.pos.device)


def ours_end_to_end_step(model, structures, cutoff, max_nb, device):
    """Our step as a training loop has it: neighbour lists + collate, then forward + backward."""
    train_step(model, make_batch(structures, cutoff, max_nb, device))


def fairchem_end_to_end_step(model, structures, device):
    """fairchem's step as its trainer has it: tensors of the batch, on-the-fly graph in forward."""
    data = fairchem_data(structures, device)
    _backward(model, data, model(data, otf=True))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="31M", choices=["31M", "83M", "153M"])
    p.add_argument("--molecules", type=int, default=4)
    p.add_argument("--cells", type=int, default=2)
    p.add_argument("--cases", nargs="+", default=["graph_excluded", "end_to_end"],
                   choices=["graph_excluded", "end_to_end"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--out", default=str(RESULTS / "eqv2_throughput.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lamm_ds.model.convert_fairchem import convert_checkpoint
    from lamm_ds.model.equiformer_v2 import EquiformerV2Config, count_parameters

    fc = import_fairchem()
    if fc is None:
        skip("fairchem-core 1.x not installed (pip install 'fairchem-core<2' --no-deps)")
    Backbone, ScalarHead, VectorHead, GraphData = fc
    cfg = EquiformerV2Config.preset(args.preset)
    kw = fairchem_kwargs(cfg)
    torch.manual_seed(0)
    bb = Backbone(**kw)
    ref = FairchemModel(bb, ScalarHead(bb), VectorHead(bb), GraphData).train()
    ckpt = {"state_dict": {**{f"backbone.{k}": v for k, v in bb.state_dict().items()},
                           **{f"output_heads.energy.{k}": v for k, v in ref.energy_head.state_dict().items()},
                           **{f"output_heads.forces.{k}": v for k, v in ref.force_head.state_dict().items()}},
            "config": {"model": {"name": "hydra", "backbone": {"model": "equiformer_v2_backbone", **kw},
                                 "heads": {"energy": {"module": "equiformer_v2_energy_head"},
                                           "forces": {"module": "equiformer_v2_force_head"}}}}}
    ours = convert_checkpoint(ckpt, "bench").train()
    dev = torch.device(args.device)
    ours, ref = ours.to(dev), ref.to(dev)
    structures = make_structures(args.molecules, args.cells)
    molecules, cells = structures[:args.molecules], structures[args.molecules:]
    cut, nb = cfg.cutoff, cfg.max_neighbors
    cases = {}  # name -> (atoms, ours step, fairchem step, edges ours, edges fairchem)
    if "graph_excluded" in args.cases:
        b = make_batch(structures, cut, nb, dev)
        cases["mixed/graph_excluded"] = (b.num_atoms, lambda b=b: train_step(ours, b),
                                         lambda b=b: train_step(ref, b), b.num_edges, b.num_edges)
    for name, group in (("molecules", molecules), ("periodic", cells)):
        if "end_to_end" in args.cases and group:
            ours_edges = make_batch(group, cut, nb).num_edges
            ref_edges = int(ref.backbone.generate_graph(fairchem_data(group), cutoff=cut, max_neighbors=nb,
                                                         use_pbc=True, otf_graph=True).edge_index.shape[1])
            cases[f"{name}/end_to_end"] = (
                sum(s.natoms for s in group),
                lambda g=group: ours_end_to_end_step(ours, g, cut, nb, dev),
                lambda g=group: fairchem_end_to_end_step(ref, g, dev), ours_edges, ref_edges)

    peak = (lambda fn: cuda_peak_bytes(fn, dev)) if dev.type == "cuda" else peak_bytes
    speedup, memory, details = {}, {}, {}
    for case, (atoms, ours_step, ref_step, ours_edges, ref_edges) in cases.items():
        steps = {"ours": ours_step, "fairchem": ref_step}
        for fn in steps.values():  # warm-up
            fn()
        times = {k: [] for k in steps}
        for r in range(args.rounds):
            for k in rotated(list(steps), r):  # two models: alternately first
                times[k].append(timed(steps[k]))
        mem = {k: peak(fn) for k, fn in steps.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        per_round = [f / o for o, f in zip(times["ours"], times["fairchem"])]
        speedup[case] = round(med["fairchem"] / med["ours"], 3)
        memory[case] = round(mem["ours"] / mem["fairchem"], 3)
        details[case] = {
            "atoms": atoms, "edges_ours": ours_edges, "edges_fairchem": ref_edges,
            "ours_atoms_per_s": round(atoms / med["ours"], 3), "fairchem_atoms_per_s": round(atoms / med["fairchem"], 3),
            "ours_step_s": round(med["ours"], 4), "fairchem_step_s": round(med["fairchem"], 4),
            "speedup_per_round": [round(x, 3) for x in per_round],
            "speedup_spread": round((max(per_round) - min(per_round)) / statistics.median(per_round), 3),
            "ours_peak_mb": round(mem["ours"] / 2**20, 1), "fairchem_peak_mb": round(mem["fairchem"] / 2**20, 1)}
        print(f"{args.preset} {case}: {atoms} atoms, edges ours {ours_edges} fairchem {ref_edges}; "
              f"ours {details[case]['ours_atoms_per_s']:.1f} atoms/s, {details[case]['ours_peak_mb']:.0f} MB; "
              f"fairchem {details[case]['fairchem_atoms_per_s']:.1f} atoms/s, {details[case]['fairchem_peak_mb']:.0f} MB; "
              f"x{speedup[case]:.2f}", file=sys.stderr)
    result = {
        "speedup": speedup, "memory_ratio": memory,
        "target": {"min_speedup_end_to_end": TARGET_END_TO_END,
                   "met": {c: bool(x >= TARGET_END_TO_END) for c, x in speedup.items() if c.endswith("end_to_end")}},
        "preset": args.preset, "details": details,
        "params": count_parameters(ours), "threads": args.threads, "rounds": args.rounds,
        "device": str(dev), "molecules_source": make_structures.source, "machine": machine(),
    }
    write_result(result, args.out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
