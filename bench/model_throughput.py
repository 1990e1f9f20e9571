"""Is our PaiNN (``lamm_ds.model.Potential``) faster and leaner than a reference PaiNN?

Times one training forward+backward (energy + forces, a per-atom-energy MSE + force MSE loss,
``loss.backward()`` into the parameters, no optimiser step) of

* ours: ``lamm_ds.model.Potential`` with ``forces="direct"`` (gated equivariant force head) and with
  ``forces="conservative"`` (F = -dE/dx, double backward in training);
* the reference: SchNetPack's ``schnetpack.representation.PaiNN`` (Schütt et al. 2021, by the
  PaiNN authors) + ``schnetpack.atomistic.Atomwise`` energy head (summed per structure), with
  either a direct force head built from SchNetPack's own gated equivariant blocks
  (``schnetpack.nn.build_gated_equivariant_mlp``, the same 2-block H -> H/2 -> 1 shape as ours)
  or autograd forces (``torch.autograd.grad(..., create_graph=True)``, what
  ``schnetpack.atomistic.Forces`` does);

with equal hyperparameters (hidden width, interaction layers, number of Gaussian radial basis
functions, cosine cutoff) on the same batches and the very same edges: both models get the edge
list and periodic shifts built once by ``lamm_ds.graphs.build_sample`` (vesin, ``max_neighbors``
cap), and the edge vectors r_ij are computed by the same ``AtomsBatch.edge_vectors``.

Batches (real structures): 32 acetylacetone molecules from ``../shared/data/acac/train_300K.xyz``
(480 atoms, non-periodic, DFT labels) and 4 rattled periodic fcc cells (Cu, Al, Ni, Ag, 3x3x3
cubic, 432 atoms, ``ase.build.bulk``, EMT labels).

Figures: atoms/s = atoms in the batch / median seconds per step over alternating rounds (the
models in a rotating order, each repeated to last about ``--pass-seconds`` per round); the spread
of a ratio is the range of its per-round values (ours and the reference timed in the same round)
over their median. Peak memory
= the highest net CPU memory the step allocates on top of what existed before it (parameters,
batch), from the allocation events of ``torch.profiler`` (``profile_memory=True``), measured in
separate alternating passes so the profiler does not distort the timings. Everything runs in this
one process with one intra-op thread (``--threads``).

Subnormal floats: x86 arithmetic on subnormal (denormal) floats is 20-40x slower, and the far tails
of a narrow Gaussian radial basis reach them. Ours cuts its basis below exp(-36)
(``lamm_ds.model.numerics.gaussian``); SchNetPack's GaussianRBF does not. So that the headline
ratio is not only that, every case is also timed with flush-to-zero on for both models
(``torch.set_flush_denormal(True)``, which a user can set; ``ours_ftz``/``ref_ftz``), and the JSON
reports both ratios: ``ours_atoms_per_s/ref`` (torch defaults) and ``ours_ftz_atoms_per_s/ref_ftz``.
``--no-ftz`` leaves the second pair out.

The reference is an optional dependency (SchNetPack 2.1 pins ``sympy<=1.12``, which would make pip
pull another torch, so it is installed without its dependency resolution plus the few pure-Python
packages its import needs)::

    .venv/bin/pip install h5py pytorch-lightning torchmetrics torch-ema fasteners dirsync tensorboardX rich
    .venv/bin/pip install --no-deps "schnetpack==2.1.1"

SchNetPack 2.1.1 imports ``T_co`` from ``torch.utils.data.dataloader``, which newer torch no longer
defines; ``_import_schnetpack`` adds that one name (a ``TypeVar``) before importing it. Without
SchNetPack the benchmark prints a message and a JSON line with ``"skipped": true`` and exits 0.

    .venv/bin/python bench/model_throughput.py                # ~1.5 minutes on one free core
    .venv/bin/python bench/model_throughput.py --rounds 7 --hidden 128 --layers 4
    .venv/bin/python bench/model_throughput.py --with-unfused   # also ours with fused_messages=false
    .venv/bin/python bench/model_throughput.py --with-compiled  # also ours torch.compile'd (direct forces)

The last stdout line is one JSON object, ratios first: ``ours_atoms_per_s/ref`` (above 1: ours is
faster) and ``ours_peak_mem/ref`` (below 1: ours needs less memory), per ``system/forces`` case;
it is also written to ``bench/results/model_throughput.json``. Target: speed ratio >= 1.2 with
memory ratio <= 1.0 in every case, with and without flush-to-zero.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import typing

import numpy as np

from _common import (DATA, RESULTS, cuda_peak_bytes, geomean, load_1min, machine, peak_bytes, repeats_for, rotated,
                     skip, timed, write_result)

TARGET_SPEEDUP = 1.2
TARGET_MEMORY = 1.0


def _import_schnetpack():
    """Import SchNetPack, adding the one name it needs that recent torch no longer has."""
    import torch.utils.data.dataloader as dataloader

    if not hasattr(dataloader, "T_co"):
        dataloader.T_co = typing.TypeVar("T_co", covariant=True)
    import schnetpack

    return schnetpack


# ----------------------------------------------------------------------------------------- batches

def _structure(atoms, energy, forces):
    from lamm_ds.structure import Structure

    return Structure(numbers=atoms.numbers, positions=atoms.positions, cell=np.array(atoms.cell[:]),
                     pbc=np.array(atoms.pbc), energy=float(energy), forces=np.asarray(forces))


def acac_structures(n: int):
    import ase.io

    frames = ase.io.read(DATA / "acac" / "train_300K.xyz", f":{n}")
    out = []
    for a in frames:
        a.pbc = False  # the file carries a dummy 50 Å box with pbc F F F
        out.append(_structure(a, a.get_potential_energy(), a.get_forces()))
    return out


def periodic_structures(seed: int = 0):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    out = []
    for el, a0 in (("Cu", 3.61), ("Al", 4.05), ("Ni", 3.52), ("Ag", 4.09)):
        atoms = bulk(el, "fcc", a=a0, cubic=True) * (3, 3, 3)
        atoms.rattle(stdev=0.05, seed=int(rng.integers(2**31)))
        atoms.calc = EMT()
        out.append(_structure(atoms, atoms.get_potential_energy(), atoms.get_forces()))
    return out


def make_batch(structures, cutoff: float, max_neighbors: int):
    from lamm_ds.graphs import build_sample, collate

    return collate([build_sample(s, cutoff, max_neighbors) for s in structures])


# ------------------------------------------------------------------------------------------ models

def build_reference(spk, hidden: int, layers: int, num_rbf: int, cutoff: float, forces: str,
                    energy_per_atom: float = 0.0):
    import torch
    from torch import nn

    class ReferencePaiNN(nn.Module):
        """SchNetPack PaiNN + Atomwise energy (+ gated equivariant direct-force head or autograd forces)."""

        def __init__(self):
            super().__init__()
            self.representation = spk.representation.PaiNN(
                n_atom_basis=hidden, n_interactions=layers,
                radial_basis=spk.nn.GaussianRBF(n_rbf=num_rbf, cutoff=cutoff),
                cutoff_fn=spk.nn.CosineCutoff(cutoff))
            self.energy = spk.atomistic.Atomwise(n_in=hidden, n_out=1, n_layers=2, output_key="energy")
            # a constant per-atom offset, as SchNetPack's AddOffsets(add_mean=True) would add, so both
            # models see losses of the same size (ours has fitted per-element references)
            self.energy_per_atom = float(energy_per_atom)
            self.conservative = forces == "conservative"
            self.force_head = None if self.conservative else spk.nn.build_gated_equivariant_mlp(
                n_in=hidden, n_out=1, n_layers=2, sactivation=torch.nn.functional.silu)

        def forward(self, batch):
            pos = batch.pos
            if self.conservative:
                pos = pos.detach().requires_grad_(True)
            props = spk.properties
            inputs = {props.Z: batch.z, props.Rij: batch.edge_vectors(pos), props.idx_i: batch.edge_index[0],
                      props.idx_j: batch.edge_index[1], props.idx_m: batch.batch, props.n_atoms: batch.natoms}
            inputs = self.representation(inputs)
            energy = self.energy(inputs)["energy"] + self.energy_per_atom * batch.natoms
            if self.conservative:
                (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)
                f = -grad
            else:
                _, v = self.force_head((inputs["scalar_representation"], inputs["vector_representation"]))
                f = v.squeeze(-1)
            return {"energy": energy, "forces": f}

    return ReferencePaiNN()


def build_ours(hidden: int, layers: int, num_rbf: int, cutoff: float, max_neighbors: int, forces: str, stats,
               fused: bool = True):
    from lamm_ds.model.painn import PaiNNConfig
    from lamm_ds.model.potential import Potential

    cfg = PaiNNConfig(hidden=hidden, layers=layers, num_rbf=num_rbf, cutoff=cutoff, max_neighbors=max_neighbors,
                      forces=forces, fused_messages=fused)
    return Potential(cfg, ["bench"], {"bench": stats})


class FlushToZero:
    """Context: subnormal floats flushed to zero (and read as zero) while inside, off again after."""

    def __enter__(self):
        import torch

        torch.set_flush_denormal(True)

    def __exit__(self, *exc):
        import torch

        torch.set_flush_denormal(False)


def train_step(model, batch) -> float:
    """One forward + backward of the same loss for every model; returns the loss (a sanity check).

    A model with ``flush_denormal = True`` set on it runs its whole step under :class:`FlushToZero`."""
    if getattr(model, "flush_denormal", False):
        with FlushToZero():
            return _train_step(model, batch)
    return _train_step(model, batch)


def _train_step(model, batch) -> float:
    out = model(batch)
    e_err = (out["energy"] - batch.energy) / batch.natoms
    loss = e_err.square().mean() + (out["forces"] - batch.forces).square().mean()
    for p in model.parameters():
        p.grad = None
    loss.backward()
    return float(loss.detach())  # a host sync: GPU timings include the whole step


def peak_step_bytes(model, batch) -> int:
    """Highest net bytes allocated during one ``train_step``: on the CPU from the allocation events of
    the profiler, on a GPU ``max_memory_allocated`` over what was allocated before the step."""
    if batch.pos.is_cuda:
        return cuda_peak_bytes(train_step, batch.pos.device, model, batch)
    return peak_bytes(train_step, model, batch)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- main

class _Flushing:
    """The same model (same parameters), stepped under :class:`FlushToZero`."""

    flush_denormal = True

    def __init__(self, model):
        self.model = model

    def __call__(self, batch):
        return self.model(batch)

    def parameters(self):
        return self.model.parameters()

    def train(self):
        self.model.train()


def run_case(models: dict, batch, rounds: int, pass_seconds: float, mem_rounds: int) -> dict:
    names = list(models)
    for name in names:  # warm-up (allocator, first-call paths) and repetitions per timed pass
        train_step(models[name], batch)
    reps = {}
    for name in names:
        reps[name] = repeats_for(timed(train_step, models[name], batch), pass_seconds)
    samples = {n: [] for n in names}  # per round, so ratios of one round compare like with like
    losses = {}
    for r in range(rounds):
        for name in rotated(names, r):
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                losses[name] = train_step(models[name], batch)
            samples[name].append((time.perf_counter() - t0) / reps[name])
    mem = {n: [] for n in names}
    for r in range(mem_rounds):
        for name in rotated(names, r):
            mem[name].append(peak_step_bytes(models[name], batch))
    out = {n: {"s_per_step": statistics.median(samples[n]), "atoms_per_s": batch.num_atoms / statistics.median(samples[n]),
               "peak_mem_mb": statistics.median(mem[n]) / 2**20, "loss": losses[n],
               "spread": (max(samples[n]) - min(samples[n])) / statistics.median(samples[n])} for n in names}
    return out, samples


def ratio_over_rounds(samples: dict, ours: str, ref: str) -> dict:
    """Speed ratio ours/ref per round (same round, alternated): median, min, max, spread."""
    per_round = [r / o for o, r in zip(samples[ours], samples[ref])]
    med = statistics.median(per_round)
    return {"median": round(med, 3), "min": round(min(per_round), 3), "max": round(max(per_round), 3),
            "spread": round((max(per_round) - min(per_round)) / med, 3)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-rbf", type=int, default=20)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--max-neighbors", type=int, default=50)
    parser.add_argument("--molecules", type=int, default=32, help="acac molecules per batch")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (median taken)")
    parser.add_argument("--mem-rounds", type=int, default=2, help="alternating profiled passes for peak memory")
    parser.add_argument("--pass-seconds", type=float, default=1.0, help="minimum duration of one timed pass")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on a GPU the flush-to-zero pair is left out")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/model_throughput.json)")
    parser.add_argument("--no-ftz", action="store_true",
                        help="leave out the flush-to-zero pair (ours_ftz/ref_ftz)")
    parser.add_argument("--with-compiled", action="store_true",
                        help="also time ours torch.compile'd (direct forces only, as run config compile=true)")
    parser.add_argument("--with-unfused", action="store_true",
                        help="also time ours with model.fused_messages=false (diagnostic; reported in details only)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    no_ftz = args.no_ftz or device.type != "cpu"  # flush-to-zero is a CPU (x86/ARM) setting
    try:
        spk = _import_schnetpack()
    except Exception as exc:  # ImportError, or a version mismatch surfacing at import time
        skip(f"reference PaiNN (schnetpack) not importable: {type(exc).__name__}: {exc}. Install it with: .venv/bin/pip install "
             "h5py pytorch-lightning torchmetrics torch-ema fasteners dirsync tensorboardX rich && "
             ".venv/bin/pip install --no-deps 'schnetpack==2.1.1'")
    from lamm_ds.model.heads import fit_dataset_stats

    start = time.perf_counter()
    load_start = load_1min()
    systems = {}
    if (DATA / "acac" / "train_300K.xyz").is_file():
        systems["acac_molecules"] = acac_structures(args.molecules)
    else:
        print(f"note: {DATA / 'acac'} not found, the molecule case is left out", file=sys.stderr)
    systems["periodic_fcc"] = periodic_structures(args.seed)

    hp = dict(hidden=args.hidden, layers=args.layers, num_rbf=args.num_rbf, cutoff=args.cutoff)
    ratios_speed, ratios_ftz, ratios_compiled, ratios_mem, details, params = {}, {}, {}, {}, {}, {}
    for system, structures in systems.items():
        batch = make_batch(structures, args.cutoff, args.max_neighbors).to(device)
        stats = fit_dataset_stats(structures, 100)
        per_atom = float(np.mean([st.energy / st.natoms for st in structures]))
        for forces in ("direct", "conservative"):
            torch.manual_seed(args.seed)
            models = {"ours": build_ours(**hp, max_neighbors=args.max_neighbors, forces=forces, stats=stats),
                      "ref": build_reference(spk, **hp, forces=forces, energy_per_atom=per_atom)}
            if not no_ftz:  # the same two models again, timed with subnormals flushed to zero
                models["ours_ftz"], models["ref_ftz"] = _Flushing(models["ours"]), _Flushing(models["ref"])
            if args.with_unfused:
                models["ours_unfused"] = build_ours(**hp, max_neighbors=args.max_neighbors, forces=forces,
                                                    stats=stats, fused=False)
            if args.with_compiled and forces == "direct":  # what run config compile=true does
                models["ours_compiled"] = build_ours(**hp, max_neighbors=args.max_neighbors, forces=forces, stats=stats)
                models["ours_compiled"].load_state_dict(models["ours"].state_dict())
                models["ours_compiled"].compile(dynamic=True)
            for m in models.values():
                m.train()
                if not isinstance(m, _Flushing):
                    m.to(device)
            params[forces] = {n: n_params(models[n]) for n in ("ours", "ref")}
            res, samples = run_case(models, batch, args.rounds, args.pass_seconds, args.mem_rounds)
            key = f"{system}/{forces}"
            ratios_speed[key] = round(res["ours"]["atoms_per_s"] / res["ref"]["atoms_per_s"], 3)
            ratios_mem[key] = round(res["ours"]["peak_mem_mb"] / res["ref"]["peak_mem_mb"], 3)
            rounds = {"ours/ref": ratio_over_rounds(samples, "ours", "ref")}
            if "ours_compiled" in res:
                ratios_compiled[key] = round(res["ours_compiled"]["atoms_per_s"] / res["ref"]["atoms_per_s"], 3)
                rounds["ours_compiled/ref"] = ratio_over_rounds(samples, "ours_compiled", "ref")
            if not no_ftz:
                ratios_ftz[key] = round(res["ours_ftz"]["atoms_per_s"] / res["ref_ftz"]["atoms_per_s"], 3)
                rounds["ours_ftz/ref_ftz"] = ratio_over_rounds(samples, "ours_ftz", "ref_ftz")
            details[key] = {"atoms": batch.num_atoms, "edges": batch.num_edges, "graphs": batch.num_graphs,
                            "ratio_over_rounds": rounds,
                            **{n: {k: round(v, 4) for k, v in r.items()} for n, r in res.items()}}
            print(f"{key:30s} atoms {batch.num_atoms:4d} edges {batch.num_edges:6d} | "
                  f"ours {res['ours']['atoms_per_s']:8.0f} atoms/s {res['ours']['peak_mem_mb']:7.1f} MiB | "
                  f"ref {res['ref']['atoms_per_s']:8.0f} atoms/s {res['ref']['peak_mem_mb']:7.1f} MiB | "
                  f"speed x{ratios_speed[key]:.2f} mem x{ratios_mem[key]:.2f}"
                  + (f" | ftz speed x{ratios_ftz[key]:.2f}" if key in ratios_ftz else "")
                  + (f" | ours_unfused {res['ours_unfused']['atoms_per_s']:8.0f} atoms/s "
                     f"{res['ours_unfused']['peak_mem_mb']:7.1f} MiB" if "ours_unfused" in res else ""), file=sys.stderr)

    ratios = {"ours_atoms_per_s/ref": ratios_speed}
    if ratios_ftz:
        ratios["ours_ftz_atoms_per_s/ref_ftz"] = ratios_ftz
    if ratios_compiled:
        ratios["ours_compiled_atoms_per_s/ref"] = ratios_compiled
    ratios["ours_peak_mem/ref"] = ratios_mem
    ratios["geomean"] = {name: round(geomean(r.values()), 3) for name, r in ratios.items()}
    result = {
        "ratios": ratios,
        "target": {"min_speedup": TARGET_SPEEDUP, "max_mem_ratio": TARGET_MEMORY,
                   "met": {k: bool(ratios_speed[k] >= TARGET_SPEEDUP and ratios_ftz.get(k, TARGET_SPEEDUP) >= TARGET_SPEEDUP
                                   and ratios_mem[k] <= TARGET_MEMORY) for k in ratios_speed}},
        "details": details,
        "config": {**hp, "max_neighbors": args.max_neighbors, "rbf": "gaussian + cosine cutoff",
                   "step": "forward + backward of MSE(E/atom) + MSE(F), no optimiser step",
                   "reference": f"schnetpack {spk.__version__} PaiNN + Atomwise (+ gated equivariant force head)",
                   "parameters": params, "rounds": args.rounds, "mem_rounds": args.mem_rounds,
                   "pass_seconds": args.pass_seconds, "threads": args.threads,
                   "flush_to_zero_pair": not no_ftz, "device": str(device)},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": load_1min(),
                "seconds": round(time.perf_counter() - start, 1)},
        "machine": machine(),
    }
    write_result(result, args.out or RESULTS / "model_throughput.json")
    return result


if __name__ == "__main__":
    main()
