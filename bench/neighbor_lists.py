"""Which neighbour-list backend should lamm-ds use by default?

Times ``lamm_ds.neighbors.radius_graph`` with backend "vesin" against backend "matscipy" (the full
call: library pairs + our float64 distance recompute, sort and ``max_neighbors`` cap), the two
libraries' raw pair searches alone, and ``ase.neighborlist.neighbor_list("ijS")`` as the reference
a naive pipeline would use (raw pairs only, no cap, no sort). Also what ingest computes per
structure, ``neighbor_summary`` (capped edge count + shortest edge), counted densely (the default)
against counting vesin's pairs (``dense=False``); the two must agree exactly.

Structures: demo-like rattled periodic fcc metal cells and slabs (8-300 atoms, built with
``ase.build``), mlearn Si and Mo training cells, 3BPA molecules (27 atoms, non-periodic), at cutoffs
5, 6 and 12 Å with ``max_neighbors=50``. All methods run in this one process, alternating in a
rotating order for several rounds; figures are medians over rounds of the time per structure.
Every case also checks that vesin and matscipy give identical graphs, and that the uncapped pair
count equals ASE's (on the structures ASE is timed on).

    .venv/bin/python bench/neighbor_lists.py            # ~1 minute on 2 cores
    .venv/bin/python bench/neighbor_lists.py --rounds 9

The last stdout line is one JSON object (ratios first); it is also written to
``bench/results/neighbor_lists.json``. Ratios are ``other_time / vesin_time``: above 1 means vesin
is faster. The real-data cases need ``../shared/data`` (or ``$LAMM_DS_SHARED_DATA``); without it
the benchmark exits cleanly with a message.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

from _common import DATA, RESULTS, geomean, load_1min, machine, repeats_for, rotated, skip, write_result

CUTOFFS = (5.0, 6.0, 12.0)
MAX_NEIGHBORS = 50


def demo_like_cells(seed: int = 0) -> dict[str, list]:
    """Rattled fcc cells like ``lamm_ds.demo`` makes (bulk, strained, slabs), in size classes."""
    from ase.build import bulk, fcc111

    rng = np.random.default_rng(seed)
    lattice = {"Al": 4.05, "Ni": 3.52, "Cu": 3.61, "Ag": 4.09, "Pt": 3.92}

    def finish(atoms):
        strain = np.eye(3) + rng.normal(0, 0.02, size=(3, 3))
        if atoms.pbc.all():
            atoms.set_cell(atoms.cell[:] @ ((strain + strain.T) / 2), scale_atoms=True)
        atoms.rattle(stdev=float(rng.uniform(0.03, 0.15)), seed=int(rng.integers(2**31)))
        return atoms

    cases: dict[str, list] = {"metal_bulk_8": [], "metal_bulk_32": [], "metal_slab111_45": [],
                              "metal_bulk_108": [], "metal_bulk_300": []}
    for k, el in enumerate(lattice):
        a = lattice[el]
        cases["metal_bulk_8"].append(finish(bulk(el, "fcc", a=a) * (2, 2, 2)))
        cases["metal_bulk_32"].append(finish(bulk(el, "fcc", a=a, cubic=True) * (2, 2, 2)))
        slab = fcc111(el, size=(3, 3, 5), a=a, vacuum=6.0)
        slab.info.pop("adsorbate_info", None)
        cases["metal_slab111_45"].append(finish(slab))
        if k < 3:
            cases["metal_bulk_108"].append(finish(bulk(el, "fcc", a=a, cubic=True) * (3, 3, 3)))
        if k < 2:
            cases["metal_bulk_300"].append(finish(bulk(el, "fcc", a=a, cubic=True) * (5, 5, 3)))
    return cases


def real_cells(n_per_set: int) -> dict[str, list]:
    import ase.io

    out = {}
    for name, rel in [("mlearn_Si", "mlearn/Si/training.xyz"), ("mlearn_Mo", "mlearn/Mo/training.xyz")]:
        frames = ase.io.read(DATA / rel, ":")
        by_type: dict[str, list] = {}
        for atoms in frames:
            by_type.setdefault(str(atoms.info.get("config_type")), []).append(atoms)
        groups = [by_type[t] for t in sorted(by_type)]
        picked, k = [], 0
        while len(picked) < n_per_set and any(k < len(g) for g in groups):  # round-robin over config types:
            picked += [g[k] for g in groups if k < len(g)]                 # AIMD, elastic, surface, vacancy
            k += 1
        out[name] = picked[:n_per_set]
    frames = ase.io.read(DATA / "3bpa" / "train_300K.xyz", ":")
    out["3bpa_molecule_27"] = frames[:: max(1, len(frames) // n_per_set)][:n_per_set]
    return out


def _arrays(atoms):
    return (np.ascontiguousarray(atoms.positions, dtype=np.float64), np.array(atoms.cell[:], dtype=np.float64),
            np.array(atoms.pbc, dtype=bool))


def make_methods(cutoff: float):
    from ase.neighborlist import neighbor_list

    from lamm_ds import neighbors

    def full(backend):
        return lambda a, arr: neighbors.radius_graph(*arr, cutoff, MAX_NEIGHBORS, backend)

    return {
        "vesin": full("vesin"),
        "matscipy": full("matscipy"),
        # the libraries alone, through the same box handling radius_graph uses
        "vesin_raw": lambda a, arr: neighbors._pairs_vesin(*arr, cutoff),
        "matscipy_raw": lambda a, arr: neighbors._pairs_matscipy(*arr, cutoff),
        "ase": lambda a, arr: neighbor_list("ijS", a, cutoff),
        # what ingest stores (edge count under the cap, shortest edge): counted densely vs from vesin's pairs
        "summary_dense": lambda a, arr: neighbors.neighbor_summary(*arr, cutoff, MAX_NEIGHBORS),
        "summary_vesin": lambda a, arr: neighbors.neighbor_summary(*arr, cutoff, MAX_NEIGHBORS, dense=False),
    }


def time_case(structures, cutoff: float, rounds: int, ase_rounds: int, ase_structures: int,
              target_s: float) -> tuple[dict[str, float], dict]:
    """Median ms per structure of every method, plus the correctness checks.

    A warm-up pass over every structure (whose outputs feed the checks) calibrates how many times
    each method repeats the structure list per timed pass, so one pass lasts about ``target_s``:
    short passes are at the mercy of the scheduler on a busy 2-core machine. ASE, 10-200x slower,
    runs on the first ``ase_structures`` structures and ``ase_rounds`` rounds only.
    """
    from lamm_ds.neighbors import radius_graph

    methods = make_methods(cutoff)
    prepared = [(a, _arrays(a)) for a in structures]
    subsets = {n: prepared[:ase_structures] if n == "ase" else prepared for n in methods}
    outputs, reps = {}, {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        outputs[name] = [fn(a, arr) for a, arr in subsets[name]]
        per_pass = time.perf_counter() - t0
        reps[name] = repeats_for(per_pass, target_s)
    identical = all(np.array_equal(gv.i, gm.i) and np.array_equal(gv.j, gm.j)
                    and np.array_equal(gv.shifts, gm.shifts)
                    for gv, gm in zip(outputs["vesin"], outputs["matscipy"]))
    uncapped = [radius_graph(*arr, cutoff, None, "vesin").num_edges for _, arr in subsets["ase"]]
    same_count = all(len(ijs[0]) == n for ijs, n in zip(outputs["ase"], uncapped))
    summaries_equal = outputs["summary_dense"] == outputs["summary_vesin"] and all(
        sm.num_edges == g.num_edges for sm, g in zip(outputs["summary_dense"], outputs["vesin"]))
    checks = {"identical_vesin_matscipy": bool(identical), "pair_count_equals_ase": bool(same_count),
              "summary_dense_equals_vesin": bool(summaries_equal),
              "mean_edges_capped": round(float(np.mean([g.num_edges for g in outputs["vesin"]])), 1),
              "mean_pairs_uncapped_ase_subset": round(float(np.mean(uncapped)), 1)}

    names = list(methods)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = rotated(names, r)  # rotate so no method always goes first
        for name in order:
            if name == "ase" and r >= ase_rounds:
                continue
            fn, items = methods[name], subsets[name]
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                for a, arr in items:
                    fn(a, arr)
            samples[name].append((time.perf_counter() - t0) / (reps[name] * len(items)))
    return {n: statistics.median(v) * 1e3 for n, v in samples.items()}, checks


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per case (median taken)")
    parser.add_argument("--ase-rounds", type=int, default=2,
                        help="rounds for the slow ASE reference (it is 10-200x slower)")
    parser.add_argument("--ase-structures", type=int, default=1,
                        help="structures per case the ASE reference is timed on")
    parser.add_argument("--real-structures", type=int, default=8, help="structures taken from each real set")
    parser.add_argument("--pass-seconds", type=float, default=0.05,
                        help="minimum duration of one timed pass (structures are repeated to reach it)")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        skip(f"{DATA} not found: the real-data cases (mlearn, 3bpa) need ../shared/data")
    try:
        import matscipy  # noqa: F401
        import vesin  # noqa: F401
    except ImportError as exc:
        skip(f"backend not installed: {exc}")

    start = time.perf_counter()
    load_start = load_1min()  # other processes on the machine skew the figures
    cases = {**demo_like_cells(), **real_cells(args.real_structures)}
    ratios, times, checks = {}, {}, {}
    for case, structures in cases.items():
        natoms = [len(a) for a in structures]
        for cutoff in CUTOFFS:
            key = f"{case}@{cutoff:g}A"
            t, check = time_case(structures, cutoff, args.rounds, min(args.ase_rounds, args.rounds),
                                 args.ase_structures, args.pass_seconds)
            checks[key] = {"structures": len(structures), "natoms": [min(natoms), max(natoms)], **check}
            times[key] = {k: round(v, 4) for k, v in t.items()}
            ratios[key] = {
                "matscipy/vesin": round(t["matscipy"] / t["vesin"], 3),
                "matscipy_raw/vesin_raw": round(t["matscipy_raw"] / t["vesin_raw"], 3),
                "ase/vesin": round(t["ase"] / t["vesin"], 2),
                "vesin_raw_share": round(t["vesin_raw"] / t["vesin"], 3),
                "summary_vesin/summary_dense": round(t["summary_vesin"] / t["summary_dense"], 3),
            }
            print(f"{key:28s} vesin {t['vesin']:9.3f} ms  matscipy {t['matscipy']:9.3f} ms  "
                  f"(raw {t['vesin_raw']:8.3f} / {t['matscipy_raw']:8.3f})  ase {t['ase']:9.3f} ms  "
                  f"matscipy/vesin {ratios[key]['matscipy/vesin']:.2f}", file=sys.stderr, flush=True)

    full_ratio = [r["matscipy/vesin"] for r in ratios.values()]
    raw_ratio = [r["matscipy_raw/vesin_raw"] for r in ratios.values()]
    matscipy_wins = sorted(k for k, r in ratios.items() if r["matscipy/vesin"] < 0.95)
    ties = sorted(k for k, r in ratios.items() if 0.95 <= r["matscipy/vesin"] <= 1.05)
    geo = geomean(full_ratio)
    summary = {
        "geomean_matscipy/vesin": round(geo, 3),
        "geomean_summary_vesin/summary_dense": round(geomean(r["summary_vesin/summary_dense"] for r in ratios.values()), 3),
        "all_summaries_equal": all(c["summary_dense_equals_vesin"] for c in checks.values()),
        "geomean_matscipy_raw/vesin_raw": round(geomean(raw_ratio), 3),
        "geomean_ase/vesin": round(geomean(r["ase/vesin"] for r in ratios.values()), 2),
        "cases": len(ratios),
        "vesin_faster_by_5pct": len(ratios) - len(matscipy_wins) - len(ties),
        "within_5pct": ties,
        "matscipy_faster_by_5pct": matscipy_wins,
        "all_graphs_identical": all(c["identical_vesin_matscipy"] for c in checks.values()),
        "all_pair_counts_equal_ase": all(c["pair_count_equals_ase"] for c in checks.values()),
        "recommended_default": "vesin" if geo >= 1.0 else "matscipy",
    }
    import ase
    import matscipy
    import vesin

    result = {
        "ratios": ratios,
        "summary": summary,
        "times_ms_per_structure": times,
        "checks": checks,
        "config": {"cutoffs": list(CUTOFFS), "max_neighbors": MAX_NEIGHBORS, "rounds": args.rounds,
                   "ase_rounds": min(args.ase_rounds, args.rounds),
                   "ase_structures": args.ase_structures, "pass_seconds": args.pass_seconds, "statistic": "median over rounds",
                   "versions": {"vesin": getattr(vesin, "__version__", "?"),
                                "matscipy": getattr(matscipy, "__version__", "?"), "ase": ase.__version__,
                                "numpy": np.__version__, "python": platform.python_version()},
                   "cpus": os.cpu_count(), "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
                   "loadavg_1min": {"start": load_start, "end": load_1min()},
                   "wall_s": round(time.perf_counter() - start, 1)},
        "machine": machine(),
    }
    write_result(result, RESULTS / "neighbor_lists.json")
    return result


if __name__ == "__main__":
    main()
