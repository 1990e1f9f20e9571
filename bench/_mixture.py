"""The benchmark mixture of the load-balancing benchmarks (balance_replay, balance_tta, gpu_check):
lamm-ds datasets for training, held-out sets for validation, and the mixture temperature.

Mixtures (``--mixture``):

* ``corpus``          the generated real-chemistry corpus ``data/corpus_small/<subset>`` (``lamm-ds
                      make-corpus``): unlabelled MMFF conformers, GFN2-xTB drug-like and small
                      molecules, EMT slabs (energy+forces and energy-only), GFN1-xTB periodic cells;
                      4-60 atoms, so only mildly heavy-tailed;
* ``corpus+mlearn``   the corpus plus periodic DFT cells of mlearn Si and Mo (``../shared/data/mlearn``,
                      Zuo et al. 2020, PBE) tiled into supercells of 48-300 atoms (a periodic repeat
                      of a cell has exactly the repeated labels: energy x copies, forces tiled), the
                      heavy tail of an OC20-like mixture (slabs up to ~300 atoms next to molecules of 4);
* ``demo``            the embedded demo data of configs/demo.yaml (EMT metal cells of 8-45 atoms,
                      energy-only cells, unlabelled g2 molecules), generated on first use: the mixture
                      of bench/balance_real.py, used when the corpus is missing (e.g. on a GPU machine);
* ``auto`` (default)  ``corpus+mlearn`` when both sources exist, else ``corpus``, else ``demo``.

Sampling is the engine's: ``MixtureStream`` at temperature 2 (p_k ∝ n_k^(1/2), as lamm_ds/mixture).

Held-out sets: every labelled corpus subset loses ``min(60, 5%)`` structures (a seeded choice) to a
validation copy; the training copies hold the rest (records copied byte for byte with their stored
atom/edge counts, no re-ingest); mlearn's own ``test.xyz`` cells, tiled the same way, validate the
supercells. Everything is built once under ``data/balance_mix/<mixture>/`` (``mixture.json`` records
what it was built from) and reused.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from _common import DATA, REPO

sys.path.insert(0, str(REPO))

MIXTURES = ("auto", "corpus", "corpus+mlearn", "demo")
CORPUS = REPO / "data" / "corpus_small"
CORPUS_SUBSETS = ("pubchem3d_mmff", "qmugs_xtb", "t1x_xtb", "oc20_emt", "oc20_emt_energy", "bulk_gfn1")
MLEARN = ("Si", "Mo")
ROOT = REPO / "data" / "balance_mix"
TEMPERATURE = 2.0
VAL_FRACTION, VAL_MAX = 0.05, 60
SUPERCELL_ATOMS = (48, 300)  # log-uniform target sizes of the tiled mlearn cells
BUILD_VERSION = 1


@dataclass
class Mixture:
    name: str
    temperature: float
    train: list[dict]                      # {name, path}: data.datasets entries
    val: list[dict]                        # {name, path, head}: eval_datasets entries
    description: str
    sizes: dict = field(default_factory=dict)  # per training set: structures and atoms min/mean/max

    def config_yaml(self) -> str:
        """A config overlay with these datasets (merged after a model config)."""
        import yaml

        return yaml.safe_dump({"data": {"temperature": self.temperature, "datasets": self.train},
                               "eval_datasets": self.val}, sort_keys=False)

    def record(self) -> dict:
        return asdict(self)


def resolve_name(name: str, corpus: Path = CORPUS, shared: Path = DATA) -> str:
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r}; known: {', '.join(MIXTURES)}")
    if name != "auto":
        return name
    has_corpus = all((corpus / s / "manifest.json").is_file() for s in CORPUS_SUBSETS)
    has_mlearn = all((shared / "mlearn" / el / "training.xyz").is_file() for el in MLEARN)
    return "corpus+mlearn" if has_corpus and has_mlearn else "corpus" if has_corpus else "demo"


def build_mixture(name: str = "auto", root: Path = ROOT, corpus: Path = CORPUS, shared: Path = DATA,
                  progress: bool = True) -> Mixture:
    """The mixture's datasets (built under ``root/<name>`` on first use) and its description."""
    name = resolve_name(name, corpus, shared)
    if name == "demo":
        return _demo_mixture(root)
    out = root / name
    want = {"version": BUILD_VERSION, "corpus": str(corpus.resolve()), "val_fraction": VAL_FRACTION,
            "val_max": VAL_MAX, "supercell_atoms": list(SUPERCELL_ATOMS),
            "mlearn": str((shared / "mlearn").resolve()) if name == "corpus+mlearn" else None}
    rec_file = out / "mixture.json"
    if rec_file.is_file():
        rec = json.loads(rec_file.read_text())
        if rec.get("built_from") == want:
            return Mixture(**rec["mixture"])
    missing = [s for s in CORPUS_SUBSETS if not (corpus / s / "manifest.json").is_file()]
    if missing:
        raise FileNotFoundError(f"mixture {name!r}: corpus subsets {missing} not found under {corpus} "
                                "(make it with `lamm-ds make-corpus`, or use --mixture demo)")
    if out.exists():
        shutil.rmtree(out)
    train, val = [], []
    for sub in CORPUS_SUBSETS:
        t, v = _split_subset(corpus / sub, out, sub, progress)
        train.append(t)
        if v is not None:
            val.append(v)
    desc = ("generated corpus (data/corpus_small: MMFF conformers unlabelled, GFN2-xTB molecules, EMT slabs, "
            "GFN1-xTB periodic cells; 4-60 atoms)")
    if name == "corpus+mlearn":
        for el in MLEARN:
            t, v = _mlearn_supercells(shared / "mlearn" / el, out, el, progress)
            train.append(t)
            val.append(v)
        desc += (" + mlearn Si/Mo PBE cells tiled into periodic supercells of "
                 f"{SUPERCELL_ATOMS[0]}-{SUPERCELL_ATOMS[1]} atoms (heavy tail)")
    mix = Mixture(name, TEMPERATURE, train, val, desc, _sizes(train))
    out.mkdir(parents=True, exist_ok=True)
    rec_file.write_text(json.dumps({"built_from": want, "mixture": mix.record()}, indent=1))
    return mix


def _demo_mixture(root: Path) -> Mixture:
    import os

    from lamm_ds.demo import make_demo

    sets = make_demo(root / "demo", workers=max(1, min(8, (os.cpu_count() or 2) - 1)))
    train = [{"name": n, "path": str(sets[n])} for n in ("demo_metals", "demo_energy", "demo_molecules")]
    val = [{"name": "demo_metals_test", "path": str(sets["demo_metals_test"]), "head": "demo_metals"}]
    return Mixture("demo", TEMPERATURE, train, val,
                   "embedded demo data (configs/demo.yaml: EMT metal cells 8-45 atoms, energy-only cells, "
                   "unlabelled g2 molecules)", _sizes(train))


def _sizes(train: list[dict]) -> dict:
    from lamm_ds.shards import LmdbDataset

    out = {}
    for t in train:
        d = LmdbDataset(t["path"])
        a = np.asarray(d.natoms)
        out[t["name"]] = {"structures": len(d), "atoms_min": int(a.min()), "atoms_mean": round(float(a.mean()), 1),
                          "atoms_max": int(a.max()), "edges_per_atom": round(float(np.asarray(d.nedges).sum() / a.sum()), 1)}
    return out


# ------------------------------------------------------------------------------------ corpus splits
def copy_subset(src, indices, out: Path, name: str | None = None) -> Path:
    """A dataset of the records ``indices`` of ``src`` (bytes and stored counts as they are)."""
    from lamm_ds.shards.format import DatasetWriter

    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    writer = DatasetWriter(tmp)
    idx = src.index
    for i in indices:
        i = int(i)
        writer.add(src.raw(i), src[i].numbers, int(idx["nedges"][i]), bool(idx["has_energy"][i]),
                   bool(idx["has_forces"][i]), bool(idx["has_stress"][i]))
    m = src.manifest
    writer.finalize({"name": name or m["name"], "level_of_theory": m.get("level_of_theory", "unknown"),
                     "sources": [str(src.path)], "graph": m["graph"],
                     "ingest": {"subset_of": str(src.path), "records": len(indices)}})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _split_subset(path: Path, out: Path, name: str, progress: bool) -> tuple[dict, dict | None]:
    from lamm_ds.shards import LmdbDataset

    src = LmdbDataset(path)
    labelled = np.flatnonzero(np.asarray(src.index["has_energy"]) | np.asarray(src.index["has_forces"]))
    if not len(labelled):  # unlabelled (denoising): nothing to validate on, train on all of it
        return {"name": name, "path": str(path)}, None
    n_val = min(VAL_MAX, max(1, round(VAL_FRACTION * len(src))))
    rng = np.random.default_rng([0xBA1A, zlib.crc32(name.encode())])
    val_idx = np.sort(rng.choice(labelled, n_val, replace=False))
    train_idx = np.setdiff1d(np.arange(len(src)), val_idx)
    if progress:
        print(f"mixture: {name}: {len(train_idx)} training / {len(val_idx)} held-out structures", file=sys.stderr)
    t = copy_subset(src, train_idx, out / "train" / name)
    v = copy_subset(src, val_idx, out / "val" / f"{name}_val")
    return {"name": name, "path": str(t)}, {"name": f"{name}_val", "path": str(v), "head": name}


# ------------------------------------------------------------------------------------ mlearn supercells
def supercell_repeats(cell: np.ndarray, natoms: int, target: int, cap: int = SUPERCELL_ATOMS[1]) -> tuple:
    """Repeats (n1, n2, n3) of a periodic cell: grow the shortest repeated lattice vector while the
    supercell stays within ``target`` atoms (and ``cap``), so supercells are compact."""
    reps = [1, 1, 1]
    lengths = np.linalg.norm(cell, axis=1)
    while True:
        i = int(np.argmin([lengths[k] * reps[k] for k in range(3)]))
        grown = natoms * math.prod(reps) // reps[i] * (reps[i] + 1)
        if grown > min(target, cap):
            return tuple(reps)
        reps[i] += 1


def tile_frames(frames, seed: int):
    """Each periodic frame tiled to a log-uniform target size; labels repeated exactly."""
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    lo, hi = SUPERCELL_ATOMS
    out = []
    for a in frames:
        target = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        reps = supercell_repeats(a.cell[:], len(a), target)
        copies = math.prod(reps)
        energy, forces = a.get_potential_energy(), a.get_forces()
        big = a.copy()
        big.calc = None
        big = big.repeat(reps)  # ase tiles atoms image by image, in the order np.tile repeats rows
        big.calc = SinglePointCalculator(big, energy=energy * copies, forces=np.tile(forces, (copies, 1)))
        out.append(big)
    return out


def _mlearn_supercells(src: Path, out: Path, element: str, progress: bool) -> tuple[dict, dict]:
    from ase.io import read, write

    from lamm_ds.ingest import IngestOptions, ingest

    entries = []
    for split, fname, seed in (("train", "training.xyz", 1), ("val", "test.xyz", 2)):
        frames = read(str(src / fname), index=":")
        tiled = tile_frames(frames, seed * 1000 + zlib.crc32(element.encode()) % 1000)
        name = f"mlearn_{element.lower()}_cells"
        xyz = out / "raw" / f"{name}_{split}.xyz"
        xyz.parent.mkdir(parents=True, exist_ok=True)
        write(str(xyz), tiled, format="extxyz")
        ds_name = name if split == "train" else f"{name}_val"
        dest = out / split / ds_name
        ingest([str(xyz)], dest, IngestOptions(name=ds_name, level_of_theory=f"PBE DFT (mlearn {element}), "
                                               "periodic supercells", max_atoms=SUPERCELL_ATOMS[1],
                                               progress=False, force=True))
        sizes = [len(x) for x in tiled]
        if progress:
            print(f"mixture: {ds_name}: {len(tiled)} supercells of {min(sizes)}-{max(sizes)} atoms "
                  f"(mean {np.mean(sizes):.0f})", file=sys.stderr)
        entries.append({"name": ds_name, "path": str(dest)} if split == "train"
                       else {"name": ds_name, "path": str(dest), "head": name})
    return entries[0], entries[1]
