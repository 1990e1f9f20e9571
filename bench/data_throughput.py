"""Structures per second for "read a structure + build its graph": naive ASE pipeline vs lamm-ds.

baseline            per structure ``ase.io.read(xyz, index=k)`` (what a naive Dataset.__getitem__
                    does) + ``ase.neighborlist.neighbor_list("ijSd")`` at the same cutoff, with the
                    same max-neighbour cap done in numpy (sort by distance, then j, then shift)
baseline_preloaded  the same, but the file is parsed once per pass with ``ase.io.read(xyz, ":")``
                    (the parse time is spread over all structures): a stronger baseline
baseline_tuned      as baseline_preloaded, and the cell of non-periodic structures is zeroed
                    first (ASE bins the declared box: 3BPA declares 50 Å around each molecule)
ours_single         ``lamm-ds ingest`` once (not timed, into a temp dir), then ``LmdbDataset`` +
                    ``GraphDataset`` (LMDB read, record decode, vesin graph) in this process
ours_loader         the same ``GraphDataset`` through a torch ``DataLoader`` with 2 workers and
                    ``lamm_ds.graphs.collate`` (batches of 32, persistent workers)

Datasets: ``../shared/data/3bpa/train_300K.xyz`` (500 molecules of 27 atoms, non-periodic) and the
periodic demo set ``demo_metals`` (``make_demo`` into a temp dir). Cutoff 6 Å, max_neighbors 50.
The baselines are slow, so they run on an evenly spaced subset of each dataset; lamm-ds runs on
all of it. Methods alternate in one process for several rounds; figures are medians. Before
timing, the baseline graphs of the subset are compared with ours (``checks`` in the JSON).

    .venv/bin/python bench/data_throughput.py              # 1-2 minutes on 2 cores
    .venv/bin/python bench/data_throughput.py --profile    # + cProfile of baseline and ours_single (stderr)

The last stdout line is one JSON object, ratios first (``A/B`` = structures/s of A over that of
B, i.e. a speed-up), also written to ``bench/results/data_throughput.json``. Without
``../shared/data`` (or ``$LAMM_DS_SHARED_DATA``) the benchmark exits cleanly with a message.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import DATA, RESULTS, load_1min, machine, rotated, skip, timed, write_result

CUTOFF = 6.0
MAX_NEIGHBORS = 50
BATCH_SIZE = 32
LOADER_WORKERS = 2
TARGET = 10.0


# --------------------------------------------------------------------------------------- baseline
def capped_ase_graph(atoms, cutoff: float, max_neighbors: int):
    """ASE neighbour list, then keep the ``max_neighbors`` nearest per centre (ties: j, then shift)."""
    from ase.neighborlist import neighbor_list

    i, j, S, d = neighbor_list("ijSd", atoms, cutoff)
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, d, i))
    i, j, S = i[order], j[order], S[order]
    first = np.searchsorted(i, i, side="left")  # i is sorted: index of each centre's first edge
    keep = np.arange(len(i)) - first < max_neighbors
    return i[keep], j[keep], S[keep]


def naive_item(xyz: str, k: int):
    """What a naive map-style Dataset does per item: parse structure k, label it, build its graph."""
    import ase.io

    atoms = ase.io.read(xyz, index=k)
    labels = (atoms.get_potential_energy(), atoms.get_forces())
    return atoms, labels, capped_ase_graph(atoms, CUTOFF, MAX_NEIGHBORS)


def preloaded_pass(xyz: str, subset: list[int], n_total: int, tuned: bool = False) -> float:
    """Seconds per structure: the whole-file parse spread over all structures + graph on the subset.

    ``tuned``: zero the cell of fully non-periodic structures first. ASE bins the whole declared
    box, and the 3BPA files declare a 50 Å box around a 27-atom molecule, which makes
    ``neighbor_list`` ~70x slower than it need be.
    """
    import ase.io

    t0 = time.perf_counter()
    frames = ase.io.read(xyz, ":")
    parse = (time.perf_counter() - t0) / n_total
    t0 = time.perf_counter()
    for k in subset:
        atoms = frames[k]
        atoms.get_potential_energy(), atoms.get_forces()
        if tuned and not atoms.pbc.any():
            atoms.cell[:] = 0.0  # after reading the labels: the calculator drops them on a change
        capped_ase_graph(atoms, CUTOFF, MAX_NEIGHBORS)
    return parse + (time.perf_counter() - t0) / len(subset)


# --------------------------------------------------------------------------------------- lamm-ds
def ingest_with_cli(xyz: Path, out: Path, name: str) -> None:
    exe = Path(sys.executable).parent / "lamm-ds"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lamm_ds.cli"]
    cmd += ["ingest", str(xyz), "--name", name, "--out", str(out), "--cutoff", str(CUTOFF),
            "--max-neighbors", str(MAX_NEIGHBORS), "--quiet"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def make_demo_metals(root: Path) -> tuple[Path, Path]:
    """The demo sets at their default ``demo_metals`` size, the others shrunk (they are not used)."""
    from lamm_ds.demo import DemoSizes, make_demo

    sizes = DemoSizes()
    small = {f.name: min(getattr(sizes, f.name), 4) for f in dataclasses.fields(sizes) if f.name != "metals"}
    paths = make_demo(root, dataclasses.replace(sizes, **small), cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)
    from lamm_ds.shards import read_manifest

    ds_dir = Path(paths["demo_metals"])
    return ds_dir, Path(read_manifest(ds_dir)["sources"][0])


def compare_graphs(ours: list, base: dict) -> dict:
    """How far the baseline graphs agree with ours, structure by structure.

    ``identical``: same edges in the same order. ``same_edge_set``: same (i, j, shift) set.
    ``same_kept_distances``: the sorted lengths of the kept edges agree to 1e-9 Å, i.e. any
    difference is only which of several equally long edges the ``max_neighbors`` cap kept.
    """
    n_ident = n_set = n_dist = n_pos = 0
    for k, (atoms, _, (bi, bj, bs)) in base.items():
        g = ours[k]
        n_pos += np.array_equal(g.structure.positions, atoms.positions)
        n_ident += (np.array_equal(g.edge_i, bi) and np.array_equal(g.edge_j, bj)
                    and np.array_equal(g.shifts, bs))
        as_set = lambda i, j, s: set(zip(i.tolist(), j.tolist(), map(tuple, s.tolist())))  # noqa: E731
        n_set += as_set(g.edge_i, g.edge_j, g.shifts) == as_set(bi, bj, bs)
        pos, cell = atoms.positions, np.asarray(atoms.cell[:])

        def lengths(i, j, s):
            return np.sort(np.linalg.norm(pos[j] - pos[i] + s @ cell, axis=1))

        a, b = lengths(g.edge_i, g.edge_j, g.shifts), lengths(bi, bj, bs)
        n_dist += a.shape == b.shape and bool(np.allclose(a, b, rtol=0, atol=1e-9))
    n = len(base)
    return {"structures_compared": n, "positions_identical": n_pos, "graphs_identical": n_ident,
            "same_edge_set": n_set, "same_kept_distances": n_dist}


def make_loader(gd):
    from torch.utils.data import DataLoader

    from lamm_ds.graphs import collate

    return DataLoader(gd, batch_size=BATCH_SIZE, shuffle=False, num_workers=LOADER_WORKERS,
                      collate_fn=collate, persistent_workers=True)


# --------------------------------------------------------------------------------------- driver
def profile_top(fn, n: int = 12) -> tuple[str, list]:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).sort_stats("tottime")
    stats.print_stats(n)
    total = stats.total_tt
    top = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in sorted(
            stats.stats.items(), key=lambda kv: -kv[1][2])[:n]:
        top.append({"function": f"{Path(file).name}:{line}({func})", "calls": ncalls,
                    "tottime_share": round(tottime / total, 3), "cumtime_share": round(cumtime / total, 3)})
    return buf.getvalue(), top


def bench_dataset(label: str, xyz: Path, ds_dir: Path, rounds: int, n_base: int, profile: bool) -> dict:
    from lamm_ds.graphs import GraphDataset
    from lamm_ds.shards import LmdbDataset

    xyz = str(xyz)
    ds = LmdbDataset(ds_dir)
    gd = GraphDataset([ds], CUTOFF, MAX_NEIGHBORS)
    n = len(ds)
    subset = sorted(set(np.linspace(0, n - 1, min(n_base, n)).round().astype(int).tolist()))

    # warm-up, correctness check, and the atom / edge counts the rates are computed from
    ours = [gd[k] for k in range(n)]
    base = {k: naive_item(xyz, k) for k in subset}
    checks = compare_graphs(ours, base)
    atoms_all = int(np.sum(ds.natoms))
    edges_all = int(sum(s.num_edges for s in ours))
    atoms_sub = int(sum(ours[k].structure.natoms for k in subset))
    edges_sub = int(sum(ours[k].num_edges for k in subset))
    del ours, base

    loader = make_loader(gd)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    startup = time.perf_counter() - t0
    for _ in it:  # finish the warm-up epoch
        pass

    def run_baseline():
        for k in subset:
            naive_item(xyz, k)

    def run_single():
        for k in range(n):
            gd[k]

    def run_loader():
        seen = sum(batch.num_graphs for batch in loader)
        assert seen == n, (seen, n)

    # seconds per structure, per round
    methods = {
        "baseline": lambda: timed(run_baseline) / len(subset),
        "baseline_preloaded": lambda: preloaded_pass(xyz, subset, n),
        "baseline_tuned": lambda: preloaded_pass(xyz, subset, n, tuned=True),
        "ours_single": lambda: timed(run_single) / n,
        "ours_loader": lambda: timed(run_loader) / n,
    }
    names = list(methods)
    samples = {m: [] for m in names}
    for r in range(rounds):
        for m in rotated(names, r):
            samples[m].append(methods[m]())
    sec = {m: statistics.median(v) for m, v in samples.items()}

    profiles = {}
    if profile:
        for m, fn in [("baseline", run_baseline), ("ours_single", run_single)]:
            text, top = profile_top(fn)
            print(f"\n===== cProfile {label} {m} (sorted by own time) =====\n{text}", file=sys.stderr)
            profiles[m] = top
    del loader

    mean_atoms = {"all": atoms_all / n, "subset": atoms_sub / len(subset)}
    mean_edges = {"all": edges_all / n, "subset": edges_sub / len(subset)}
    rates = {}
    for m, s in sec.items():
        which = "subset" if m.startswith("baseline") else "all"
        rates[m] = {"structures_per_s": round(1.0 / s, 2), "atoms_per_s": round(mean_atoms[which] / s, 1),
                    "edges_per_s": round(mean_edges[which] / s, 1), "ms_per_structure": round(s * 1e3, 4)}

    def ratio(a, b):
        return round(sec[b] / sec[a], 2)

    out = {
        "ratios": {
            "ours_single/baseline": ratio("ours_single", "baseline"),
            "ours_loader/baseline": ratio("ours_loader", "baseline"),
            "ours_single/baseline_preloaded": ratio("ours_single", "baseline_preloaded"),
            "ours_loader/baseline_preloaded": ratio("ours_loader", "baseline_preloaded"),
            "ours_single/baseline_tuned": ratio("ours_single", "baseline_tuned"),
            "ours_loader/baseline_tuned": ratio("ours_loader", "baseline_tuned"),
            # per-atom view, in case the baseline subset's mean size differs from the whole set
            "ours_single/baseline_atoms_per_s": round(rates["ours_single"]["atoms_per_s"]
                                                      / rates["baseline"]["atoms_per_s"], 2),
        },
        "rates": rates,
        "dataset": {"source": xyz, "structures": n, "baseline_subset": len(subset),
                    "mean_atoms": {k: round(v, 2) for k, v in mean_atoms.items()},
                    "mean_edges": {k: round(v, 1) for k, v in mean_edges.items()},
                    "pbc": bool(ds[0].pbc.any())},
        "checks": checks,
        "loader_startup_s": round(startup, 3),
    }
    if profiles:
        out["profile_top_tottime"] = profiles
    ds.close()
    print(f"{label:12s} " + "  ".join(f"{m} {rates[m]['structures_per_s']:9.1f}/s" for m in names)
          + f"  | single x{out['ratios']['ours_single/baseline']}, loader x{out['ratios']['ours_loader/baseline']}",
          file=sys.stderr, flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (median taken)")
    parser.add_argument("--baseline-structures", type=int, default=40,
                        help="size of the evenly spaced subset the (slow) baselines run on")
    parser.add_argument("--profile", action="store_true", help="cProfile baseline and ours_single (to stderr)")
    parser.add_argument("--keep", default=None, help="keep the ingested datasets in this directory")
    args = parser.parse_args(argv)
    bpa = DATA / "3bpa" / "train_300K.xyz"
    if not bpa.is_file():
        skip(f"{bpa} not found: this benchmark needs ../shared/data (the 3BPA DFT set)")

    start = time.perf_counter()
    load_start = load_1min()  # other processes on the machine skew the figures
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lamm-ds-throughput-"))
    try:
        t0 = time.perf_counter()
        if not (tmp / "3bpa").exists():
            ingest_with_cli(bpa, tmp / "3bpa", "3bpa")
        demo_dir, demo_xyz = make_demo_metals(tmp / "demo")
        setup = time.perf_counter() - t0
        results = {
            "3bpa": bench_dataset("3bpa", bpa, tmp / "3bpa", args.rounds, args.baseline_structures, args.profile),
            "demo_metals": bench_dataset("demo_metals", demo_xyz, demo_dir, args.rounds,
                                         args.baseline_structures, args.profile),
        }
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    import ase
    import torch
    import vesin

    result = {
        "ratios": {name: r["ratios"] for name, r in results.items()},
        "target": {"min_speedup": TARGET, "metric": "structures/s of ours over baseline",
                   "met": {f"{name}/{m}": r["ratios"][f"{m}/baseline"] >= TARGET
                           for name, r in results.items() for m in ("ours_single", "ours_loader")},
                   "met_vs_baseline_tuned": {f"{name}/{m}": r["ratios"][f"{m}/baseline_tuned"] >= TARGET
                                             for name, r in results.items() for m in ("ours_single", "ours_loader")}},
        "rates": {name: r["rates"] for name, r in results.items()},
        "datasets": {name: r["dataset"] for name, r in results.items()},
        "checks": {name: r["checks"] for name, r in results.items()},
        "loader_startup_s": {name: r["loader_startup_s"] for name, r in results.items()},
        "loadavg_1min": {"start": load_start, "end": load_1min()},
        **({"profile_top_tottime": {name: r["profile_top_tottime"] for name, r in results.items()}}
           if args.profile else {}),
        "config": {"cutoff": CUTOFF, "max_neighbors": MAX_NEIGHBORS, "backend": "vesin",
                   "loader": {"workers": LOADER_WORKERS, "batch_size": BATCH_SIZE, "collate": "lamm_ds.graphs.collate"},
                   "rounds": args.rounds, "statistic": "median over rounds",
                   "versions": {"ase": ase.__version__, "vesin": getattr(vesin, "__version__", "?"),
                                "torch": torch.__version__, "numpy": np.__version__,
                                "python": platform.python_version()},
                   "cpus": os.cpu_count(), "setup_s": round(setup, 1),
                   "wall_s": round(time.perf_counter() - start, 1)},
        "machine": machine(),
    }
    write_result(result, RESULTS / "data_throughput.json")
    return result


if __name__ == "__main__":
    main()
