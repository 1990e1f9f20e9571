"""HDF5 readers: Transition1x, QM7-X, ANI-1x and SPICE, each in its published layout (docs/datasets.md).

Layouts and units were taken from each dataset's own documentation and loader (Transition1x's
dataloader, the QM7-X data descriptor, ANI-1x's dataloader and data descriptor, SPICE's
downloader) and re-implemented here. Everything is converted to eV, Å, eV/Å. A file that does not
match its layout is an IngestError naming the file, the group and the missing dataset.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ase.units import Bohr, Hartree

from lamm_ds.ingest.readers import IngestError
from lamm_ds.structure import Structure

# Isolated-atom wB97x/6-31G(d) energies (eV) that Transition1x's loader subtracts for its
# atomization energy (Schreiner et al. 2022); only H, C, N, O, F occur in the set.
T1X_ATOM_ENERGIES = {1: -13.62222753701504, 6: -1029.4130839658328, 7: -1484.8710358098756,
                     8: -2041.8396277138045, 9: -2712.8213146878606}
_T1X_E, _T1X_F = "wB97x_6-31G(d).energy", "wB97x_6-31G(d).forces"


def _h5py():
    try:
        import h5py
    except ImportError:
        raise IngestError("reading HDF5 datasets needs h5py: pip install 'lamm-ds[hdf5]'") from None
    return h5py


def _open(path: Path):
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise IngestError(f"{path}: cannot open as HDF5: {exc}") from exc


def _need(group, name: str, file: Path, layout: str):
    """``group[name]``, or an IngestError naming the file, the group and the missing member."""
    if name not in group:
        raise IngestError(f"{file}: group '{group.name}' has no '{name}' (expected the {layout} layout; "
                          "see docs/datasets.md)")
    return group[name]


def _groups(group, file: Path, layout: str, what: str):
    """(name, subgroup) pairs of ``group``; a dataset where a group belongs is a layout error."""
    h5py = _h5py()
    for name, member in group.items():
        if not isinstance(member, h5py.Group):
            raise IngestError(f"{file}: '{member.name}' is a dataset where the {layout} layout has a {what} group")
        yield name, member


def _frames(file, group, index, numbers, positions, energies, forces, info) -> Iterator[Structure]:
    """One Structure per conformer of a (M, N, 3) block; ``index`` is the running record number."""
    if positions.ndim != 3 or positions.shape[1:] != (len(numbers), 3):
        raise IngestError(f"{file}: '{group.name}': positions have shape {positions.shape}, expected "
                          f"(conformers, {len(numbers)}, 3) for {len(numbers)} atomic numbers")
    for name, value, shape in (("energies", energies, (len(positions),)), ("forces", forces, positions.shape)):
        if value is not None and value.shape != shape:
            raise IngestError(f"{file}: '{group.name}': {name} have shape {value.shape}, expected {shape}")
    for k in range(positions.shape[0]):
        yield Structure(numbers=numbers, positions=positions[k],
                        energy=None if energies is None else float(energies[k]),
                        forces=None if forces is None else forces[k],
                        source=str(file), source_index=index + k, info={**info, "conformer": k})


# ------------------------------------------------------------------------------------ Transition1x

def _t1x_block(file, group, index, kind, info):
    numbers = np.asarray(_need(group, "atomic_numbers", file, "Transition1x")[()]).reshape(-1)
    energies = np.asarray(_need(group, _T1X_E, file, "Transition1x")[()], dtype=np.float64).reshape(-1)
    if kind == "atomization":
        missing = sorted(set(numbers.tolist()) - set(T1X_ATOM_ENERGIES))
        if missing:
            raise IngestError(f"{file}: '{group.name}': no Transition1x isolated-atom energy for Z={missing}")
        energies = energies - sum(T1X_ATOM_ENERGIES[int(z)] for z in numbers)
    forces = np.asarray(_need(group, _T1X_F, file, "Transition1x")[()], dtype=np.float64)
    positions = np.asarray(_need(group, "positions", file, "Transition1x")[()], dtype=np.float64)
    return _frames(file, group, index, numbers, positions, energies, forces, info)


def iter_transition1x(path: Path, ctx, spec) -> Iterator[Structure]:
    """``/<split>/<formula>/<rxn>/``: the path's conformers (positions (M, N, 3) Å, energies eV, forces
    eV/Å) plus ``reactant`` and ``product`` subgroups, read as the dataset's loader reads them
    (reactant, product, then the path). Splits: ``ctx.split``, else train + val + test (else data)."""
    kind, _ = spec.energy(ctx.energy_kind)
    with _open(path) as f:
        splits = [ctx.split] if ctx.split else [s for s in ("train", "val", "test") if s in f] or ["data"]
        index = 0
        for split in splits:
            top = _need(f, split, path, "Transition1x (/data|train|val|test/<formula>/<rxn>)")
            for formula, fgroup in _groups(top, path, "Transition1x", "formula"):
                for rxn, rgroup in _groups(fgroup, path, "Transition1x", "reaction"):
                    info = {"split": split, "formula": formula, "rxn": rxn}
                    for part in ("reactant", "product", None):
                        group = rgroup if part is None else _need(rgroup, part, path, "Transition1x")
                        for s in _t1x_block(path, group, index, kind, {**info, "part": part or "path"}):
                            index += 1
                            yield s


# ------------------------------------------------------------------------------------------ QM7-X

def iter_qm7x(path: Path, ctx, spec) -> Iterator[Structure]:
    """``/<molecule id>/<conformer id>/``: ``atNUM``, ``atXYZ`` (Å), ``ePBE0+MBD`` or ``eAT`` (eV, one
    value per conformer) and ``totFOR`` (total PBE0+MBD forces, eV/Å)."""
    _, choice = spec.energy(ctx.energy_kind)
    index = 0
    with _open(path) as f:
        for mol, mgroup in _groups(f, path, "QM7-X", "molecule"):
            for conf, cgroup in _groups(mgroup, path, "QM7-X", "conformer"):
                numbers = np.asarray(_need(cgroup, "atNUM", path, "QM7-X")[()]).reshape(-1)
                positions = np.asarray(_need(cgroup, "atXYZ", path, "QM7-X")[()], dtype=np.float64)
                energy = np.asarray(_need(cgroup, choice.key, path, "QM7-X")[()], dtype=np.float64).reshape(-1)
                forces = np.asarray(_need(cgroup, "totFOR", path, "QM7-X")[()], dtype=np.float64)
                for name, value in (("atXYZ", positions), ("totFOR", forces)):
                    if value.shape != (len(numbers), 3):
                        raise IngestError(f"{path}: '{cgroup.name}/{name}' has shape {value.shape}, expected "
                                          f"({len(numbers)}, 3) for {len(numbers)} atNUM entries")
                yield Structure(numbers=numbers, positions=positions, energy=float(energy[0]), forces=forces,
                                source=str(path), source_index=index, info={"mol_id": mol, "conf_id": conf})
                index += 1


# ------------------------------------------------------------------------------------------ ANI-1x

def ani_forces_key(energy_key: str) -> str:
    """The forces of the same method as ``energy_key`` (wb97x_dz.energy -> wb97x_dz.forces): forces of
    another method would not be the gradient of the energy stored beside them."""
    return energy_key.rsplit(".", 1)[0] + ".forces"


def iter_ani1x(path: Path, ctx, spec) -> Iterator[Structure]:
    """``/<formula>/``: ``atomic_numbers``, ``coordinates`` (M, N, 3) Å, ``wb97x_dz.energy`` (Ha) and
    ``wb97x_dz.forces`` (Ha/Å); --energy-key picks another method (``ccsd(t)_cbs.energy``, ...).
    Conformers whose chosen energy is NaN (not computed at that level) are skipped and counted."""
    energy_key = ctx.keys.energy or "wb97x_dz.energy"
    forces_key = ctx.keys.forces or ani_forces_key(energy_key)
    index = skipped = no_forces = 0
    with _open(path) as f:
        for name, group in _groups(f, path, "ANI-1x", "formula"):
            numbers = np.asarray(_need(group, "atomic_numbers", path, "ANI-1x")[()]).reshape(-1)
            positions = np.asarray(_need(group, "coordinates", path, "ANI-1x")[()], dtype=np.float64)
            energies = np.asarray(_need(group, energy_key, path, "ANI-1x")[()], dtype=np.float64) * Hartree
            forces = None
            if forces_key in group or ctx.keys.forces:
                forces = np.asarray(_need(group, forces_key, path, "ANI-1x")[()], dtype=np.float64) * Hartree
            keep = ~np.isnan(energies)
            skipped += int((~keep).sum())
            for s in _frames(path, group, index, numbers, positions, energies, forces, {"formula": name}):
                if not keep[s.info["conformer"]]:
                    continue
                if s.forces is not None and np.isnan(s.forces).any():
                    s.forces, no_forces = None, no_forces + 1
                yield s
            index += len(energies)
    if skipped:
        ctx.notes.append(f"{path}: skipped {skipped} conformers without a {energy_key} value (NaN in the file)")
    if no_forces:
        ctx.notes.append(f"{path}: {no_forces} conformers have no {forces_key} (NaN in the file): "
                         "stored without forces")


# ------------------------------------------------------------------------------------------- SPICE

_CHARGE = re.compile(r"([+-]+)(\d*)$")


def smiles_charge(smiles: str) -> int:
    """Total formal charge of a (mapped) SMILES: the sum over bracket atoms of their charge suffix
    (``[N+:3]`` +1, ``[O-:5]`` -1, ``[Ca+2:1]`` +2, ``[O--]`` -2)."""
    total = 0
    for atom in re.findall(r"\[([^\]]*)\]", smiles):
        m = _CHARGE.search(re.sub(r":\d+$", "", atom))
        if m:
            sign = 1 if m.group(1)[0] == "+" else -1
            total += sign * (int(m.group(2)) if m.group(2) else len(m.group(1)))
    return total


_SPICE_UNITS = {"conformations": "bohr", "dft_total_energy": "hartree", "formation_energy": "hartree",
                "dft_total_gradient": "hartree/bohr"}


def _spice_array(group, name, path) -> np.ndarray:
    ds = _need(group, name, path, "SPICE")
    unit = ds.attrs.get("units")
    if isinstance(unit, bytes):
        unit = unit.decode()
    if unit is not None and str(unit).lower() != _SPICE_UNITS[name]:
        raise IngestError(f"{path}: '{ds.name}' is in {unit!r}; the SPICE layout stores {_SPICE_UNITS[name]}")
    return np.asarray(ds[()], dtype=np.float64)


def _text(group, name):
    if name not in group:
        return None
    value = group[name][()]
    value = value.reshape(-1)[0] if hasattr(value, "reshape") else value
    return value.decode() if isinstance(value, bytes) else str(value)


def iter_spice(path: Path, ctx, spec) -> Iterator[Structure]:
    """``/<molecule>/``: ``atomic_numbers``, ``conformations`` (M, N, 3) bohr, ``dft_total_energy`` or
    ``formation_energy`` (Ha), ``dft_total_gradient`` (Ha/bohr; forces are its negative)."""
    _, choice = spec.energy(ctx.energy_kind)
    index = 0
    with _open(path) as f:
        for name, group in _groups(f, path, "SPICE", "molecule"):
            numbers = np.asarray(_need(group, "atomic_numbers", path, "SPICE")[()]).reshape(-1)
            positions = _spice_array(group, "conformations", path) * Bohr
            energies = _spice_array(group, choice.key, path) * Hartree
            forces = -_spice_array(group, "dft_total_gradient", path) * (Hartree / Bohr)
            info = {"name": name}
            for key in ("subset", "smiles"):
                if (value := _text(group, key)) is not None:
                    info[key] = value
            if "smiles" in info:
                info["charge"] = smiles_charge(info["smiles"])
            yield from _frames(path, group, index, numbers, positions, energies, forces, info)
            index += len(energies)


# -------------------------------------------------------------------------------------------- sniff

def _first(group):
    for name in group:
        return group[name]
    return None


def sniff_hdf5(path: Path) -> str:
    """transition1x / qm7x / ani1x / spice from the first groups' members (reads no arrays)."""
    h5py = _h5py()
    with _open(path) as f:
        top = list(f.keys())
        split = next((s for s in ("data", "train", "val", "test") if s in f), None)
        if split is not None:
            rxn = _first(_first(f[split]) or {})
            if isinstance(rxn, h5py.Group) and _T1X_E in rxn:
                return "transition1x"
        first = _first(f)
        if isinstance(first, h5py.Group):
            if "conformations" in first:
                return "spice"
            if "coordinates" in first:
                return "ani1x"
            conf = _first(first)
            if isinstance(conf, h5py.Group) and "atXYZ" in conf:
                return "qm7x"
    raise IngestError(f"{path}: an HDF5 file in no layout lamm-ds knows (top-level members {top[:5]}); pass "
                      "--format transition1x, qm7x, ani1x or spice")
