"""Small files in the published layouts of the paper's datasets (docs/datasets.md), for the ingest
tests. Each writer returns what a correct reader must produce, in eV / Å, in read order."""

import json
import pickle

import lmdb
import numpy as np
from ase.build import molecule
from ase.units import GPa, Bohr, Hartree

RNG = np.random.default_rng(7)


def mol(name="CH3CHO", k=0):
    """A molecule's (numbers, positions Å), rattled by conformer index ``k``."""
    a = molecule(name)
    return a.numbers.copy(), a.positions + 0.02 * np.sin(np.arange(a.positions.size) + k).reshape(-1, 3)


def _conformers(name, m):
    numbers, _ = mol(name)
    pos = np.stack([mol(name, k)[1] for k in range(m)])
    return numbers, pos, RNG.normal(size=(m, len(numbers), 3))


# ------------------------------------------------------------------------------------------- HDF5

def transition1x(path, splits=("train", "val")):
    import h5py

    expected, rxn = [], 0
    with h5py.File(path, "w") as f:
        for split in splits:
            for formula, name in (("C2H4O", "CH3CHO"), ("CH4", "CH4")):
                rxn += 1  # train/C2H4O/rxn0001, train/CH4/rxn0002, val/C2H4O/rxn0003, ...
                g = f.create_group(f"{split}/{formula}/rxn{rxn:04d}")
                parts = {}
                for part, m in (("reactant", 1), ("product", 1), (None, 3)):
                    numbers, pos, forces = _conformers(name, m)
                    energy = -1000.0 - RNG.random(m)
                    grp = g if part is None else g.create_group(part)
                    grp["atomic_numbers"] = numbers
                    grp["positions"] = pos
                    grp["wB97x_6-31G(d).energy"] = energy
                    grp["wB97x_6-31G(d).forces"] = forces
                    parts[part] = (numbers, pos, energy, forces)
                for part in ("reactant", "product", None):
                    numbers, pos, energy, forces = parts[part]
                    expected += [dict(numbers=numbers, positions=pos[k], energy=energy[k], forces=forces[k],
                                      split=split, part=part or "path") for k in range(len(energy))]
    return str(path), expected


def qm7x(path):
    import h5py

    expected = []
    with h5py.File(path, "w") as f:
        for mol_id, name in (("1", "CH4"), ("2", "CH3OH")):
            for c in range(2):
                numbers, pos = mol(name, c)
                forces = RNG.normal(size=pos.shape)
                total, atomization = -1100.0 - RNG.random(), -20.0 - RNG.random()
                g = f.create_group(f"{mol_id}/Geom-m{mol_id}-i1-c1-d{c}")
                g["atNUM"], g["atXYZ"], g["totFOR"] = numbers, pos, forces
                g["ePBE0+MBD"], g["eAT"] = [total], [atomization]
                g["pbe0FOR"] = forces * 0.9  # other QM7-X members are present and ignored
                expected.append(dict(numbers=numbers, positions=pos, energy=total, atomization=atomization,
                                     forces=forces, mol_id=mol_id))
    return str(path), expected


def ani1x(path):
    import h5py

    expected = []
    with h5py.File(path, "w") as f:
        for formula, name in (("C1H4", "CH4"), ("C2H4O1", "CH3CHO")):  # h5py lists groups by name
            numbers, pos, forces = _conformers(name, 3)
            energy = -150.0 - RNG.random(3)
            ccsd = np.array([-150.5, np.nan, -150.7])  # ANI-1ccx: only some conformers have CCSD(T)
            g = f.create_group(formula)
            g["atomic_numbers"], g["coordinates"] = numbers, pos
            g["wb97x_dz.energy"], g["wb97x_dz.forces"], g["ccsd(t)_cbs.energy"] = energy, forces, ccsd
            expected += [dict(numbers=numbers, positions=pos[k], energy=energy[k] * Hartree,
                              forces=forces[k] * Hartree, ccsd=ccsd[k] * Hartree) for k in range(3)]
    return str(path), expected


def spice(path, units="bohr"):
    import h5py

    expected = []
    with h5py.File(path, "w") as f:
        for name, smiles, charge in (("103914", "[N+:1]([H:2])([H:3])([H:4])[H:5]", 1),
                                     ("water", "[O:1]([H:2])[H:3]", 0)):
            numbers, pos_a, _ = _conformers("NH3" if charge else "H2O", 2)
            if charge:  # NH4+: one more H, above the N
                numbers = np.append(numbers, 1)
                pos_a = np.concatenate([pos_a, pos_a[:, :1] + [0.0, 0.0, 1.02]], axis=1)
            gradient = RNG.normal(size=pos_a.shape) * 0.01
            total, formation = -95.0 - RNG.random(2), -0.5 - RNG.random(2)
            g = f.create_group(name)
            g.create_dataset("subset", data=["SPICE PubChem Set 1 Single Points Dataset v1.2"],
                             dtype=h5py.string_dtype())
            g.create_dataset("smiles", data=[smiles], dtype=h5py.string_dtype())
            g["atomic_numbers"] = numbers.astype(np.int16)
            ds = g.create_dataset("conformations", data=(pos_a / Bohr).astype(np.float32))
            ds.attrs["units"] = units
            for key, value, unit in (("dft_total_energy", total, "hartree"), ("formation_energy", formation, "hartree"),
                                     ("dft_total_gradient", gradient, "hartree/bohr")):
                g.create_dataset(key, data=value).attrs["units"] = unit
            expected += [dict(numbers=numbers, positions=(pos_a / Bohr).astype(np.float32)[k].astype(float) * Bohr,
                              energy=total[k] * Hartree, formation=formation[k] * Hartree,
                              forces=-gradient[k] * Hartree / Bohr, charge=charge) for k in range(2)]
    return str(path), expected


# -------------------------------------------------------------------------------------------- SDF

def _rdkit_mol(smiles, seed):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(m, randomSeed=seed)
    return m


def qmugs(root, n=2):
    """``root/structures/CHEMBL<k>/conf_00.sdf`` with QMugs' data fields."""
    from rdkit import Chem

    expected = []
    for k, smiles in enumerate(["CC(=O)[O-]", "c1ccccc1O"][:n]):
        m = _rdkit_mol(smiles, k)
        for tag, value in (("CHEMBL_ID", f"CHEMBL{100 + k}"), ("CONF_ID", "conf_00"),
                           ("DFT:TOTAL_ENERGY", f"{-228.1 - k:.6f}"), ("DFT:FORMATION_ENERGY", f"{-1.2 - k:.6f}"),
                           ("GFN2:TOTAL_ENERGY", f"{-20.5 - k:.6f}"), ("DFT:DIPOLE", "0.1|0.2|0.3|0.37")):
            m.SetProp(tag, value)
        d = root / "structures" / f"CHEMBL{100 + k}"
        d.mkdir(parents=True, exist_ok=True)
        with Chem.SDWriter(str(d / "conf_00.sdf")) as w:
            w.write(m)
        expected.append(dict(numbers=[a.GetAtomicNum() for a in m.GetAtoms()],
                             positions=m.GetConformer().GetPositions(), energy=(-228.1 - k) * Hartree,
                             formation=(-1.2 - k) * Hartree, gfn2=(-20.5 - k) * Hartree,
                             charge=-1 if k == 0 else 0, chembl_id=f"CHEMBL{100 + k}"))
    return str(root / "structures" / "*" / "conf_*.sdf"), expected


def pubchem3d(path, gz=False):
    """Several conformers of two compounds in one SDF (optionally gzipped), PubChem3D data fields."""
    import gzip
    import io

    from rdkit import Chem

    buf, expected = io.StringIO(), []
    with Chem.SDWriter(buf) as w:
        for cid, smiles in ((702, "CCO"), (887, "CO")):
            for c in range(2):
                m = _rdkit_mol(smiles, 10 * cid + c)
                m.SetProp("PUBCHEM_COMPOUND_CID", str(cid))
                m.SetProp("PUBCHEM_CONFORMER_ID", f"{cid:08X}{c:08X}")
                m.SetProp("PUBCHEM_MMFF94_ENERGY", "1.2345")
                w.write(m)
                expected.append(dict(numbers=[a.GetAtomicNum() for a in m.GetAtoms()],
                                     positions=m.GetConformer().GetPositions(), cid=str(cid)))
    with (gzip.open(path, "wt") if gz else open(path, "w")) as fh:
        fh.write(buf.getvalue())
    return str(path), expected


# -------------------------------------------------------------------------------------------- JSON

def _pmg_structure(cell, symbols, frac):
    cell = np.asarray(cell, dtype=float)
    return {"@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0,
            "lattice": {"matrix": cell.tolist(), "pbc": [True, True, True], "a": float(np.linalg.norm(cell[0]))},
            "properties": {},
            "sites": [{"species": [{"element": s, "occu": 1}], "abc": list(f), "xyz": (np.asarray(f) @ cell).tolist(),
                       "label": s, "properties": {"magmom": 0.1}} for s, f in zip(symbols, frac)]}


def mptrj(path):
    data, expected = {}, []
    for mp_id, cell, symbols, frac in (
            ("mp-1", [[0, 2.0, 2.0], [2.0, 0, 2.0], [2.0, 2.0, 0]], ["Li", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
            ("mp-2", [[3.1, 0, 0], [0, 3.2, 0], [0.1, 0, 3.3]], ["Fe", "O", "O"],
             [[0, 0, 0], [0.5, 0.5, 0.1], [0.5, 0.1, 0.5]])):
        frames = {}
        for step in range(2):
            n = len(symbols)
            force, stress = RNG.normal(size=(n, 3)), RNG.normal(size=(3, 3)) * 10
            stress = (stress + stress.T) / 2
            unc, cor = -5.0 * n - step, -5.3 * n - step
            frames[f"{mp_id}-0-{step}"] = {"structure": _pmg_structure(cell, symbols, frac),
                                           "uncorrected_total_energy": unc, "corrected_total_energy": cor,
                                           "energy_per_atom": cor / n, "ef_per_atom": -1.0, "force": force.tolist(),
                                           "stress": stress.tolist(), "magmom": [0.1] * n, "bandgap": 0.0,
                                           "mp_id": mp_id}
            expected.append(dict(cell=np.asarray(cell, float), positions=np.asarray(frac) @ np.asarray(cell, float),
                                 energy=unc, corrected=cor, forces=force,
                                 stress=-stress * 0.1 * GPa, mp_id=mp_id))
        data[mp_id] = frames
    with open(path, "w") as fh:
        json.dump(data, fh)
    return str(path), expected


# -------------------------------------------------------------------------------------------- LMDB

def aselmdb(path):
    import ase.db
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    expected = []
    with ase.db.connect(str(path), type="aselmdb") as db:
        for k in range(3):
            a = bulk("NaCl", "rocksalt", a=5.6 + 0.01 * k)
            forces, stress = RNG.normal(size=(2, 3)), RNG.normal(size=6) * 0.01
            a.calc = SinglePointCalculator(a, energy=-7.0 - k, forces=forces, stress=stress)
            db.write(a, sid=f"omat-{k}")
            expected.append(dict(cell=a.cell[:], positions=a.positions, energy=-7.0 - k, forces=forces,
                                 stress=stress))
    return str(path), expected


def fairchem(path, records):
    """A fairchem LMDB of pickled PyG Data objects (as OC20/OC22/ODAC23 ship them)."""
    import torch
    from torch_geometric.data import Data

    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, fields in enumerate(records):
            d = Data(**{n: torch.tensor(v) if isinstance(v, np.ndarray) else v for n, v in fields.items()})
            txn.put(str(k).encode(), pickle.dumps(d, protocol=-1))
    env.close()
    return str(path)


def oc_record(k, **extra):
    pos = np.array([[0.0, 0, 0], [1.8, 0, 0], [0, 1.8, 0.5]]) + 0.01 * k
    rec = {"pos": pos, "atomic_numbers": np.array([8.0, 29.0, 1.0]), "cell": np.eye(3).reshape(1, 3, 3) * 7.0,
           "natoms": 3, "tags": np.array([1, 0, 2]), "fixed": np.array([0, 1, 0]), "sid": 100 + k, "fid": k,
           "force": RNG.normal(size=(3, 3))}
    rec.update(extra)
    return rec
