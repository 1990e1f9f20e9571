"""The data path at 10^5-10^7 samples over 10 datasets (10^8 as index-only arrays): ingest rate, bytes
per sample, memory and time to open the mixture, per-step cost of the mixture and planners, loading.

Sections (each figure measured here, in this run):

ingest      ``lamm-ds ingest`` (the library call, verification included, as the CLI runs it) of real
            structures: 3BPA molecules (27 atoms) as extxyz and in the ANI-1x HDF5 layout, and mlearn
            Si cells (63 atoms, periodic) as extxyz; 1 and 2 workers; structures/s and per core.
            ``read_only`` = the same source just parsed (no graph, no write): the reader's own ceiling.
            ``fairchem`` = fairchem-core 1.x's ``AtomsToGraphs`` (neighbours via pymatgen, as its
            preprocessing does with ``r_edges``) + pickled records into one LMDB, one process, on
            the same structures, when fairchem-core<2 is importable (``--fairchem-path``).
            Loading: random-access decode of stored records, ours vs fairchem's pickled ``Data``.
scale       synthetic datasets of N = 10^5, 10^6, 10^7 samples: 10 datasets of sizes halving from the
            largest, each filled with randomly rotated copies of one real ingested set (3BPA, acac,
            mlearn Si/Mo, the demo metals): a rigid rotation keeps every distance, so energies, the
            stored edge counts and the labels stay exact. Written with the shard writer itself
            (2 processes), reused on a rerun with the same N and seed. Then, in a fresh process per N
            with the page cache dropped when allowed (``cold``): time to open the 10 datasets + the
            mixture stream; resident memory (VmRSS, and its anonymous part) after opening and after
            planning; the mixture's cost per step (``fixed``'s plan = draws + stored sizes) and the
            ``balanced`` planner's at 64 / 512 / 4096 ranks x 2 samples (window 32 steps, the
            default), each window planned twice from a fresh scheduler: ``first_touch`` reads the
            index pages its draws hit (from disk after the cold open), the second pass finds them
            cached (the planner's own cost); DataLoader structures/s (graphs built in the workers)
            with 0 and 2 workers.
index_only  10^8 samples as the per-sample index arrays only (natoms, nedges, label flags), the
            arrays the mixture and planners read: open, memory, planning as above.

    .venv/bin/python bench/data_scale.py                         # ~25 GB in runs/data_scale, ~30 min here
    .venv/bin/python bench/data_scale.py --scales 1e5 --index-only 1e6 --quick   # a quick check
    .venv/bin/python bench/data_scale.py --fairchem-path /path/to/site   # fairchem-core<2 + torch_geometric + pymatgen

The last stdout line is one JSON object, ratios first, also written to bench/results/data_scale.json.
Without ``../shared/data`` (or ``$LAMM_DS_SHARED_DATA``) the benchmark exits cleanly with a message.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import DATA, REPO, RESULTS, fairchem_core_modules, load_1min, machine, rotated, skip, write_result

sys.path.insert(0, str(REPO))

CUTOFF, MAX_NEIGHBORS = 6.0, 50
DATASETS = 10
WINDOW = 32
RANKS = (64, 512, 4096)
PER_RANK = 2
TARGETS = {"ingest_structures_per_s_per_core": 2000, "index_rss_gb_at_1e8": 2.0, "open_s_at_1e8": 5.0,
           "balanced_ms_per_step_4096x2": 20.0}


# ------------------------------------------------------------------------------------------ helpers
def status_mb() -> dict:
    """Resident memory of this process from /proc/self/status (MB): total, anonymous, file-backed."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def drop_caches() -> bool:
    """Drop the page cache (needs root); False where not allowed, then 'open' is a warm open."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ingest_into(sources: list[str], out: Path, workers: int, fmt: str = "auto") -> float:
    from lamm_ds.ingest.pipeline import IngestOptions, ingest
    from lamm_ds.shards.format import GraphSettings

    opts = IngestOptions(name="bench", workers=workers, force=True, progress=False, format=fmt,
                         graph=GraphSettings(cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS))
    t0 = time.perf_counter()
    ingest(sources, out, opts)
    return time.perf_counter() - t0


def read_only(source: str, fmt: str) -> float:
    from lamm_ds.ingest.pipeline import IngestOptions, _all_structures
    from lamm_ds.ingest.readers import expand_inputs

    opts = IngestOptions(name="bench", format=fmt, progress=False)
    t0 = time.perf_counter()
    for _ in _all_structures(expand_inputs([source]), opts, [0]):
        pass
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ sources
def real_sets() -> dict[str, list]:
    import ase.io

    return {"3bpa": ase.io.read(DATA / "3bpa" / "train_mixedT.xyz", ":"),
            "acac": ase.io.read(DATA / "acac" / "train_300K.xyz", ":"),
            "si": ase.io.read(DATA / "mlearn" / "Si" / "training.xyz", ":"),
            "mo": ase.io.read(DATA / "mlearn" / "Mo" / "training.xyz", ":")}


def write_sources(work: Path, sets: dict, n_mol: int, n_si: int) -> dict[str, tuple[str, str, int]]:
    """Ingest sources: name -> (path, --format, structures)."""
    import ase.io
    import h5py
    from ase.units import Hartree

    work.mkdir(parents=True, exist_ok=True)
    mols = [sets["3bpa"][k % len(sets["3bpa"])] for k in range(n_mol)]
    sis = [sets["si"][k % len(sets["si"])] for k in range(n_si)]
    out = {"3bpa_extxyz": (work / "mol.xyz", "auto", len(mols)), "si_extxyz": (work / "si.xyz", "auto", len(sis)),
           "3bpa_ani1x_hdf5": (work / "mol_ani1x.h5", "ani1x", len(mols))}
    if not out["3bpa_extxyz"][0].exists():
        ase.io.write(out["3bpa_extxyz"][0], mols)
    if not out["si_extxyz"][0].exists():
        ase.io.write(out["si_extxyz"][0], sis)
    h5 = out["3bpa_ani1x_hdf5"][0]
    if not h5.exists():
        with h5py.File(h5, "w") as f:  # ANI-1x: one group per formula, conformers stacked, Hartree
            g = f.create_group("C17H20N4O2")
            g["atomic_numbers"] = mols[0].numbers
            g["coordinates"] = np.stack([a.positions for a in mols])
            g["wb97x_dz.energy"] = np.array([a.get_potential_energy() for a in mols]) / Hartree
            g["wb97x_dz.forces"] = np.stack([a.get_forces() for a in mols]) / Hartree
    return {k: (str(p), fmt, n) for k, (p, fmt, n) in out.items()}


# ------------------------------------------------------------------------------------------ fairchem
def load_atoms_to_graphs(extra_path: str | None):
    """fairchem-core 1.x's AtomsToGraphs (its package __init__ bypassed, torch_scatter stood in for:
    ``_common.fairchem_core_modules``); None when not importable."""
    if extra_path:
        for p in extra_path.split(os.pathsep):
            if p not in sys.path:
                sys.path.append(p)  # after our site-packages: never shadows numpy/torch
    if not fairchem_core_modules(os.path.join("preprocessing", "atoms_to_graphs.py"), ("common", "preprocessing")):
        return None
    try:
        from fairchem.core.preprocessing.atoms_to_graphs import AtomsToGraphs
        import pymatgen.io.ase  # noqa: F401  (r_edges needs it)
    except Exception as exc:  # noqa: BLE001 - an optional baseline: say why and go on
        print(f"fairchem baseline unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return AtomsToGraphs


def fairchem_ingest(a2g_cls, source: str, out: Path) -> float:
    """fairchem 1.x preprocessing of an extxyz: read, AtomsToGraphs with edges, pickled Data into LMDB
    (its preprocess script's layout: keys str(index), a 'length' entry)."""
    import ase.io
    import lmdb

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    atoms = ase.io.read(source, ":")
    a2g = a2g_cls(max_neigh=MAX_NEIGHBORS, radius=CUTOFF, r_energy=True, r_forces=True, r_distances=False,
                  r_edges=True, r_fixed=True, r_pbc=True)
    env = lmdb.open(str(out / "data.lmdb"), map_size=1 << 36, subdir=False, meminit=False, map_async=True)
    txn = env.begin(write=True)
    for k, a in enumerate(atoms):
        data = a2g.convert(a)
        data.sid, data.fid = k, 0
        txn.put(f"{k}".encode("ascii"), pickle.dumps(data, protocol=-1))
    txn.put(b"length", pickle.dumps(len(atoms), protocol=-1))
    txn.commit()
    env.sync()
    env.close()
    return time.perf_counter() - t0


def fairchem_load(path: Path, picks: np.ndarray) -> float:
    import lmdb

    env = lmdb.open(str(path / "data.lmdb"), subdir=False, readonly=True, lock=False, readahead=False)
    t0 = time.perf_counter()
    with env.begin() as txn:
        for k in picks.tolist():
            pickle.loads(txn.get(f"{k}".encode("ascii")))  # our own file, written above
    dt = time.perf_counter() - t0
    env.close()
    return dt


def ours_load(path: Path, picks: np.ndarray) -> float:
    from lamm_ds.shards import LmdbDataset

    ds = LmdbDataset(path)
    t0 = time.perf_counter()
    for k in picks.tolist():
        ds[k]
    dt = time.perf_counter() - t0
    ds.close()
    return dt


def ingest_section(args, work: Path, sets: dict) -> dict:
    sources = write_sources(work / "ingest", sets, args.ingest_molecules, args.ingest_cells)
    a2g = load_atoms_to_graphs(args.fairchem_path)
    cpus = len(os.sched_getaffinity(0))
    methods = [(name, w) for name in sources for w in (1, 2)]
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name, w in rotated(methods, r):
            path, fmt, _ = sources[name]
            times.setdefault(f"{name}/workers{w}", []).append(ingest_into([path], work / "ingest" / f"out_{name}", w, fmt))
        for name, (path, fmt, _) in rotated(list(sources.items()), r):
            times.setdefault(f"{name}/read_only", []).append(read_only(path, fmt))
        if a2g is not None:
            for name in ("3bpa_extxyz", "si_extxyz"):
                times.setdefault(f"{name}/fairchem", []).append(
                    fairchem_ingest(a2g, sources[name][0], work / "ingest" / f"fc_{name}"))
    out = {}
    for key, ts in times.items():
        name, method = key.split("/")
        n = sources[name][2]
        rate = n / statistics.median(ts)
        cores = 1 if method in ("workers1", "read_only", "fairchem") else min(cpus, 2)
        out[key] = {"structures_per_s": round(rate, 1), "per_core": round(rate / cores, 1), "cores": cores,
                    "structures": n, "seconds": [round(t, 3) for t in ts]}
    # loading: random decode of stored records
    picks = np.random.default_rng(0).integers(0, args.ingest_molecules, args.load_samples)
    loads: dict[str, list[float]] = {}
    for r in range(args.rounds):
        loads.setdefault("ours", []).append(ours_load(work / "ingest" / "out_3bpa_extxyz", picks))
        if a2g is not None:
            loads.setdefault("fairchem", []).append(fairchem_load(work / "ingest" / "fc_3bpa_extxyz", picks))
    out["load_3bpa"] = {k: {"records_per_s": round(len(picks) / statistics.median(v), 1)} for k, v in loads.items()}
    out["bytes_per_sample"] = {"ours_3bpa": round(dir_bytes(work / "ingest" / "out_3bpa_extxyz") / args.ingest_molecules, 1)}
    if a2g is not None:
        out["bytes_per_sample"]["fairchem_3bpa"] = round(
            dir_bytes(work / "ingest" / "fc_3bpa_extxyz") / args.ingest_molecules, 1)
    out["fairchem_available"] = a2g is not None
    return out


# ------------------------------------------------------------------------------------------ synthetic scale
def dataset_sizes(total: int, k: int = DATASETS) -> list[int]:
    """Sizes halving from the largest (a heavy-tailed mix like LaMM's), summing exactly to ``total``."""
    w = 0.5 ** np.arange(k)
    sizes = np.floor(total * w / w.sum()).astype(np.int64)
    sizes[0] += total - sizes.sum()
    return [int(s) for s in sizes]


def random_rotations(rng, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q *= np.sign(np.einsum("nii->ni", r))[:, None, :]
    q[np.linalg.det(q) < 0, :, 0] *= -1  # proper rotations
    return q


def _write_synthetic(job) -> tuple[str, int, float]:
    pool_dir, out, n, seed, name = job
    from lamm_ds.shards import LmdbDataset
    from lamm_ds.shards.format import DatasetWriter
    from lamm_ds.structure import Structure, encode

    src = LmdbDataset(pool_dir)
    pool = [src[k] for k in range(len(src))]
    pool_edges = np.asarray(src.nedges)
    rng = np.random.default_rng(seed)
    rots = random_rotations(rng, 4096)
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    writer = DatasetWriter(tmp, shard_size=100_000)
    t0 = time.perf_counter()
    picks = rng.integers(0, len(pool), n)
    rot_ids = rng.integers(0, len(rots), n)
    for c, (k, q) in enumerate(zip(picks.tolist(), rot_ids.tolist())):
        s, R = pool[k], rots[q]
        t = Structure(numbers=s.numbers, positions=s.positions @ R.T, cell=s.cell @ R.T, pbc=s.pbc, energy=s.energy,
                      forces=None if s.forces is None else s.forces @ R.T,
                      stress=None if s.stress is None else R @ s.stress @ R.T,
                      source=f"synthetic:{src.name}", source_index=c)
        writer.add(encode(t), t.numbers, int(pool_edges[k]), t.energy is not None, t.forces is not None,
                   t.stress is not None)
    writer.finalize({"name": name, "level_of_theory": f"synthetic copies of {src.name}",
                     "sources": [str(pool_dir)], "graph": src.manifest["graph"],
                     "ingest": {"structures_read": n, "max_atoms": None, "dropped": 0, "dropped_by_reason": {},
                                "synthetic": "randomly rotated copies; nedges copied (rotation-invariant)"}})
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return name, n, time.perf_counter() - t0


def pools(work: Path, sets: dict) -> list[Path]:
    """Real sets ingested once (the sources of the synthetic datasets)."""
    import ase.io
    from lamm_ds.demo import make_demo

    out = []
    for name, atoms in sets.items():
        d = work / "pools" / name
        if not d.exists():
            src = work / "pools" / f"{name}.xyz"
            src.parent.mkdir(parents=True, exist_ok=True)
            ase.io.write(src, atoms)
            ingest_into([str(src)], d, 1)
        out.append(d)
    demo = make_demo(work / "pools" / "demo", cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)
    out.extend(Path(p) for p in demo.values())
    return out


def build_scale(work: Path, pool_dirs: list[Path], total: int, seed: int, processes: int) -> dict:
    root = work / f"scale_{total:.0e}".replace("+", "")
    stamp = root / "build.json"
    sizes = dataset_sizes(total)
    want = {"total": total, "sizes": sizes, "seed": seed, "pools": [p.name for p in pool_dirs]}
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == want:
        return json.loads(stamp.read_text())
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    jobs = [(str(pool_dirs[k % len(pool_dirs)]), str(root / f"ds{k:02d}"), n, seed * 1000 + k, f"ds{k:02d}")
            for k, n in enumerate(sizes)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        done = pool.map(_write_synthetic, jobs, chunksize=1)
    wall = time.perf_counter() - t0
    cpu = sum(d[2] for d in done)
    record = {"spec": want, "root": str(root), "datasets": [j[1] for j in jobs], "write_wall_s": round(wall, 1),
              "write_samples_per_s_per_process": round(total / cpu, 1),
              "bytes_per_sample": round(dir_bytes(root) / total, 1)}
    stamp.write_text(json.dumps(record, indent=1))
    return record


def build_index_only(work: Path, pool_dirs: list[Path], total: int, seed: int) -> dict:
    """Per-sample index arrays only (no records), natoms/nedges drawn from the real pools."""
    from lamm_ds.shards import LmdbDataset

    root = work / f"index_{total:.0e}".replace("+", "")
    stamp = root / "build.json"
    sizes = dataset_sizes(total)
    want = {"total": total, "sizes": sizes, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == want:
        return json.loads(stamp.read_text())
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    dirs = []
    for k, n in enumerate(sizes):
        src = LmdbDataset(pool_dirs[k % len(pool_dirs)])
        d = root / f"ds{k:02d}"
        d.mkdir(parents=True)
        arrays = {name: np.lib.format.open_memmap(d / f"{name}.npy", mode="w+", dtype=dtype, shape=(n,))
                  for name, dtype in (("natoms", np.int32), ("nedges", np.int32), ("has_energy", np.bool_),
                                      ("has_forces", np.bool_))}
        for a in range(0, n, 10_000_000):
            b = min(n, a + 10_000_000)
            pick = rng.integers(0, len(src), b - a)
            arrays["natoms"][a:b] = np.asarray(src.natoms)[pick]
            arrays["nedges"][a:b] = np.asarray(src.nedges)[pick]
            arrays["has_energy"][a:b] = np.asarray(src.index["has_energy"])[pick]
            arrays["has_forces"][a:b] = np.asarray(src.index["has_forces"])[pick]
        for arr in arrays.values():
            arr.flush()
        del arrays
        dirs.append(str(d))
    record = {"spec": want, "root": str(root), "datasets": dirs,
              "bytes_per_sample": round(dir_bytes(root) / total, 2)}
    stamp.write_text(json.dumps(record, indent=1))
    return record


# ------------------------------------------------------------------------------------------ probe (child)
def probe(dirs: list[str], index_only: bool, ranks: list[int], loader_steps: int, cold: bool) -> dict:
    """Runs in a fresh process: open, memory, per-step planning cost, loader throughput."""
    from lamm_ds.mixture import MixtureStream
    from lamm_ds.scheduler import StepScheduler
    from lamm_ds.scheduler.defaults import builtin_cost_model
    from lamm_ds.shards import LmdbDataset

    res = {"cold_open": drop_caches() if cold else False, "rss_mb_before_open": status_mb()}
    t0 = time.perf_counter()
    if index_only:
        natoms = [np.load(Path(d) / "natoms.npy", mmap_mode="r") for d in dirs]
        nedges = [np.load(Path(d) / "nedges.npy", mmap_mode="r") for d in dirs]
        sizes = [len(a) for a in natoms]
        datasets = None
    else:
        datasets = [LmdbDataset(d) for d in dirs]
        natoms, nedges = [d.natoms for d in datasets], [d.nedges for d in datasets]
        sizes = [len(d) for d in datasets]
    stream = MixtureStream(sizes, temperature=2.0, seed=0)
    stream.epoch(0)
    res["open_s"] = round(time.perf_counter() - t0, 4)
    res["samples"] = int(sum(sizes))
    res["rss_mb_after_open"] = status_mb()
    cost = builtin_cost_model()
    # steps far into the epoch, so the draws touch index pages all over the files
    first = 1000
    # each plan twice, from a fresh scheduler: the first pass reads the index pages its draws touch
    # (from disk after a cold open), the second finds them in the page cache: the planner's own cost
    first_touch, per_step = {}, {}
    configs = [(R, strategy) for R in ranks for strategy in ("fixed", "balanced")]
    for c, (R, strategy) in enumerate(configs):
        # disjoint stream positions per configuration (the largest window holds WINDOW x 8192 draws)
        start = (first + c) * WINDOW * 8192 // (PER_RANK * R)
        start -= start % WINDOW
        for passes in (first_touch, per_step):
            sched = StepScheduler(stream, PER_RANK * R, R, strategy, cost, natoms, nedges, window_steps=WINDOW)
            t1 = time.perf_counter()
            for s in range(start, start + WINDOW):
                sched.plan(s)
            passes[f"{strategy}/{R}x{PER_RANK}"] = round((time.perf_counter() - t1) / WINDOW * 1e3, 3)
    res["plan_ms_per_step"] = per_step
    res["plan_ms_per_step_first_touch"] = first_touch
    res["rss_mb_after_planning"] = status_mb()
    if datasets is not None and loader_steps:
        from lamm_ds.engine.data import step_loader
        from lamm_ds.graphs import GraphDataset

        graphs = GraphDataset(datasets, CUTOFF, MAX_NEIGHBORS)
        sched = StepScheduler(stream, 32, 1, "fixed")
        loader = {}
        for workers in (0, 2):
            it = iter(step_loader(graphs, sched, 0, 1, first, first + loader_steps + 4, workers))
            for _ in range(4):  # warm-up: worker start, first pages
                next(it)
            t1 = time.perf_counter()
            n = 0
            for _, batch, _ in it:
                n += int(batch.num_graphs)
            loader[f"workers{workers}"] = round(n / (time.perf_counter() - t1), 1)
        res["loader_structures_per_s"] = loader
        res["rss_mb_after_loading"] = status_mb()
    return res


def run_probe(dirs: list[str], index_only: bool, ranks, loader_steps: int, cold: bool) -> dict:
    cmd = [sys.executable, __file__, "--probe", json.dumps({"dirs": dirs, "index_only": index_only,
                                                             "ranks": list(ranks), "loader_steps": loader_steps,
                                                             "cold": cold})]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"probe failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main
def parse_scale(text: str) -> int:
    return int(float(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=parse_scale, nargs="+", default=[10**5, 10**6, 10**7])
    ap.add_argument("--index-only", type=parse_scale, default=10**8, help="samples of the index-only scale (0: skip)")
    ap.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "data_scale"))
    ap.add_argument("--processes", type=int, default=2, help="writers of the synthetic datasets")
    ap.add_argument("--ingest-molecules", type=int, default=30_000)
    ap.add_argument("--ingest-cells", type=int, default=30_000)
    ap.add_argument("--load-samples", type=int, default=5_000)
    ap.add_argument("--loader-steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fairchem-path", default=os.environ.get("LAMM_DS_FAIRCHEM_PATH"),
                    help="extra import path(s) holding fairchem-core<2, torch_geometric, pymatgen")
    ap.add_argument("--no-cold", action="store_true", help="do not drop the page cache before opening")
    ap.add_argument("--quick", action="store_true", help="small everything (a smoke test)")
    ap.add_argument("--out", default=str(RESULTS / "data_scale.json"))
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        spec = json.loads(args.probe)
        print(json.dumps(probe(spec["dirs"], spec["index_only"], spec["ranks"], spec["loader_steps"], spec["cold"])))
        return
    if not DATA.is_dir():
        skip(f"{DATA} not found (set LAMM_DS_SHARED_DATA)")
    if args.quick:
        args.ingest_molecules, args.ingest_cells, args.load_samples = 600, 200, 500
        args.loader_steps, args.rounds = 8, 1
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    sets = real_sets()
    result: dict = {}
    ingest = ingest_section(args, work, sets)
    pool_dirs = pools(work, sets)
    scales = {}
    for total in args.scales:
        build = build_scale(work, pool_dirs, total, args.seed, args.processes)
        scales[f"{total:.0e}"] = {"build": {k: v for k, v in build.items() if k not in ("datasets", "root")},
                                  **run_probe(build["datasets"], False, args.ranks, args.loader_steps,
                                              not args.no_cold)}
    index_only = None
    if args.index_only:
        build = build_index_only(work, pool_dirs, args.index_only, args.seed)
        index_only = {"build": {k: v for k, v in build.items() if k not in ("datasets", "root")},
                      **run_probe(build["datasets"], True, args.ranks, 0, not args.no_cold)}

    # ratios and target checks first
    fc = ingest.get("3bpa_extxyz/fairchem")
    if fc:
        result["ours_vs_fairchem_ingest_3bpa"] = round(ingest["3bpa_extxyz/workers1"]["structures_per_s"]
                                                       / fc["structures_per_s"], 2)
        result["ours_vs_fairchem_ingest_si"] = round(ingest["si_extxyz/workers1"]["structures_per_s"]
                                                     / ingest["si_extxyz/fairchem"]["structures_per_s"], 2)
        result["ours_vs_fairchem_load_3bpa"] = round(ingest["load_3bpa"]["ours"]["records_per_s"]
                                                     / ingest["load_3bpa"]["fairchem"]["records_per_s"], 2)
    result["ingest_workers2_vs_workers1"] = {
        name: round(ingest[f"{name}/workers2"]["structures_per_s"] / ingest[f"{name}/workers1"]["structures_per_s"], 2)
        for name in ("3bpa_extxyz", "si_extxyz", "3bpa_ani1x_hdf5")}
    keys = sorted(scales)
    if len(keys) >= 2:
        lo, hi = scales[keys[0]], scales[keys[-1]]
        result["growth_largest_vs_smallest"] = {
            "samples": round(hi["samples"] / lo["samples"], 1),
            "open_s": round(hi["open_s"] / max(lo["open_s"], 1e-9), 2),
            "rss_anon_after_open": round(hi["rss_mb_after_open"]["RssAnon"] / lo["rss_mb_after_open"]["RssAnon"], 3),
            "balanced_4096_ms": round(hi["plan_ms_per_step"].get(f"balanced/{max(args.ranks)}x2", np.nan)
                                      / lo["plan_ms_per_step"].get(f"balanced/{max(args.ranks)}x2", np.nan), 2)}
    checks = {"ingest_per_core": {k: v["per_core"] for k, v in ingest.items()
                                  if "/" in k and not k.endswith(("read_only", "fairchem"))},
              "ingest_target": TARGETS["ingest_structures_per_s_per_core"]}
    if index_only:
        checks["index_rss_gb"] = round(index_only["rss_mb_after_planning"]["VmRSS"] / 1024, 3)
        checks["index_rss_anon_gb"] = round(index_only["rss_mb_after_planning"]["RssAnon"] / 1024, 3)
        checks["index_open_s"] = index_only["open_s"]
        checks["balanced_ms_per_step_4096x2"] = index_only["plan_ms_per_step"].get(f"balanced/{max(args.ranks)}x2")
        checks["balanced_ms_per_step_4096x2_first_touch"] = index_only["plan_ms_per_step_first_touch"].get(
            f"balanced/{max(args.ranks)}x2")
        checks["targets"] = TARGETS
    result["checks"] = checks
    result.update({"ingest": ingest, "scales": scales, "index_only": index_only,
                   "settings": {"cutoff": CUTOFF, "max_neighbors": MAX_NEIGHBORS, "datasets": DATASETS,
                                "window_steps": WINDOW, "per_rank": PER_RANK, "rounds": args.rounds,
                                "quick": args.quick},
                   "machine": machine(threads=1), "load_1min_at_end": load_1min(),
                   "wall_s": round(time.time() - started, 1)})
    write_result(result, None if args.quick and args.out == str(RESULTS / "data_scale.json") else args.out)


if __name__ == "__main__":
    main()
