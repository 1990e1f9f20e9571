"""Turn source files into :class:`~lamm_ds.structure.Structure` records.

Supported sources: anything ``ase.io.read`` understands (extxyz, VASP, CIF, trajectories, ...), ASE
databases (``.db``), and fairchem/OCP-style LMDBs of pickled PyG ``Data`` objects (only with
``trust_pickle``, because unpickling runs code chosen by whoever wrote the file).
"""

from __future__ import annotations

import glob
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lamm_ds.structure import Structure

EV_PER_A3 = {"eV/A3": 1.0, "eV/A^3": 1.0, "GPa": 1.0 / 160.21766208, "kbar": 1.0 / 1602.1766208}


class IngestError(ValueError):
    """Bad input; the message names the file (and the structure index where there is one)."""


@dataclass
class LabelKeys:
    """Where labels live in the source. ``None`` means: use the standard key if present."""

    energy: str | None = None
    forces: str | None = None
    stress: str | None = None
    stress_unit: str = "eV/A3"
    allow_missing: bool = False


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files from paths and globs, in sorted order per pattern; each pattern must match something."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if glob.has_magic(pattern) and not matches:
            raise IngestError(f"{pattern}: the pattern matches no file")
        for m in matches:
            if not os.path.exists(m):
                raise IngestError(f"{m}: no such file or directory")
            files.append(Path(m))
    seen, unique = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def source_kind(path: Path) -> str:
    """'fairchem-lmdb', 'ase-db' or 'ase'."""
    if path.is_dir():
        if any(path.glob("*.lmdb")):
            return "fairchem-lmdb"
        raise IngestError(f"{path}: a directory, but not a fairchem LMDB folder (no *.lmdb inside)")
    if path.suffix == ".lmdb":
        return "fairchem-lmdb"
    if path.suffix == ".db":
        return "ase-db"
    return "ase"


def _calc_result(atoms, name):
    calc = atoms.calc
    if calc is None:
        return None
    return calc.results.get(name)


def _label(atoms, key: str | None, standard: str, per_atom: bool, file: str, index: int, allow_missing: bool):
    """Look up a label under ``key`` (info/arrays, then calculator results)."""
    name = key or standard
    value = None
    if per_atom and name in atoms.arrays:
        value = atoms.arrays[name]
    elif not per_atom and name in atoms.info:
        value = atoms.info[name]
    else:
        value = _calc_result(atoms, name)
    if value is None and key is not None and not allow_missing:
        raise IngestError(
            f"{file}: structure {index} has no {standard} under the key {key!r} "
            f"(pass --allow-missing-labels to store such structures without that label)"
        )
    return value


def atoms_to_structure(atoms, file: str, index: int, keys: LabelKeys) -> Structure:
    """Convert one ``ase.Atoms`` with its labels; keeps remaining scalar ``info`` entries."""
    from ase.constraints import FixAtoms

    energy = _label(atoms, keys.energy, "energy", False, file, index, keys.allow_missing)
    forces = _label(atoms, keys.forces, "forces", True, file, index, keys.allow_missing)
    stress = _label(atoms, keys.stress, "stress", False, file, index, keys.allow_missing)
    if stress is not None:
        if keys.stress_unit not in EV_PER_A3:
            raise IngestError(f"unknown stress unit {keys.stress_unit!r}; one of {sorted(EV_PER_A3)}")
        stress = np.asarray(stress, dtype=np.float64) * EV_PER_A3[keys.stress_unit]
    fixed = None
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed = np.zeros(len(atoms), dtype=bool) if fixed is None else fixed
            fixed[constraint.index] = True
    tags = atoms.get_tags()
    consumed = {keys.energy, keys.stress, "energy", "stress"}
    info = {k: v for k, v in atoms.info.items() if k not in consumed}
    try:
        return Structure(
            numbers=atoms.numbers, positions=atoms.positions, cell=np.asarray(atoms.cell[:]), pbc=atoms.pbc,
            energy=None if energy is None else float(np.asarray(energy).reshape(())),
            forces=forces, stress=stress, fixed=fixed, tags=tags if np.any(tags) else None,
            source=file, source_index=index, info=info,
        )
    except (ValueError, TypeError) as exc:
        raise IngestError(f"{file}: structure {index}: malformed labels: {exc}") from exc


def iter_ase(path: Path, keys: LabelKeys, index: str = ":") -> Iterator[Structure]:
    import ase.io

    file = str(path)
    count = 0
    try:
        for count, atoms in enumerate(ase.io.iread(file, index=index), start=1):
            yield atoms_to_structure(atoms, file, count - 1, keys)
    except IngestError:
        raise
    except Exception as exc:  # ASE parsers raise many unrelated types on malformed input
        raise IngestError(f"{file}: cannot parse structure {count}: {type(exc).__name__}: {exc}") from exc
    if count == 0:
        raise IngestError(f"{file}: contains no structures (empty or unrecognised file)")


def iter_ase_db(path: Path, keys: LabelKeys) -> Iterator[Structure]:
    import ase.db

    file = str(path)
    try:
        db = ase.db.connect(file, type="db")
        rows = list(db.select())  # ids only stay valid inside a read; rows are light
    except Exception as exc:
        raise IngestError(f"{file}: cannot open as an ASE database: {exc}") from exc
    if not rows:
        raise IngestError(f"{file}: the ASE database holds no rows")
    for row in rows:
        atoms = row.toatoms(add_additional_information=False)
        atoms.info.update(row.key_value_pairs)
        yield atoms_to_structure(atoms, file, int(row.id), keys)


def _fairchem_value(data, *names):
    for name in names:
        value = data.get(name) if isinstance(data, dict) else getattr(data, name, None)
        if value is not None:
            return value
    return None


def _numpy(value):
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def fairchem_data_to_structure(data, file: str, index: int) -> Structure:
    """Map OCP ``Data`` attributes (pos, atomic_numbers, cell, y/energy, force/forces, stress,
    fixed, tags, pbc) onto a Structure; other scalar attributes (sid, fid, ...) go to ``info``."""
    if hasattr(data, "to_dict"):
        fields = data.to_dict()
    elif hasattr(data, "__dict__"):
        fields = {k: v for k, v in vars(data).items() if not k.startswith("_")}
        fields.update(getattr(data, "_store", {}) or {})
    else:
        raise IngestError(f"{file}: key {index}: unpickled a {type(data).__name__}, not a PyG Data object")
    pos = _numpy(_fairchem_value(fields, "pos"))
    numbers = _numpy(_fairchem_value(fields, "atomic_numbers"))
    if pos is None or numbers is None:
        raise IngestError(f"{file}: key {index}: no pos/atomic_numbers in {sorted(fields)}")
    cell = _numpy(_fairchem_value(fields, "cell"))
    pbc = _numpy(_fairchem_value(fields, "pbc"))
    energy = _numpy(_fairchem_value(fields, "energy", "y"))
    known = {"pos", "atomic_numbers", "cell", "pbc", "energy", "y", "force", "forces", "stress", "fixed",
             "tags", "natoms", "edge_index", "cell_offsets", "distances", "neighbors", "offsets"}
    info = {}
    for k, v in fields.items():
        if k in known:
            continue
        arr = _numpy(v)
        if arr is not None and arr.size == 1 and arr.dtype.kind in "biuf":
            info[k] = arr.reshape(()).item()
        elif isinstance(v, (str, int, float, bool)):
            info[k] = v
    return Structure(
        numbers=numbers.astype(np.int64).reshape(-1),
        positions=pos,
        cell=np.zeros((3, 3)) if cell is None else cell.reshape(3, 3),
        pbc=(np.ones(3, bool) if cell is not None and np.abs(cell).sum() > 0 else np.zeros(3, bool))
        if pbc is None else pbc.reshape(-1).astype(bool),
        energy=None if energy is None else float(energy.reshape(-1)[0]),
        forces=_numpy(_fairchem_value(fields, "forces", "force")),
        stress=_numpy(_fairchem_value(fields, "stress")),
        fixed=_numpy(_fairchem_value(fields, "fixed")),
        tags=_numpy(_fairchem_value(fields, "tags")),
        source=file, source_index=index, info=info,
    )


def iter_fairchem_lmdb(path: Path, trust_pickle: bool) -> Iterator[Structure]:
    import lmdb

    if not trust_pickle:
        raise IngestError(
            f"{path}: a fairchem/OCP LMDB stores pickled Python objects, and reading them can run "
            "arbitrary code. Pass --trust-pickle only if you trust where the file came from."
        )
    files = sorted(path.glob("*.lmdb")) if path.is_dir() else [path]
    for file in files:
        try:
            env = lmdb.open(str(file), subdir=False, readonly=True, lock=False, readahead=False)
        except lmdb.Error as exc:
            raise IngestError(f"{file}: cannot open LMDB: {exc}") from exc
        with env.begin() as txn:
            keys = [k for k in txn.cursor().iternext(values=False) if k.isdigit()]
            keys.sort(key=int)
            if not keys:
                raise IngestError(f"{file}: no numbered records (expected keys b'0', b'1', ...)")
            for key in keys:
                try:
                    data = pickle.loads(txn.get(key))  # noqa: S301 - guarded by trust_pickle
                except Exception as exc:
                    raise IngestError(f"{file}: key {key.decode()}: cannot unpickle: {exc}") from exc
                yield fairchem_data_to_structure(data, str(file), int(key))
        env.close()


def iter_source(path: Path, keys: LabelKeys, trust_pickle: bool = False) -> Iterator[Structure]:
    """Structures of one input, in file order."""
    kind = source_kind(path)
    if kind == "fairchem-lmdb":
        return iter_fairchem_lmdb(path, trust_pickle)
    if kind == "ase-db":
        return iter_ase_db(path, keys)
    return iter_ase(path, keys)
