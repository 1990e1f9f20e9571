"""SDF readers (RDKit): QMugs conformers with their DFT labels, PubChem3D conformers without labels.

QMugs ships one SDF per conformer (``structures/CHEMBL<id>/conf_<k>.sdf``) whose data fields carry
the labels (``DFT:TOTAL_ENERGY`` etc., in Hartree; its summary.csv repeats them, so it is not
needed). PubChem3D SDFs hold many conformers per file, with force-field (MMFF94) data only.
Hydrogens are kept as written and molecules are not sanitised: the coordinates are the data.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ase.units import Hartree

from lamm_ds.ingest.readers import IngestError
from lamm_ds.structure import Structure


def _chem():
    try:
        from rdkit import Chem, RDLogger
    except ImportError:
        raise IngestError("reading SDF needs RDKit: pip install 'lamm-ds[sdf]'") from None
    RDLogger.DisableLog("rdApp.*")  # its parse warnings would interleave with ours; failures raise below
    return Chem


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """(record index, RDKit Mol) in file order; an unparsable record is an IngestError naming it."""
    Chem = _chem()
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as fh:
        count = -1
        for count, mol in enumerate(Chem.ForwardSDMolSupplier(fh, removeHs=False, sanitize=False)):
            if mol is None or mol.GetNumConformers() == 0:
                raise IngestError(f"{path}: SDF record {count} cannot be parsed (no valid molecule block)")
            yield count, mol
    if count < 0:
        raise IngestError(f"{path}: contains no SDF records")


def _structure(path: Path, index: int, mol, energy: float | None, info: dict) -> Structure:
    conf = mol.GetConformer()
    positions = np.asarray(conf.GetPositions(), dtype=np.float64)
    if not conf.Is3D() and len(positions) > 1:
        raise IngestError(f"{path}: SDF record {index} is a 2D depiction, not a 3D conformer")
    numbers = [a.GetAtomicNum() for a in mol.GetAtoms()]
    charge = sum(a.GetFormalCharge() for a in mol.GetAtoms())
    return Structure(numbers=numbers, positions=positions, energy=energy, source=str(path), source_index=index,
                     info={**info, "charge": int(charge)})


def _prop(mol, name: str):
    return mol.GetProp(name).strip() if mol.HasProp(name) else None


def iter_qmugs(path: Path, ctx, spec) -> Iterator[Structure]:
    """QMugs: the energy named by ``--energy-kind`` (DFT total by default), Hartree -> eV; no forces."""
    _, choice = spec.energy(ctx.energy_kind)
    for index, mol in _records(path):
        raw = _prop(mol, choice.key)
        if raw is None and not ctx.keys.allow_missing:
            raise IngestError(f"{path}: SDF record {index} has no <{choice.key}> data field (a QMugs conformer "
                              "SDF carries it; pass --allow-missing-labels to store such records without it)")
        try:
            energy = None if raw is None else float(raw) * Hartree
        except ValueError:
            raise IngestError(f"{path}: SDF record {index}: <{choice.key}> is {raw!r}, not a number") from None
        info = {k.lower(): v for k in ("CHEMBL_ID", "CONF_ID") if (v := _prop(mol, k)) is not None}
        yield _structure(path, index, mol, energy, info)


def iter_pubchem3d(path: Path, ctx, spec) -> Iterator[Structure]:
    """PubChem3D: every conformer record, unlabelled (its MMFF94 energy is a force-field value, not a
    DFT label, and is dropped); the compound and conformer ids go to ``info``."""
    for index, mol in _records(path):
        info = {}
        for tag, key in (("PUBCHEM_COMPOUND_CID", "cid"), ("PUBCHEM_CONFORMER_ID", "conformer_id")):
            if (value := _prop(mol, tag)) is not None:
                info[key] = value
        if not info:
            raise IngestError(f"{path}: SDF record {index} has no <PUBCHEM_COMPOUND_CID> or <PUBCHEM_CONFORMER_ID> "
                              "data field: not a PubChem3D conformer SDF (pass --format ase for other SDFs)")
        yield _structure(path, index, mol, None, info)
