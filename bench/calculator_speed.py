"""MD speed of our ASE calculator against SchNetPack's and MACE's, on a periodic cell and a molecule.

Each calculator drives the same NVE run (ASE ``VelocityVerlet``, 0.5 fs, the same starting atoms
and velocities): one step = one new geometry = neighbour list + energy + conservative forces, what
a user's MD costs. Figures are MD steps per second, medians over alternating rounds (calculators
in a rotating order, each round a fresh copy of the starting atoms, steps per pass sized to last
about ``--pass-seconds``), one intra-op thread (``--threads``), float32 everywhere, on the CPU
(``--device cuda``: all calculators on the GPU; ASE's integrator stays on the host, as in a user's run).

* ours: ``lamm_ds.calculator.LammCalculator`` loading an exported model file (what a user runs) of a
  PaiNN ``Potential`` with conservative forces (hidden 128, 3 layers, 20 Gaussians, cosine cutoff
  5 Å: the PaiNN paper's size), no neighbour cap;
* ours compiled: the same with ``LammCalculator(..., compile=True)`` (``torch.compile``, inductor);
  its compilation happens in the warm-up and is reported apart (``first_steps_with_compile_s``);
* SchNetPack 2.1.1: ``schnetpack.interfaces.SpkCalculator`` around a ``NeuralNetworkPotential`` with
  its PaiNN of the same hyperparameters, ``Atomwise`` energy and ``Forces`` (autograd), its
  ``MatScipyNeighborList`` (its fastest CPU list) — the model is handed over in memory (a subclass
  replaces its ``torch.load`` of a pickled file, which we never do for a file we did not write);
* MACE (mace-torch): ``mace.calculators.MACECalculator`` around a small MACE built in memory
  (128x0e, 2 interactions, max_ell 3, correlation 3, 8 Bessel functions, r_max 5 Å: the shape of
  MACE-MP-0 "small" at our cutoff).

Models are randomly initialised (speed does not depend on training); each is checked to give finite
energies and forces that conserve energy to first order (a finite-difference check is in the
tests of each project, not here). Systems: a rattled 64-atom diamond Si cell (2x2x2 cubic) and
ethanol (9 atoms, ASE g2).

The optional references: SchNetPack as in ``bench/model_throughput.py``; mace-torch with
``pip install -c <(echo torch==2.13.0) mace-torch`` and then ``pip install "e3nn>=0.5"`` again
(mace-torch pins e3nn 0.4.4; lamm-ds needs >= 0.5; MACE runs with it). A missing reference is
left out (noted in the JSON); with neither, only ours are timed (steps/s, no ratios).

    .venv/bin/python bench/calculator_speed.py          # ~2 minutes

The last stdout line is one JSON object, ratios first: ``ours_steps_per_s/<reference>`` and
``ours_compiled_steps_per_s/<reference>`` per system (above 1: ours is faster); also written to ``bench/results/calculator_speed.json``.
Target: >= 1.0 against MACE on both systems (eager, without compile).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import RESULTS, geomean, load_1min, machine, repeats_for, rotated, write_result

TARGET_VS_MACE = 1.0
CUTOFF = 5.0
HIDDEN, LAYERS, NUM_RBF = 128, 3, 20
TIMESTEP_FS = 0.5


def systems() -> dict:
    from ase.build import bulk, molecule
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    si = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2)
    si.rattle(0.05, seed=1)
    ethanol = molecule("CH3CH2OH")
    out = {"si64_periodic": si, "ethanol_molecule": ethanol}
    rng = np.random.default_rng(0)
    for atoms in out.values():
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
    return out


ELEMENTS = [1, 6, 8, 14]  # H, C, O, Si


def ours_calculator(device: str = "cpu"):
    import torch

    from lamm_ds.calculator import LammCalculator
    from lamm_ds.engine.export import export_model
    from lamm_ds.model.heads import DatasetStats
    from lamm_ds.model.painn import PaiNNConfig
    from lamm_ds.model.potential import Potential

    cfg = PaiNNConfig(hidden=HIDDEN, layers=LAYERS, num_rbf=NUM_RBF, cutoff=CUTOFF, max_neighbors=None,
                      forces="conservative")
    model = Potential(cfg, ["bench"], {"bench": DatasetStats.identity(cfg.max_z)})
    n = sum(p.numel() for p in model.parameters())
    # the user's path: an exported model file, loaded by the calculator
    path = export_model(model, Path(tempfile.mkdtemp(prefix="lamm_calc_bench_")) / "model.safetensors")
    return (LammCalculator(path, device=device, dtype=torch.float32),
            LammCalculator(path, device=device, dtype=torch.float32, compile=True), n)


def schnetpack_calculator(device: str = "cpu"):
    import torch

    from model_throughput import _import_schnetpack

    spk = _import_schnetpack()
    from schnetpack.interfaces.ase_interface import SpkCalculator

    class InMemorySpkCalculator(SpkCalculator):
        """SpkCalculator taking the model object instead of unpickling a file."""

        def _load_model(self, model):
            return model.eval()

    model = spk.model.NeuralNetworkPotential(
        representation=spk.representation.PaiNN(
            n_atom_basis=HIDDEN, n_interactions=LAYERS, radial_basis=spk.nn.GaussianRBF(n_rbf=NUM_RBF, cutoff=CUTOFF),
            cutoff_fn=spk.nn.CosineCutoff(CUTOFF)),
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=HIDDEN, output_key="energy"),
                        spk.atomistic.Forces(energy_key="energy", force_key="forces")])
    n = sum(p.numel() for p in model.parameters())
    calc = InMemorySpkCalculator(model, neighbor_list=spk.transform.MatScipyNeighborList(cutoff=CUTOFF),
                                 energy_key="energy", force_key="forces", energy_unit="eV", position_unit="Ang",
                                 device=device, dtype=torch.float32)
    return calc, n, spk.__version__


def mace_calculator(device: str = "cpu"):
    import torch
    from e3nn import o3
    from mace import modules
    from mace.calculators import MACECalculator

    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.MACE(
        r_max=CUTOFF, num_bessel=8, num_polynomial_cutoff=5, max_ell=3, interaction_cls=block,
        interaction_cls_first=block, num_interactions=2, num_elements=len(ELEMENTS),
        hidden_irreps=o3.Irreps("128x0e"), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(len(ELEMENTS)), avg_num_neighbors=20.0, atomic_numbers=ELEMENTS,
        correlation=3, gate=torch.nn.functional.silu).float()
    n = sum(p.numel() for p in model.parameters())
    import mace

    return MACECalculator(models=model.to(device), device=device, default_dtype="float32"), n, getattr(mace, "__version__", "?")


def md_steps(calc, start, steps: int) -> float:
    """Seconds for ``steps`` velocity-Verlet steps from a fresh copy of ``start``; checks the result."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = copy.deepcopy(start)
    atoms.calc = calc
    dyn = VelocityVerlet(atoms, TIMESTEP_FS * units.fs)
    atoms.get_forces()  # the first evaluation belongs to the set-up, as in a user's run
    t0 = time.perf_counter()
    dyn.run(steps)
    dt = time.perf_counter() - t0
    if not (np.isfinite(atoms.get_potential_energy()) and np.isfinite(atoms.get_forces()).all()):
        raise RuntimeError(f"{type(calc).__name__} gave non-finite energy or forces")
    return dt


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pass-seconds", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (all calculators)")
    p.add_argument("--out", default=str(RESULTS / "calculator_speed.json"))
    p.add_argument("--no-compile", action="store_true", help="leave out ours with compile=True")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_start = load_1min()
    calcs, params, notes, versions = {}, {}, {}, {}
    calcs["ours"], compiled, params["ours"] = ours_calculator(args.device)
    if not args.no_compile:
        calcs["ours_compiled"] = compiled
    try:
        calcs["schnetpack"], params["schnetpack"], versions["schnetpack"] = schnetpack_calculator(args.device)
    except Exception as exc:  # not installed, or a version that does not import here
        notes["schnetpack"] = f"left out: {type(exc).__name__}: {exc}"
    try:
        calcs["mace"], params["mace"], versions["mace"] = mace_calculator(args.device)
    except Exception as exc:
        notes["mace"] = f"left out: {type(exc).__name__}: {exc}"
    # without any reference (e.g. a bare GPU machine) ours are still timed: steps/s, no ratios

    names = list(calcs)
    refs = [n for n in names if not n.startswith("ours")]
    ratios = {f"{ours}_steps_per_s/{ref}": {} for ours in names if ours.startswith("ours") for ref in refs}
    details = {}
    for system, atoms in systems().items():
        compile_s = None
        for name in names:  # warm-up (the compiled calculator compiles here: timed apart)
            t0 = time.perf_counter()
            md_steps(calcs[name], atoms, 3)
            if name == "ours_compiled":
                compile_s = round(time.perf_counter() - t0, 1)
        reps = {name: repeats_for(md_steps(calcs[name], atoms, 5) / 5, args.pass_seconds) for name in names}
        per_step = {name: [] for name in names}
        for r in range(args.rounds):
            for name in rotated(names, r):
                per_step[name].append(md_steps(calcs[name], atoms, reps[name]) / reps[name])
        med = {name: statistics.median(v) for name, v in per_step.items()}
        details[system] = {"atoms": len(atoms), "periodic": bool(atoms.pbc.any()),
                           **{name: {"steps_per_s": round(1.0 / med[name], 2), "steps_per_pass": reps[name],
                                     "spread": round((max(v) - min(v)) / med[name], 3)}
                              for name, v in per_step.items()}}
        details[system]["first_steps_with_compile_s"] = compile_s
        for ours in (n for n in names if n.startswith("ours")):
            for ref in refs:
                per_round = [b / a for a, b in zip(per_step[ours], per_step[ref])]
                ratios[f"{ours}_steps_per_s/{ref}"][system] = round(med[ref] / med[ours], 3)
                details[system][f"{ours}/{ref}_per_round"] = [round(x, 3) for x in per_round]
        print(f"{system:18s} {len(atoms):3d} atoms | " + " | ".join(
            f"{name} {1.0 / med[name]:7.1f} steps/s" for name in names), file=sys.stderr)

    result = {
        "ratios": {**ratios, "geomean": {k: round(geomean(v.values()), 3) for k, v in ratios.items()}},
        "target": {"min_vs_mace": TARGET_VS_MACE,
                   "met": ({s: bool(x >= TARGET_VS_MACE) for s, x in ratios["ours_steps_per_s/mace"].items()}
                           if "ours_steps_per_s/mace" in ratios else None)},
        "details": details,
        "config": {"cutoff": CUTOFF, "ours_and_schnetpack": {"hidden": HIDDEN, "layers": LAYERS, "num_rbf": NUM_RBF},
                   "mace": "128x0e, 2 interactions, max_ell 3, correlation 3, 8 Bessel, r_max 5",
                   "parameters": params, "versions": versions, "left_out": notes, "timestep_fs": TIMESTEP_FS,
                   "dtype": "float32", "rounds": args.rounds, "pass_seconds": args.pass_seconds,
                   "threads": args.threads, "device": args.device, "loadavg_start": load_start, "loadavg_end": load_1min(),
                   "seconds": round(time.perf_counter() - start, 1)},
        "machine": machine(),
    }
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
