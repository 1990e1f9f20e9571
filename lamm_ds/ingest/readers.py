"""Turn source files into :class:`~lamm_ds.structure.Structure` records.

Supported sources: anything ``ase.io.read`` understands (extxyz, VASP, CIF, trajectories, ...), ASE
databases (``.db``), and fairchem/OCP-style LMDBs of pickled PyG ``Data`` objects (only with
``trust_pickle``, because unpickling runs code chosen by whoever wrote the file).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import pickle
import re
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
    # store every structure without labels, even where the source has some (e.g. force-field
    # energies that are not DFT labels); also accepts a file in which no structure has a label
    unlabelled: bool = False

    def __post_init__(self) -> None:
        if self.unlabelled:
            named = [f"--{k}-key {v}" for k, v in (("energy", self.energy), ("forces", self.forces),
                                                   ("stress", self.stress)) if v is not None]
            if named:
                raise IngestError(f"--unlabelled stores no labels, so it cannot be combined with {', '.join(named)}")
        if self.stress_unit not in EV_PER_A3:
            raise IngestError(f"unknown stress unit {self.stress_unit!r}; one of {sorted(EV_PER_A3)}")


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


def _checked_labels(energy, forces, stress, natoms: int, where: str):
    """Energy as a float, forces as (natoms, 3), stress as 6 or 9 numbers; anything else is an
    IngestError naming ``where`` (file and structure) and the label, not numpy's reshape message."""
    if energy is not None:
        arr = np.asarray(energy)
        if arr.size != 1:
            raise IngestError(f"{where}: the energy has shape {arr.shape}, expected a single number")
        try:
            energy = float(arr.reshape(()))
        except (TypeError, ValueError):
            raise IngestError(f"{where}: the energy is {arr.reshape(()).item()!r}, not a number") from None
    for name, verb, value, ok, expected in (
            ("forces", "have", forces, lambda a: a.shape == (natoms, 3),
             f"({natoms}, 3): one row of 3 components per atom"),
            ("stress", "has", stress, lambda a: a.size in (6, 9), "6 (Voigt) or 9 (3x3) components")):
        if value is None:
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise IngestError(f"{where}: the {name} must be numbers, not dtype {arr.dtype}")
        if not ok(arr):
            raise IngestError(f"{where}: the {name} {verb} shape {arr.shape}, expected {expected}")
    return energy, forces, stress


def atoms_to_structure(atoms, file: str, index: int, keys: LabelKeys) -> Structure:
    """Convert one ``ase.Atoms`` with its labels; keeps remaining scalar ``info`` entries."""
    if keys.unlabelled:
        energy = forces = stress = None
    else:
        energy = _label(atoms, keys.energy, "energy", False, file, index, keys.allow_missing)
        forces = _label(atoms, keys.forces, "forces", True, file, index, keys.allow_missing)
        stress = _label(atoms, keys.stress, "stress", False, file, index, keys.allow_missing)
    energy, forces, stress = _checked_labels(energy, forces, stress, len(atoms), f"{file}: structure {index}")
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64) * EV_PER_A3[keys.stress_unit]
    fixed = None
    if atoms.constraints:  # imported only then: ase.constraints pulls in scipy (~0.3 s per process)
        from ase.constraints import FixAtoms

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
            energy=energy, forces=forces, stress=stress, fixed=fixed, tags=tags if np.any(tags) else None,
            source=file, source_index=index, info=info,
        )
    except (ValueError, TypeError) as exc:
        raise IngestError(f"{file}: structure {index}: malformed labels: {exc}") from exc


_DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # what ase.io opens transparently
_PROPERTIES = re.compile(r'(?:^|\s)properties=(?:"([^"]*)"|(\S+))', re.IGNORECASE)


def is_xyz(path: Path) -> bool:
    """``*.xyz`` / ``*.extxyz``, optionally compressed: the files :func:`xyz_layout_problem` can check."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _DECOMPRESS:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in (".xyz", ".extxyz")


def _show(line: str) -> str:
    text = line.rstrip("\r\n")
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _columns(comment: str) -> tuple[int | None, int | None]:
    """Columns per atom line and the species column, from an extxyz comment line's Properties."""
    m = _PROPERTIES.search(comment)
    if not m:
        return None, None
    fields = (m.group(1) or m.group(2)).split(":")
    if len(fields) % 3:
        return None, None
    ncol, species = 0, None
    for name, kind, count in zip(fields[0::3], fields[1::3], fields[2::3]):
        if not count.isdigit():
            return None, None
        if name.lower() == "species" and kind.upper() == "S":
            species = ncol
        ncol += int(count)
    return ncol, species


def xyz_layout_problem(path: Path, strict: bool = True) -> tuple[str | None, list[int]]:
    """Walk an (ext)xyz file frame by frame (count line, comment line, n atom lines) without ASE.

    Returns ``(problem, starts)``: a message locating the first layout fault (structure index and
    line number), or ``None``; and the 1-based line of every frame's atom-count line seen. ASE scans
    all frame headers before yielding the first structure, so its own errors cannot say which frame
    is broken. ``strict`` also checks the column count of every atom line (against the comment
    line's ``Properties``) and the element symbols.
    """
    from ase.data import atomic_numbers

    opener = _DECOMPRESS.get(Path(path).suffix.lower())
    starts: list[int] = []
    state, frame, n, seen, start, blank = "count", -1, 0, 0, 0, None
    ncol = species = None
    fh = opener(path, "rt", encoding="utf-8", errors="replace") if opener else \
        open(path, encoding="utf-8", errors="replace")
    with fh:
        for lineno, line in enumerate(fh, start=1):
            text = line.strip()
            if state == "count":
                if not text:
                    blank = lineno if blank is None else blank
                    continue
                if frame >= 0 and text.startswith("VEC"):  # plain-xyz lattice vectors after the atoms
                    continue
                if blank is not None:
                    return (f"line {blank} is blank where the atom-count line of structure {frame + 1} was "
                            f"expected, but more lines follow (line {lineno}); ASE stops reading at a blank "
                            "line, so every structure after it would be silently left out: remove the "
                            "blank line"), starts
                frame += 1
                try:
                    n = int(text)
                except ValueError:
                    problem = (f"structure {frame} (line {lineno}): the atom-count line reads {_show(line)}, "
                               "expected an integer")
                    if frame == 0:
                        problem += " (is this an (ext)xyz text file?)"
                    elif len(text.split()) >= 4:
                        problem += (f"; it looks like an atom line: structure {frame - 1} (line {starts[-1]}) "
                                    "may announce fewer atoms than it has")
                    return problem, starts
                if n < 0:
                    return f"structure {frame} (line {lineno}): negative atom count {n}", starts
                starts.append(lineno)
                start, state = lineno, "comment"
            elif state == "comment":
                ncol, species = _columns(line) if strict else (None, None)
                seen, state = 0, ("atoms" if n else "count")
            else:
                done = f"{seen} atom line" + ("s" if seen != 1 else "")
                if not text:
                    return (f"structure {frame} (line {start}) is truncated: {n} atoms announced, line "
                            f"{lineno} after {done} is blank"), starts
                if text.isdigit():
                    return (f"structure {frame} (line {start}) announces {n} atoms, but line {lineno}, after "
                            f"{done}, reads {_show(line)}: the next structure's atom-count line? (the count "
                            "is too large, or atom lines are missing)"), starts
                if strict:
                    tokens = text.split()
                    if (len(tokens) != ncol) if ncol is not None else (len(tokens) < 4):
                        expected = (f"{ncol}, as the comment line's Properties say" if ncol is not None
                                    else "at least 4 (symbol x y z)")
                        return (f"structure {frame} (line {start}): line {lineno} (atom {seen}) has "
                                f"{len(tokens)} columns, expected {expected}"), starts
                    if species is not None and tokens[species].capitalize() not in atomic_numbers:  # as ASE reads it
                        return (f"structure {frame} (line {start}): line {lineno} (atom {seen}): unknown "
                                f"element symbol {tokens[species]!r}"), starts
                seen += 1
                if seen == n:
                    state = "count"
    if state == "comment":
        return (f"structure {frame} (line {start}) is truncated: {n} atoms announced, the file ends "
                "after the atom-count line"), starts
    if state == "atoms":
        return (f"structure {frame} (line {start}) is truncated: {n} atoms announced, the file ends "
                f"after {seen} atom line" + ("s" if seen != 1 else "")), starts
    return None, starts


def _parse_failure(path: Path, count: int, exc: Exception) -> str:
    """The message for an ASE parse error: for (ext)xyz files, locate the bad frame ourselves."""
    from ase.io.formats import UnknownFileTypeError

    file = str(path)
    if isinstance(exc, UnknownFileTypeError):
        if path.is_file() and path.stat().st_size == 0:
            return f"{file}: the file is empty"
        return (f"{file}: cannot tell the file format (ASE: {exc}); extxyz files should be named *.xyz or "
                "*.extxyz, ASE databases *.db, fairchem LMDBs *.lmdb")
    opener = _DECOMPRESS.get(path.suffix.lower())
    if opener is not None:
        try:  # a damaged stream can decompress to garbage before its checksum fails: check it first
            with opener(path, "rb") as fh:
                while fh.read(1 << 20):
                    pass
        except Exception as bad:
            return f"{file}: cannot decompress ({path.suffix} stream damaged?): {type(bad).__name__}: {bad}"
    where = f"structure {count}"
    if isinstance(exc, UnicodeDecodeError) and not is_xyz(path):
        return (f"{file}: cannot parse {where}: not UTF-8 text ({exc.reason}): a binary file, a compressed one "
                "without a .gz/.bz2/.xz suffix, or not a structure file?")
    if is_xyz(path):
        try:
            problem, starts = xyz_layout_problem(path, strict=True)
        except Exception:  # e.g. a corrupt gzip stream: ASE's own message says it
            problem, starts = None, []
        if problem:
            return f"{file}: {problem}"
        if count < len(starts):
            where += f" (line {starts[count]})"
    return f"{file}: cannot parse {where}: {type(exc).__name__}: {exc}"


def iter_ase(path: Path, keys: LabelKeys, index: str = ":") -> Iterator[Structure]:
    import ase.io

    path = Path(path)
    file = str(path)
    count = 0
    try:
        for count, atoms in enumerate(ase.io.iread(file, index=index), start=1):
            yield atoms_to_structure(atoms, file, count - 1, keys)
    except IngestError:
        raise
    except Exception as exc:  # ASE parsers raise many unrelated types on malformed input
        raise IngestError(_parse_failure(path, count, exc)) from exc
    if count == 0:
        raise IngestError(f"{file}: contains no structures (empty or unrecognised file)")
    if index == ":" and is_xyz(path):
        # ASE's extxyz reader stops at the first blank line where a frame should start and drops
        # the rest of the file without a word; make sure it read every frame there is.
        problem, starts = xyz_layout_problem(path, strict=False)
        if problem is None and len(starts) != count:
            problem = f"ASE read {count} structures, but the file holds {len(starts)}"
        if problem is not None:
            raise IngestError(f"{file}: {problem}")


def _row_atoms(row):
    """An ASE db row as ``Atoms``: its key-value pairs go to ``info``, and per-atom arrays kept in the
    row's ``data`` (e.g. ``REF_forces``) to ``arrays``, so that --energy-key / --forces-key find them."""
    atoms = row.toatoms(add_additional_information=False)
    atoms.info.update(row.key_value_pairs)
    try:
        data = row.data
    except AttributeError:
        data = {}
    for k, v in (data or {}).items():
        if k in ("energy", "forces", "stress"):  # the row's own calculator results stay the standard labels
            continue
        arr = np.asarray(v) if isinstance(v, (list, tuple, np.ndarray)) else None
        if arr is not None and arr.ndim >= 1 and arr.shape[0] == len(atoms) and k not in atoms.arrays:
            atoms.new_array(k, arr)
        elif k not in atoms.info and isinstance(v, (int, float, np.integer, np.floating)):
            atoms.info[k] = v
    return atoms


def _ase_db_rows(file: str, limit: int | None = None) -> list:
    import ase.db

    if os.path.getsize(file) == 0:  # sqlite would happily turn it into an empty database
        raise IngestError(f"{file}: the file is empty")
    try:
        db = ase.db.connect(file, type="db")
        # ids only stay valid inside a read; rows are light
        rows = list(db.select(limit=limit)) if limit else list(db.select())
    except Exception as exc:
        raise IngestError(f"{file}: cannot open as an ASE database: {exc}") from exc
    return rows


def iter_ase_db(path: Path, keys: LabelKeys) -> Iterator[Structure]:
    file = str(path)
    rows = _ase_db_rows(file)
    if not rows:
        raise IngestError(f"{file}: the ASE database holds no rows")
    for row in rows:
        yield atoms_to_structure(_row_atoms(row), file, int(row.id), keys)


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


def _fairchem_fields(data, file: str, index: int) -> dict:
    if hasattr(data, "to_dict"):
        return data.to_dict()
    if hasattr(data, "__dict__"):
        fields = {k: v for k, v in vars(data).items() if not k.startswith("_")}
        fields.update(getattr(data, "_store", {}) or {})
        return fields
    raise IngestError(f"{file}: key {index}: unpickled a {type(data).__name__}, not a PyG Data object")


_FAIRCHEM_KNOWN = {"pos", "atomic_numbers", "cell", "pbc", "energy", "y", "force", "forces", "stress", "fixed",
                   "tags", "natoms", "edge_index", "cell_offsets", "distances", "neighbors", "offsets"}


def fairchem_data_to_structure(data, file: str, index: int, keys: LabelKeys | None = None) -> Structure:
    """Map OCP ``Data`` attributes (pos, atomic_numbers, cell, y/energy, force/forces, stress,
    fixed, tags, pbc) onto a Structure; other scalar attributes (sid, fid, ...) go to ``info``.

    ``keys`` name other label attributes (``--energy-key y_relaxed``), apply ``--stress-unit``,
    ``--allow-missing-labels`` and ``--unlabelled`` as for ASE input."""
    keys = keys or LabelKeys()
    where = f"{file}: key {index}"
    fields = _fairchem_fields(data, file, index)
    pos = _numpy(_fairchem_value(fields, "pos"))
    numbers = _numpy(_fairchem_value(fields, "atomic_numbers"))
    if pos is None or numbers is None:
        raise IngestError(f"{where}: no pos/atomic_numbers in {sorted(fields)}")
    numbers = numbers.reshape(-1)
    if pos.shape != (len(numbers), 3):
        raise IngestError(f"{where}: pos has shape {pos.shape}, expected ({len(numbers)}, 3) for "
                          f"{len(numbers)} atomic_numbers")
    cell = _numpy(_fairchem_value(fields, "cell"))
    pbc = _numpy(_fairchem_value(fields, "pbc"))

    def label(key, standard, what):
        if keys.unlabelled:
            return None
        value = _numpy(_fairchem_value(fields, *((key,) if key else standard)))
        if value is None and key is not None and not keys.allow_missing:
            raise IngestError(f"{where} has no {what} under the attribute {key!r} (pass --allow-missing-labels "
                              "to store such structures without that label)")
        return value

    energy, forces, stress = _checked_labels(label(keys.energy, ("energy", "y"), "energy"),
                                             label(keys.forces, ("forces", "force"), "forces"),
                                             label(keys.stress, ("stress",), "stress"), len(numbers), where)
    if stress is not None:
        stress = np.asarray(stress, dtype=np.float64) * EV_PER_A3[keys.stress_unit]
    consumed = _FAIRCHEM_KNOWN | {keys.energy, keys.forces, keys.stress}
    info = {}
    for k, v in fields.items():
        if k in consumed:
            continue
        arr = _numpy(v)
        if arr is not None and arr.size == 1 and arr.dtype.kind in "biuf":
            info[k] = arr.reshape(()).item()
        elif isinstance(v, (str, int, float, bool)):
            info[k] = v
    try:
        return Structure(
            numbers=numbers.astype(np.int64),
            positions=pos,
            cell=np.zeros((3, 3)) if cell is None else cell.reshape(3, 3),
            pbc=(np.ones(3, bool) if cell is not None and np.abs(cell).sum() > 0 else np.zeros(3, bool))
            if pbc is None else pbc.reshape(-1).astype(bool),
            energy=energy, forces=forces, stress=stress,
            fixed=_numpy(_fairchem_value(fields, "fixed")),
            tags=_numpy(_fairchem_value(fields, "tags")),
            source=file, source_index=index, info=info,
        )
    except (ValueError, TypeError) as exc:
        raise IngestError(f"{where}: malformed record: {exc}") from exc


def _fairchem_records(file: Path, limit: int | None = None) -> Iterator[tuple[int, object]]:
    """(key, unpickled object) of one fairchem LMDB file in key order; only call with trust."""
    import lmdb

    try:
        env = lmdb.open(str(file), subdir=False, readonly=True, lock=False, readahead=False)
    except lmdb.Error as exc:
        raise IngestError(f"{file}: cannot open LMDB: {exc}") from exc
    try:
        with env.begin() as txn:
            keys = [k for k in txn.cursor().iternext(values=False) if k.isdigit()]
            keys.sort(key=int)
            if not keys:
                raise IngestError(f"{file}: no numbered records (expected keys b'0', b'1', ...)")
            for key in keys[:limit]:
                try:
                    data = pickle.loads(txn.get(key))  # noqa: S301 - guarded by trust_pickle
                except Exception as exc:
                    raise IngestError(f"{file}: key {key.decode()}: cannot unpickle: {exc}") from exc
                yield int(key), data
    finally:
        env.close()


def iter_fairchem_lmdb(path: Path, trust_pickle: bool, keys: LabelKeys | None = None) -> Iterator[Structure]:
    if not trust_pickle:
        raise IngestError(
            f"{path}: a fairchem/OCP LMDB stores pickled Python objects, and reading them can run "
            "arbitrary code. Pass --trust-pickle only if you trust where the file came from."
        )
    files = sorted(path.glob("*.lmdb")) if path.is_dir() else [path]
    for file in files:
        for key, data in _fairchem_records(file):
            yield fairchem_data_to_structure(data, str(file), key, keys)


# ------------------------------------------------------------------ keys that look like labels

# per-atom (n, 3) arrays and scalars that are never labels
_NOT_LABELS = {"numbers", "positions", "momenta", "velocities", "vel", "velo", "masses", "initial_magmoms",
               "initial_charges", "magmoms", "charges", "tags", "pos", "pos_relaxed", "atomic_numbers", "cell",
               "pbc", "natoms", "fixed", "cell_offsets", "edge_index", "distances", "neighbors", "offsets",
               "sid", "fid", "energy", "forces", "stress"}


def _kind_of(name: str, value, natoms: int, where: str) -> str | None:
    """'energy', 'forces' or 'stress' if ``value`` is shaped like that label, else None. Per-atom
    ``arrays`` can only hold forces, ``info`` only energies and stresses."""
    if name in _NOT_LABELS or isinstance(value, (str, bytes, bool, np.bool_)):
        return None
    try:
        arr = _numpy(value)
    except Exception:
        return None
    if arr is None or arr.dtype.kind not in "iuf":
        return None
    if where != "arrays" and arr.size == 1 and (arr.dtype.kind == "f" or "energ" in name.lower()):
        return "energy"
    if where != "info" and arr.dtype.kind == "f" and arr.shape == (natoms, 3):
        return "forces"
    if where != "arrays" and arr.size in (6, 9) and (arr.ndim == 1 or arr.shape == (3, 3)):
        return "stress"
    return None


def _candidates_of(groups: dict[str, dict], natoms: int, found: dict) -> None:
    for where, values in groups.items():
        for name, value in values.items():
            kind = _kind_of(str(name), value, natoms, where)
            if kind is not None:
                found.setdefault((where, str(name)), kind)


def label_key_candidates(path: Path, trust_pickle: bool = False, limit: int = 5) -> dict[tuple[str, str], str]:
    """Keys of the first ``limit`` structures of ``path`` that are shaped like labels:
    ``{(where, key): kind}`` with ``where`` one of info / arrays / calculator / attribute and kind
    energy / forces / stress. Numeric scalar info keys and calculator results look like energies,
    per-atom float (n, 3) arrays other than positions, momenta, ... like forces, 6 or 9 numbers like
    a stress. Best effort: a source that cannot be re-read gives no candidates."""
    found: dict[tuple[str, str], str] = {}
    path = Path(path)
    try:
        kind = source_kind(path)
        if kind == "fairchem-lmdb":
            if not trust_pickle:
                return found
            for _, data in _fairchem_records(path, limit):
                fields = _fairchem_fields(data, str(path), -1)
                pos = _numpy(_fairchem_value(fields, "pos"))
                _candidates_of({"attribute": fields}, 0 if pos is None else len(pos), found)
            return found
        if kind == "ase-db":
            atoms_list = [_row_atoms(row) for row in _ase_db_rows(str(path), limit)]
        else:
            import ase.io

            atoms_list = list(ase.io.iread(str(path), index=slice(0, limit)))
    except Exception:
        return found
    for atoms in atoms_list:
        calc = atoms.calc.results if atoms.calc is not None else {}
        _candidates_of({"info": atoms.info, "arrays": atoms.arrays, "calculator": calc}, len(atoms), found)
    return found


_LABEL_WORDS = {"energy": "energ", "forces": "force", "stress": "stress"}


def _named_like(found: dict[tuple[str, str], str], kind: str) -> list[tuple[str, str]]:
    """The (where, key) candidates of ``kind`` whose key says so (``REF_forces`` for forces)."""
    return [(where, name) for (where, name), k in found.items() if k == kind and _LABEL_WORDS[kind] in name.lower()]


def unread_label_notes(path: Path, kinds: set[str], trust_pickle: bool = False) -> list[str]:
    """For a file with some labels but no energy (or no forces) under the keys read: a note when a
    key named like the missing label exists ('no structure has forces, but arrays 'REF_forces'
    looks like forces'). An energy-only set is legitimate, so this is a note, not an error."""
    missing = [k for k in ("energy", "forces") if k not in kinds]
    if not missing:
        return []
    found = label_key_candidates(path, trust_pickle)
    notes = []
    for kind in missing:
        named = _named_like(found, kind)
        if named:
            where, name = named[0]
            notes.append(f"{path}: no structure has {kind}, but {where} {name!r} looks like {kind} "
                         f"(pass --{kind}-key {name} to read it)")
    return notes


def missing_labels_error(path: Path, keys: LabelKeys, trust_pickle: bool = False) -> IngestError:
    """The error for a source file in which no structure has any label, suggesting keys to use."""
    used = ", ".join([keys.energy or "energy", keys.forces or "forces", keys.stress or "stress"])
    message = f"{path}: no structure has an energy, forces or stress label under the keys used ({used})"
    found = label_key_candidates(path, trust_pickle)
    if not found:
        return IngestError(f"{message}, and no other key looks like a label; pass --unlabelled if the file is "
                           "meant to be unlabelled (or name the keys with --energy-key/--forces-key/--stress-key)")
    listed = ", ".join(f"{where} {name!r}" for (where, name) in found)
    hints = []
    for kind in ("energy", "forces", "stress"):
        names = list(dict.fromkeys(name for (_, name), k in found.items() if k == kind))
        named = _named_like(found, kind)
        # first the one named like the label (info before arrays before calculator results), else a
        # lone candidate; a stress must say so in its name (a virial is not a stress)
        pick = named[0][1] if named else names[0] if len(names) == 1 and kind != "stress" else None
        if pick is not None:
            hints.append(f"--{kind}-key {pick}")
    what = f"pass {' '.join(hints)}" if hints else "name them with --energy-key/--forces-key/--stress-key"
    return IngestError(f"{message}; keys that look like labels: {listed}; {what}, or --unlabelled if the file "
                       "is meant to be unlabelled")


def iter_ase_db_source(path: Path, ctx, spec) -> Iterator[Structure]:
    """``--format ase-db``."""
    return iter_ase_db(path, ctx.keys)


def iter_fairchem_preset(path: Path, ctx, spec) -> Iterator[Structure]:
    """``--format fairchem-lmdb`` (labels under --energy-key etc.) and the dataset presets oc20 / oc22 /
    odac23, whose energy attribute is fixed by ``--energy-kind`` (``y``, or ODAC23's ``raw_y``)."""
    keys = ctx.keys
    kind, choice = spec.energy(ctx.energy_kind)
    if choice is not None:
        keys = LabelKeys(energy=choice.key, allow_missing=keys.allow_missing, unlabelled=keys.unlabelled)
    return iter_fairchem_lmdb(path, ctx.trust_pickle, keys)


def iter_source(path: Path, keys: LabelKeys, trust_pickle: bool = False, fmt: str | None = None,
                ctx=None) -> Iterator[Structure]:
    """Structures of one input, in file order; ``fmt`` is a --format name (None: sniffed)."""
    from lamm_ds.ingest.formats import ReadContext, iter_format, resolve

    ctx = ctx or ReadContext(keys=keys, trust_pickle=trust_pickle)
    return iter_format(path, resolve(path, fmt), ctx)
