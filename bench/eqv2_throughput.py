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
import importlib.util
import os
import statistics
import sys
import types

import numpy as np
import torch

from _common import REPO, RESULTS, machine, peak_bytes, rotated, skip, timed, write_result

sys.path.insert(0, str(REPO))
ACAC = REPO / ".." / "shared" / "data" / "acac" / "train_300K.xyz"


def import_fairchem():
    spec = importlib.util.find_spec("fairchem")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], "core")
    if not os.path.isfile(os.path.join(root, "models", "equiformer_v2", "equiformer_v2.py")):
        return None
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        from torch_geometric.utils import scatter as pyg_scatter

        shim = types.ModuleType("torch_scatter")
        shim.scatter = lambda src, index, dim=0, out=None, dim_size=None, reduce="sum": pyg_scatter(
            src, index, dim=dim, dim_size=dim_size, reduce=reduce)
        sys.modules["torch_scatter"] = shim
    for name, sub in (("fairchem.core", ""), ("fairchem.core.models", "models"), ("fairchem.core.common", "common")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = mod
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


def make_batch(n_mol: int, n_cells: int, cutoff: float, max_nb: int):
    from ase.build import bulk

    from lamm_ds.graphs import build_sample, collate
    from lamm_ds.structure import Structure

    structures = []
    make_batch.source = None
    if n_mol:
        mols, make_batch.source = _molecules(n_mol)
        for a in mols:
            structures.append(Structure(a.numbers, a.positions, energy=0.0, forces=np.zeros((len(a), 3))))
    for k in range(n_cells):
        sym, a0 = [("Cu", 3.61), ("Al", 4.05), ("Ni", 3.52), ("Ag", 4.09)][k % 4]
        c = bulk(sym, "fcc", a=a0, cubic=True).repeat((2, 2, 2))
        c.rattle(0.05, seed=k)
        structures.append(Structure(c.numbers, c.positions, c.cell[:], [True] * 3, energy=0.0,
                                    forces=np.zeros((len(c), 3))))
    return collate([build_sample(s, cutoff, max_nb) for s in structures])


class FairchemModel(torch.nn.Module):
    def __init__(self, backbone, energy_head, force_head, graph_data_cls):
        super().__init__()
        self.backbone, self.energy_head, self.force_head = backbone, energy_head, force_head
        self.graph_data_cls = graph_data_cls

    def forward(self, b):
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
    loss = (out["energy"] - b.energy).pow(2).mean() + (out["forces"] - b.forces).pow(2).mean()
    loss.backward()
    for p in model.parameters():
        p.grad = None
    if b.pos.is_cuda:
        torch.cuda.synchronize(b.pos.device)


def cuda_peak_bytes(fn, *args) -> int:
    """Highest CUDA memory allocated during one call of ``fn`` over what was allocated before it."""
    dev = args[-1].pos.device
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn(*args)
    return torch.cuda.max_memory_allocated(dev) - base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="31M", choices=["31M", "83M", "153M"])
    p.add_argument("--molecules", type=int, default=4)
    p.add_argument("--cells", type=int, default=1)
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
    b = make_batch(args.molecules, args.cells, cfg.cutoff, cfg.max_neighbors).to(dev)
    ours, ref = ours.to(dev), ref.to(dev)
    models = {"ours": ours, "fairchem": ref}

    for m in models.values():      # warm-up
        train_step(m, b)
    times = {k: [] for k in models}
    for r in range(args.rounds):
        for k in rotated(list(models), r):  # two models: alternately first
            times[k].append(timed(train_step, models[k], b))
    peak = cuda_peak_bytes if dev.type == "cuda" else peak_bytes
    mem = {k: peak(train_step, m, b) for k, m in models.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "speedup": med["fairchem"] / med["ours"],
        "memory_ratio": mem["ours"] / mem["fairchem"],
        "preset": args.preset,
        "atoms": b.num_atoms, "edges": b.num_edges, "graphs": b.num_graphs,
        "ours_atoms_per_s": b.num_atoms / med["ours"], "fairchem_atoms_per_s": b.num_atoms / med["fairchem"],
        "ours_step_s": med["ours"], "fairchem_step_s": med["fairchem"],
        "ours_peak_mb": mem["ours"] / 2**20, "fairchem_peak_mb": mem["fairchem"] / 2**20,
        "params": count_parameters(ours), "threads": args.threads, "rounds": args.rounds,
        "device": str(dev), "molecules_source": make_batch.source, "machine": machine(),
    }
    print(f"{args.preset}: {b.num_atoms} atoms, {b.num_edges} edges; ours {result['ours_atoms_per_s']:.1f} atoms/s, "
          f"{result['ours_peak_mb']:.0f} MB; fairchem {result['fairchem_atoms_per_s']:.1f} atoms/s, "
          f"{result['fairchem_peak_mb']:.0f} MB")
    write_result(result, args.out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
