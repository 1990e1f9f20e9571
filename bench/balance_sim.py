"""Predicted data-parallel throughput of the batch schedulers at 8..4096 ranks, LaMM-like mixture.

Mixture (stated proportions; sizes from structures generated here, edge counts from real graph
building with ``lamm_ds.neighbors.radius_graph`` at cutoff 6 Å, max_neighbors 50, i.e. what
``lamm-ds ingest`` stores by default):

  catalyst  35%  periodic metal/alloy slabs (fcc111/fcc100/fcc110/bcc110/hcp0001) + adsorbate, 20-230 atoms
  oxide     15%  periodic rocksalt (100) and rutile (110) oxide slabs, 40-200 atoms
  mof       10%  periodic MOF-like frameworks (M4O nodes + dicarboxylate linkers on a cubic net), 50-300 atoms
  small     20%  small molecules: g2 molecules with >= 5 atoms and random organics of 2-9 heavy atoms, 5-29 atoms
  drug      20%  drug-like random organics of 14-30 heavy atoms + H, up to 60 atoms

The stream is the real ``MixtureStream`` (temperature 1 over pools sized by the proportions, so
every epoch holds exactly those proportions) and the plans are the real ``StepScheduler`` plans
(``window_steps`` as configured by default, 32). Per-rank cost = the calibrated built-in PaiNN
cost model (``builtin:painn-demo-cpu``: a·atoms + b·edges + c·graphs + d per micro-batch).

Metrics per (ranks R, nominal micro-batch m = samples per rank, batch_size = R·m), strategy:
  time        sum over steps of the slowest rank's predicted seconds (a step ends at the all-reduce)
  perfect     sum over steps of the mean rank's predicted seconds (the perfect-balance limit)
  throughput  samples / time; efficiency = perfect / time = throughput / perfect-balance throughput
  imbalance   per step max/mean of predicted rank costs, averaged over steps (and the worst step)
  step_cost_cv / step_samples_cv   coefficient of variation over steps of the total predicted
              cost / the number of samples of a step (budget mode: constant cost, variable count)

Strategies are planned in one process, alternating window by window; the planning wall time
per step is reported too (every rank computes the whole plan itself).

    .venv/bin/python bench/balance_sim.py            # ~2 minutes on 2 cores
    .venv/bin/python bench/balance_sim.py --quick    # 8 and 64 ranks only (-> balance_sim_quick.json)
    .venv/bin/python bench/balance_sim.py --ranks 512 --per-rank 1 2 --window-steps 8   # -> balance_sim_custom_w8.json

The last stdout line is one JSON object, ratios first, also written to bench/results/balance_sim.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from _common import REPO, RESULTS, machine, rotated, write_result

sys.path.insert(0, str(REPO))

from lamm_ds.mixture import MixtureStream  # noqa: E402
from lamm_ds.neighbors import radius_graph  # noqa: E402
from lamm_ds.scheduler import StepScheduler, builtin_cost_model  # noqa: E402

CUTOFF, MAX_NEIGHBORS = 6.0, 50
PROPORTIONS = {"catalyst": 0.35, "oxide": 0.15, "mof": 0.10, "small": 0.20, "drug": 0.20}
POOL = 2000            # generated structures in all (split by the proportions)
STRATEGIES = ("fixed", "atoms", "balanced", "budget")
RANKS = (8, 64, 512, 4096)
PER_RANK = (1, 2, 4, 8)
MIN_DRAWS = 65536      # draws simulated per grid point (whole windows, at least one)
WINDOW_STEPS = 32      # schedule.window_steps default

# --------------------------------------------------------------------------------------------------
# structures


def _adsorbates():
    from ase import Atoms
    from ase.build import molecule

    return [Atoms("H"), Atoms("O"), *(molecule(m) for m in ("OH", "CO", "CH3", "N2", "NH2", "HCO", "C2H4"))]


_ADSORBATES = _adsorbates()


def _catalyst(rng):
    from ase import Atoms
    from ase.build import add_adsorbate, bcc110, fcc100, fcc110, fcc111, hcp0001

    fcc = {"Pt": 3.92, "Pd": 3.89, "Cu": 3.61, "Ag": 4.09, "Au": 4.08, "Ni": 3.52, "Rh": 3.80, "Ir": 3.84, "Al": 4.05}
    while True:
        kind = rng.choice(["fcc111", "fcc100", "fcc110", "bcc110", "hcp0001"])
        size = (int(rng.integers(2, 7)), int(rng.integers(2, 7)), int(rng.integers(3, 8)))
        if not 17 <= size[0] * size[1] * size[2] <= 226:
            continue
        if kind == "bcc110":
            el = str(rng.choice(["Fe", "Mo", "W"]))
            slab = bcc110(el, size=size, a={"Fe": 2.87, "Mo": 3.15, "W": 3.16}[el], vacuum=7.5)
        elif kind == "hcp0001":
            el = str(rng.choice(["Co", "Ru", "Zn"]))
            slab = hcp0001(el, size=size, a={"Co": 2.51, "Ru": 2.71, "Zn": 2.66}[el], vacuum=7.5)
        else:
            el = str(rng.choice(list(fcc)))
            slab = {"fcc111": fcc111, "fcc100": fcc100, "fcc110": fcc110}[kind](el, size=size, a=fcc[el], vacuum=7.5)
        alloy = [str(x) for x in rng.choice(list(fcc), size=2)]
        if rng.random() < 0.5:  # binary alloy
            syms = slab.get_chemical_symbols()
            slab.set_chemical_symbols([alloy[0] if rng.random() < 0.3 else s for s in syms])
        mol = _ADSORBATES[int(rng.integers(len(_ADSORBATES)))].copy()
        top = slab.positions[:, 2].max()
        xy = slab.cell[0, :2] * rng.random() + slab.cell[1, :2] * rng.random()
        add_adsorbate(slab, mol, 1.9, position=tuple(xy))
        slab.rattle(0.05, seed=int(rng.integers(2**31)))
        if 20 <= len(slab) <= 230 and slab.positions[:, 2].max() > top:
            return slab


def _oxide(rng):
    from ase.build import bulk, surface
    from ase.spacegroup import crystal

    while True:
        if rng.random() < 0.5:
            el, a = [("Mg", 4.21), ("Ni", 4.18), ("Co", 4.26), ("Ca", 4.81)][int(rng.integers(4))]
            b = bulk(f"{el}O", "rocksalt", a=a, cubic=True)
            slab = surface(b, (1, 0, 0), int(rng.integers(2, 5)), vacuum=7.5)
        else:
            el, a, c, u = [("Ti", 4.59, 2.96, 0.305), ("Sn", 4.74, 3.19, 0.307), ("Ru", 4.49, 3.11, 0.306)][int(rng.integers(3))]
            b = crystal([el, "O"], basis=[(0, 0, 0), (u, u, 0)], spacegroup=136, cellpar=[a, a, c, 90, 90, 90])
            slab = surface(b, (1, 1, 0), int(rng.integers(2, 4)), vacuum=7.5)
        slab = slab * (int(rng.integers(1, 4)), int(rng.integers(1, 4)), 1)
        slab.rattle(0.05, seed=int(rng.integers(2**31)))
        if 40 <= len(slab) <= 200:
            return slab


def _mof(rng):
    """M4O nodes on a cubic net, linkers (carboxylate-ring(s)-carboxylate) along the three edges."""
    from ase import Atoms

    def linker(n_rings):
        # along +t from a node at t=0: carboxylate C, 2 O, rings of 6 C (+4 H), carboxylate at the far end
        t_ring0 = 2.9 + 1.5 + 1.4
        span = 2 * (2.9 + 1.5) + n_rings * 2.8 + (n_rings - 1) * 1.48
        atoms = [("C", 2.9, 0.0), ("O", 2.3, 1.1), ("O", 2.3, -1.1)]
        for k in range(n_rings):
            c = t_ring0 + k * (2.8 + 1.48)
            for j in range(6):
                ang = np.pi / 3 * j
                atoms.append(("C", c - 1.4 * np.cos(ang), 1.4 * np.sin(ang)))
                if j not in (0, 3):
                    atoms.append(("H", c - 2.48 * np.cos(ang), 2.48 * np.sin(ang)))
        atoms += [("C", span - 2.9, 0.0), ("O", span - 2.3, 1.1), ("O", span - 2.3, -1.1)]
        return atoms, span

    while True:
        n_rings = int(rng.choice([1, 1, 2]))
        short = rng.random() < 0.25
        parts, span = ([("C", 2.9, 0.0), ("O", 2.3, 1.1), ("O", 2.3, -1.1), ("C", 4.1, 0.0), ("C", 5.3, 0.0),
                        ("C", 6.5, 0.0), ("O", 7.1, 1.1), ("O", 7.1, -1.1)], 9.4) if short else linker(n_rings)
        reps = tuple(int(x) for x in rng.integers(1, 3, size=3))
        metal = str(rng.choice(["Zn", "Cu", "Zr", "Co"]))
        symbols, pos = [], []
        tet = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3) * 1.95
        for ix in range(reps[0]):
            for iy in range(reps[1]):
                for iz in range(reps[2]):
                    o = np.array([ix, iy, iz]) * span
                    symbols.append("O")
                    pos.append(o)
                    for v in tet:
                        symbols.append(metal)
                        pos.append(o + v)
                    for axis in range(3):
                        if rng.random() < 0.08:  # missing-linker defect
                            continue
                        perp = np.eye(3)[(axis + 1 + int(rng.integers(2))) % 3]
                        for sym, t, u in parts:
                            symbols.append(sym)
                            pos.append(o + np.eye(3)[axis] * t + perp * u)
        atoms = Atoms(symbols, positions=pos, cell=np.diag(np.array(reps) * span), pbc=True)
        atoms.rattle(0.05, seed=int(rng.integers(2**31)))
        if 50 <= len(atoms) <= 300:
            return atoms


def _organic(rng, heavy: int):
    """A random tree of C/N/O atoms (1.5 Å bonds, >= 2.4 Å between non-bonded heavy atoms),
    saturated with H at 1.09 Å (>= 1.6 Å from other atoms); non-periodic."""
    from ase import Atoms

    valence = {"C": 4, "N": 3, "O": 2}
    syms, nb = ["C"], [0]
    pos = np.zeros((heavy + 4 * heavy + 2, 3))
    n = 1
    tries = 0
    while len(syms) < heavy and tries < 5000:
        tries += 1
        p = int(rng.integers(len(syms)))
        if nb[p] >= valence[syms[p]] - (1 if len(syms) > 1 else 0):
            continue
        d = rng.normal(size=3)
        q = pos[p] + 1.5 * d / np.linalg.norm(d)
        dist = np.linalg.norm(pos[:n] - q, axis=1)
        dist[p] = 9.0
        if dist.min() < 2.4:
            continue
        syms.append(str(rng.choice(["C", "C", "C", "N", "O"])))
        pos[n] = q
        n += 1
        nb[p] += 1
        nb.append(1)
    for i in range(len(syms)):
        for _ in range(valence[syms[i]] - nb[i]):
            d = rng.normal(size=(30, 3))
            cand = pos[i] + 1.09 * d / np.linalg.norm(d, axis=1, keepdims=True)
            dist = np.linalg.norm(cand[:, None, :] - pos[None, :n, :], axis=2)
            dist[:, i] = 9.0
            ok = np.flatnonzero(dist.min(axis=1) > 1.6)
            if len(ok):
                syms.append("H")
                pos[n] = cand[ok[0]]
                n += 1
    return Atoms(syms, positions=pos[:n], pbc=False)


def _small(rng):
    from ase.collections import g2

    names = [n for n in sorted(g2.names) if len(g2[n]) >= 5]
    while True:
        atoms = g2[str(rng.choice(names))].copy() if rng.random() < 0.3 else _organic(rng, int(rng.integers(2, 10)))
        if 5 <= len(atoms) <= 29:
            atoms.rattle(0.03, seed=int(rng.integers(2**31)))
            return atoms


def _drug(rng):
    while True:
        atoms = _organic(rng, int(rng.integers(14, 31)))
        if 30 <= len(atoms) <= 60:
            return atoms


MAKERS = {"catalyst": _catalyst, "oxide": _oxide, "mof": _mof, "small": _small, "drug": _drug}


def generate(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """natoms and stored-style edge counts of generated structures, per category."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, frac in PROPORTIONS.items():
        n = int(round(POOL * frac))
        natoms, nedges = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        for i in range(n):
            a = MAKERS[name](rng)
            g = radius_graph(a.positions, a.cell[:], a.pbc, CUTOFF, MAX_NEIGHBORS)
            natoms[i], nedges[i] = len(a), g.num_edges
        out[name] = (natoms, nedges)
    return out


# --------------------------------------------------------------------------------------------------
# simulation


def simulate(pools, cost_model, ranks_list, per_rank_list, window_steps, seed=0):
    names = list(pools)
    stream = MixtureStream([len(pools[k][0]) for k in names], temperature=1.0, seed=seed)
    natoms = [pools[k][0] for k in names]
    nedges = [pools[k][1] for k in names]
    grid = {}
    for R in ranks_list:
        for m in per_rank_list:
            B = R * m
            W = window_steps * B
            windows = max(1, -(-MIN_DRAWS // W))
            steps = windows * window_steps
            scheds = {s: StepScheduler(stream, B, R, s, cost_model, natoms, nedges, window_steps=window_steps)
                      for s in STRATEGIES}
            acc = {s: {"time": 0.0, "perfect": 0.0, "samples": 0, "imb": [], "plan_s": 0.0, "total": [], "count": []}
                   for s in STRATEGIES}
            for w in range(windows):
                order = rotated(STRATEGIES, w)  # alternate
                for s in order:
                    t0 = time.perf_counter()
                    plans = [scheds[s].plan(st) for st in range(w * window_steps, (w + 1) * window_steps)]
                    acc[s]["plan_s"] += time.perf_counter() - t0
                    for p in plans:
                        acc[s]["time"] += float(p.predicted.max())
                        acc[s]["perfect"] += float(p.predicted.mean())
                        acc[s]["samples"] += len(p.positions)
                        acc[s]["imb"].append(float(p.predicted.max() / p.predicted.mean()))
                        acc[s]["total"].append(float(p.predicted.sum()))
                        acc[s]["count"].append(len(p.positions))
            res = {}
            for s, a in acc.items():
                res[s] = {"throughput": a["samples"] / a["time"], "perfect_throughput": a["samples"] / a["perfect"],
                          "efficiency": a["perfect"] / a["time"], "imbalance_mean": float(np.mean(a["imb"])),
                          "imbalance_worst_step": float(np.max(a["imb"])),
                          "imbalance_time_weighted": a["time"] / a["perfect"],
                          "step_cost_cv": float(np.std(a["total"]) / np.mean(a["total"])),
                          "step_samples_cv": float(np.std(a["count"]) / np.mean(a["count"])),
                          "plan_ms_per_step": 1000 * a["plan_s"] / steps, "steps": steps, "samples": a["samples"]}
            grid[f"{R}x{m}"] = res
            b = res["balanced"]
            print(f"R={R:5d} m={m}: throughput vs fixed/atoms: balanced {b['throughput'] / res['fixed']['throughput']:.2f}x/"
                  f"{b['throughput'] / res['atoms']['throughput']:.2f}x, budget "
                  f"{res['budget']['throughput'] / res['fixed']['throughput']:.2f}x/"
                  f"{res['budget']['throughput'] / res['atoms']['throughput']:.2f}x; efficiency fixed "
                  f"{res['fixed']['efficiency']:.3f} atoms {res['atoms']['efficiency']:.3f} balanced {b['efficiency']:.3f} "
                  f"budget {res['budget']['efficiency']:.3f}; balanced imbalance {b['imbalance_mean']:.3f} "
                  f"(worst {b['imbalance_worst_step']:.3f}); plan {b['plan_ms_per_step']:.1f} ms/step",
                  file=sys.stderr, flush=True)
    return grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 and 64 ranks only")
    ap.add_argument("--window-steps", type=int, default=WINDOW_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help=f"default {RANKS}")
    ap.add_argument("--per-rank", type=int, nargs="+", default=None, help=f"default {PER_RANK}")
    args = ap.parse_args(argv)
    custom = args.ranks is not None or args.per_rank is not None or args.window_steps != WINDOW_STEPS
    t0 = time.perf_counter()
    pools = generate(args.seed)
    gen_s = time.perf_counter() - t0
    mixture = {k: {"proportion": PROPORTIONS[k], "pool": int(len(a)), "atoms_min": int(a.min()), "atoms_max": int(a.max()),
                   "atoms_mean": round(float(a.mean()), 1), "edges_mean": round(float(e.mean()), 1),
                   "edges_per_atom": round(float(e.sum() / a.sum()), 1)}
               for k, (a, e) in pools.items()}
    print(f"generated {sum(len(a) for a, _ in pools.values())} structures in {gen_s:.1f} s: "
          + "; ".join(f"{k} {v['atoms_min']}-{v['atoms_max']} atoms, {v['edges_per_atom']} edges/atom" for k, v in mixture.items()),
          file=sys.stderr)
    cost = builtin_cost_model()
    ranks = args.ranks or (RANKS[:2] if args.quick else RANKS)
    grid = simulate(pools, cost, ranks, args.per_rank or PER_RANK, args.window_steps, args.seed)

    def ratio(key, a, b):
        return round(grid[key][a]["throughput"] / grid[key][b]["throughput"], 3)

    ratios = {}
    for key in grid:
        ratios[f"balanced/fixed@{key}"] = ratio(key, "balanced", "fixed")
        ratios[f"balanced/atoms@{key}"] = ratio(key, "balanced", "atoms")
    for key in grid:
        ratios[f"budget/fixed@{key}"] = ratio(key, "budget", "fixed")
        ratios[f"budget/atoms@{key}"] = ratio(key, "budget", "atoms")
    summary = {"min balanced/atoms over grid": min(ratios[f"balanced/atoms@{k}"] for k in grid)}
    targets = {}
    if "512x2" in grid:
        targets = {"balanced/fixed@512x2 >= 2.44 (aim 3)": ratios["balanced/fixed@512x2"] >= 2.44,
                   "balanced/atoms@512x2 >= 1.3": ratios["balanced/atoms@512x2"] >= 1.3,
                   "balanced >= atoms everywhere": summary["min balanced/atoms over grid"] >= 1.0}
    if any(k.startswith("4096x") for k in grid):
        imb = {k: grid[k]["balanced"]["imbalance_mean"] for k in grid if k.startswith("4096x")}
        summary["balanced imbalance (mean max/mean per step) @4096"] = {k: round(v, 4) for k, v in imb.items()}
        summary["balanced imbalance worst step @4096"] = {k: round(grid[k]["balanced"]["imbalance_worst_step"], 4)
                                                          for k in imb}
        targets["balanced imbalance <= 1.05 @4096 (mean over steps, every m)"] = max(imb.values()) <= 1.05
    out = {"ratios": ratios, "summary": summary, "targets_met": targets,
           "cost_model": {"source": cost.source, **{k: getattr(cost, k) for k in ("atoms", "edges", "graphs", "const")}},
           "mixture": mixture, "window_steps": args.window_steps, "cutoff": CUTOFF, "max_neighbors": MAX_NEIGHBORS,
           "grid": {k: {s: {kk: (round(vv, 5) if isinstance(vv, float) else vv) for kk, vv in r.items()}
                        for s, r in v.items()} for k, v in grid.items()},
           "machine": machine(),
           "wall_s": round(time.perf_counter() - t0, 1)}
    name = (f"balance_sim_custom_w{args.window_steps}" if custom else "balance_sim_quick" if args.quick
            else "balance_sim") + ".json"
    write_result(out, RESULTS / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
