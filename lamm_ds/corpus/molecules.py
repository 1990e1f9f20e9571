"""Molecules from SMILES with RDKit: element swaps, ETKDG conformers, MMFF94s relaxation, off-equilibrium
sampling (partial relaxation + thermal rattle; normal modes at high temperature) and small fragments.

Every function takes an explicit ``numpy`` generator and returns ``ase.Atoms`` or raises
:class:`Rejected` with a short, countable reason (the detail goes to ``rejected.jsonl``).
"""

from __future__ import annotations

import numpy as np

# Elements of PubChem3D's drug-like chemistry; MOSES itself holds H C N O F S Cl Br.
PUBCHEM3D_ELEMENTS = ("H", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Br", "I")
KCAL_PER_MOL_IN_EV = 0.0433641153087705  # 1 kcal/mol in eV (CODATA 2018 via ASE's units)
KB_EV = 8.617333262e-5                   # Boltzmann constant, eV/K
MMFF_MAX_GRAD = 0.05                     # kcal/mol/Å: a "relaxed" conformer has every gradient component below
MIN_DISTANCE = 0.6                       # Å: a sampled geometry with a closer pair is rejected (broken chemistry)
# sqrt(eV / (Å^2 amu)) in cm^-1; modes below MIN_MODE_CM are torsions too anharmonic to sample harmonically
MODE_UNIT_CM = 521.47
MIN_MODE_CM = 150.0


class Rejected(Exception):
    """An attempt that produced no structure; ``reason`` is short and countable, ``detail`` free text."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def parse(smiles: str):
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise Rejected("smiles_unparsable", smiles)
    return mol


# --------------------------------------------------------------------------------------------------
# element swaps: MOSES has no Si, P or I, PubChem3D has all three


def _swap_sites(mol) -> dict[str, list[int]]:
    """Atoms that can change element without changing valence: sp3 carbon -> Si, sp3 amine N -> P,
    Cl/Br -> I (every bond single, not aromatic, no charge)."""
    from rdkit import Chem

    sites: dict[str, list[int]] = {"Si": [], "P": [], "I": []}
    for atom in mol.GetAtoms():
        plain = (not atom.GetIsAromatic() and atom.GetFormalCharge() == 0
                 and all(b.GetBondType() == Chem.BondType.SINGLE for b in atom.GetBonds()))
        if not plain:
            continue
        sym = atom.GetSymbol()
        if sym == "C" and atom.GetDegree() >= 2 and not atom.IsInRing():
            sites["Si"].append(atom.GetIdx())
        elif sym == "N" and atom.GetDegree() == 3 and not atom.IsInRing() and not any(
                n.GetIsAromatic() or n.GetSymbol() != "C" for n in atom.GetNeighbors()):
            sites["P"].append(atom.GetIdx())
        elif sym in ("Cl", "Br"):
            sites["I"].append(atom.GetIdx())
    return sites


def swap_elements(smiles: str, rng: np.random.Generator, probability: float) -> str:
    """With ``probability``, one atom swapped for Si, P or I (chosen among the sites this molecule has);
    returns the SMILES to embed (unchanged otherwise)."""
    from rdkit import Chem

    if rng.random() >= probability:
        return smiles
    mol = parse(smiles)
    sites = {el: idx for el, idx in _swap_sites(mol).items() if idx}
    if not sites:
        return smiles
    element = sorted(sites)[int(rng.integers(len(sites)))]
    atom = mol.GetAtomWithIdx(int(rng.choice(sites[element])))
    atom.SetAtomicNum(Chem.GetPeriodicTable().GetAtomicNumber(element))
    atom.SetNoImplicit(False)
    atom.SetNumExplicitHs(0)
    try:
        Chem.SanitizeMol(mol)
    except Exception as exc:  # RDKit raises several sanitisation error types
        raise Rejected("element_swap_invalid", f"{smiles} -> {element}: {exc}") from None
    return Chem.MolToSmiles(mol)


# --------------------------------------------------------------------------------------------------
# conformers


def embed(smiles: str, rng: np.random.Generator):
    """RDKit molecule with explicit hydrogens (atom order of ``AddHs(MolFromSmiles(smiles))``) and one
    ETKDGv3 conformer."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(parse(smiles))
    charge = sum(a.GetFormalCharge() for a in mol.GetAtoms())
    if charge:  # labels are computed for neutral closed-shell molecules only
        raise Rejected("charged_molecule", f"{smiles}: net charge {charge:+d}")
    params = AllChem.ETKDGv3()
    params.randomSeed = int(rng.integers(1, 2**31 - 1))
    params.maxIterations = 200
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise Rejected("etkdg_embed_failed", smiles)
    return mol


def mmff94s(mol, smiles: str):
    """The MMFF94s force field of ``mol`` (its conformer 0)."""
    from rdkit.Chem import rdForceFieldHelpers as ff

    props = ff.MMFFGetMoleculeProperties(mol, mmffVariant="MMFF94s")
    if props is None:
        raise Rejected("mmff_setup_failed", f"{smiles}: no MMFF94s atom types")
    field = ff.MMFFGetMoleculeForceField(mol, props)
    if field is None:
        raise Rejected("mmff_setup_failed", smiles)
    return field


def mmff_gradient(mol, positions: np.ndarray, smiles: str = "") -> np.ndarray:
    """MMFF94s gradient (kcal/mol/Å, shape (n, 3)) at ``positions``, from a field built there.

    A field that has run ``Minimize`` gives gradients at other positions that disagree with its own
    energies (seen with RDKit 2026.09), so every evaluation sets the conformer and builds afresh.
    """
    from rdkit.Geometry import Point3D

    conf = mol.GetConformer()
    for i, x in enumerate(np.asarray(positions, dtype=float).reshape(-1, 3)):
        conf.SetAtomPosition(i, Point3D(*x))
    return np.array(mmff94s(mol, smiles).CalcGrad()).reshape(-1, 3)


def relaxed(mol, smiles: str):
    """Minimise with MMFF94s until every gradient component (checked by a fresh field) is below
    :data:`MMFF_MAX_GRAD` kcal/mol/Å; returns the positions and that largest component."""
    for _ in range(10):
        field = mmff94s(mol, smiles)
        field.Initialize()
        field.Minimize(maxIts=2000, forceTol=1e-6, energyTol=1e-10)
        positions = np.array(field.Positions()).reshape(-1, 3)
        worst = float(np.abs(mmff_gradient(mol, positions, smiles)).max())
        if worst < MMFF_MAX_GRAD:
            return positions, worst
    raise Rejected("mmff_not_converged", f"{smiles}: max gradient {worst:.3g} kcal/mol/Å")


def to_atoms(mol, positions: np.ndarray, info: dict):
    from ase import Atoms

    atoms = Atoms([a.GetSymbol() for a in mol.GetAtoms()], positions=positions)
    atoms.info.update(info)
    return atoms


def check_geometry(atoms, what: str) -> None:
    from scipy.spatial.distance import pdist

    if len(atoms) > 1:
        d = float(pdist(atoms.positions).min())
        if d < MIN_DISTANCE:
            raise Rejected("sampled_geometry_broken", f"{what}: two atoms {d:.2f} Å apart")


def mmff_conformer(smiles: str, rng: np.random.Generator):
    """PubChem3D's recipe: ETKDG conformer relaxed with MMFF94s. ``info`` keeps the SMILES (atoms in
    its ``AddHs`` order) and the final MMFF gradient, so the geometry can be checked later."""
    mol = embed(smiles, rng)
    positions, worst = relaxed(mol, smiles)
    return to_atoms(mol, positions, {"smiles": smiles, "mmff_max_grad": worst})


def thermal_conformer(smiles: str, rng: np.random.Generator, max_relax_steps: int = 60,
                      rattle: tuple[float, float] = (0.02, 0.07)):
    """QMugs-like off-equilibrium conformer: ETKDG, a random number (0..max) of MMFF94s steps, then a
    Gaussian rattle of a random width (Å) on every atom."""
    mol = embed(smiles, rng)
    field = mmff94s(mol, smiles)
    field.Initialize()
    steps = int(rng.integers(0, max_relax_steps + 1))
    if steps:
        field.Minimize(maxIts=steps)
    positions = np.array(field.Positions()).reshape(-1, 3)
    sigma = float(rng.uniform(*rattle))
    positions = positions + rng.normal(0.0, sigma, size=positions.shape)
    atoms = to_atoms(mol, positions, {"smiles": smiles, "mmff_steps": steps, "rattle_sigma": sigma})
    check_geometry(atoms, smiles)
    return atoms


# --------------------------------------------------------------------------------------------------
# small molecules far from equilibrium


def small_fragments(smiles: str, max_heavy: int) -> list[str]:
    """BRICS fragments of a molecule with 2..max_heavy heavy atoms, open valences capped with H."""
    from rdkit import Chem
    from rdkit.Chem import BRICS

    out = []
    for frag in sorted(BRICS.BRICSDecompose(parse(smiles))):
        capped = Chem.MolFromSmiles(_cap_dummies(frag))
        if capped is None:
            continue
        if 2 <= capped.GetNumHeavyAtoms() <= max_heavy:
            out.append(Chem.MolToSmiles(capped))
    return out


def _cap_dummies(fragment_smiles: str) -> str:
    """BRICS marks broken bonds with ``[n*]``; an implicit hydrogen takes their place."""
    import re

    return re.sub(r"\[\d*\*\]", "[H]", fragment_smiles)


def _hessian(mol, positions: np.ndarray, smiles: str, step: float = 1e-3) -> np.ndarray:
    """Central finite differences of the MMFF94s gradient, eV/Å^2."""
    n3 = positions.size
    flat = positions.reshape(-1)
    h = np.empty((n3, n3))
    for k in range(n3):
        plus, minus = flat.copy(), flat.copy()
        plus[k] += step
        minus[k] -= step
        h[k] = (mmff_gradient(mol, plus, smiles) - mmff_gradient(mol, minus, smiles)).reshape(-1) / (2 * step)
    return 0.5 * (h + h.T) * KCAL_PER_MOL_IN_EV


def normal_mode_sample(smiles: str, rng: np.random.Generator, temperature: tuple[float, float] = (300.0, 1000.0)):
    """QM7-X-like: MMFF94s minimum, then a displacement along every vibrational normal mode above
    :data:`MIN_MODE_CM` (MMFF Hessian) with the classical harmonic amplitude of a random temperature (K)."""
    from ase.data import atomic_masses

    mol = embed(smiles, rng)
    positions, _ = relaxed(mol, smiles)
    masses = np.array([atomic_masses[a.GetAtomicNum()] for a in mol.GetAtoms()])
    inv_sqrt_m = np.repeat(1.0 / np.sqrt(masses), 3)
    hess_mw = _hessian(mol, positions, smiles) * inv_sqrt_m[:, None] * inv_sqrt_m[None, :]
    eigval, eigvec = np.linalg.eigh(hess_mw)
    # translations, rotations and soft torsions: a harmonic amplitude there would tear the molecule apart
    vib = eigval > (MIN_MODE_CM / MODE_UNIT_CM) ** 2
    t = float(rng.uniform(*temperature))
    # each vibrational coordinate q_i ~ N(0, kT / lambda_i) (equipartition), back to Cartesian
    q = rng.normal(size=int(vib.sum())) * np.sqrt(KB_EV * t / eigval[vib])
    displacement = (eigvec[:, vib] @ q) * inv_sqrt_m
    atoms = to_atoms(mol, positions + displacement.reshape(-1, 3), {"smiles": smiles, "temperature_k": t})
    check_geometry(atoms, smiles)
    return atoms
