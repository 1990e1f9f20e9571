"""The corpus subsets (one explicit table), what one attempt of each does, and how many attempts
each scale makes. An attempt is a pure function of ``(seed, subset, attempt index, input item)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lamm_ds.corpus import bulk, molecules, surfaces, xtb

# Where each SMILES-fed subset takes its molecules in one seeded permutation of the MOSES training
# SMILES: fixed blocks, so a smaller scale is a prefix of a larger one and subsets never share a molecule.
SMILES_BLOCKS = {"pubchem3d_mmff": (0, 1_000_000), "qmugs_xtb": (1_000_000, 1_200_000),
                 "t1x_xtb": (1_200_000, 1_584_663)}
T1X_MAX_HEAVY = 9
T1X_GEOMETRIES_PER_MOLECULE = 2


@dataclass(frozen=True)
class SubsetRecipe:
    name: str
    recipe: str               # in words, for the manifest and docs
    level_of_theory: str
    labels: str               # "none" | "energy+forces" | "energy"
    inputs: str               # "smiles" | "fragments" | "none" (generated from the random stream alone)
    attempt: Callable         # (item, rng) -> ase.Atoms, raising molecules.Rejected
    needs: tuple[str, ...]    # modules of the `corpus` extra


def _pubchem3d(smiles, rng):
    return molecules.mmff_conformer(molecules.swap_elements(smiles, rng, 0.3), rng)


def _qmugs(smiles, rng):
    atoms = molecules.thermal_conformer(molecules.swap_elements(smiles, rng, 0.15), rng)
    return xtb.label(atoms, "GFN2-xTB", atoms.info["smiles"])


def _t1x(fragment, rng):
    atoms = molecules.normal_mode_sample(fragment, rng)
    return xtb.label(atoms, "GFN2-xTB", fragment)


def _oc20(_, rng):
    slab = surfaces.slab_with_adsorbate(rng)
    return xtb.label(slab, "EMT", slab.get_chemical_formula())


def _oc20_energy(_, rng):
    from ase.calculators.singlepoint import SinglePointCalculator

    slab = _oc20(None, rng)
    slab.calc = SinglePointCalculator(slab, energy=slab.get_potential_energy())
    return slab


def _bulk(_, rng):
    cell = bulk.random_cell(rng)
    return xtb.label(cell, "GFN1-xTB", cell.get_chemical_formula(), stress=True)


SUBSETS: dict[str, SubsetRecipe] = {r.name: r for r in (
    SubsetRecipe("pubchem3d_mmff", "MOSES drug-like SMILES (30% with one C->Si, N->P or Cl/Br->I swap), "
                 "RDKit ETKDGv3 conformer, MMFF94s minimum (every gradient component < "
                 f"{molecules.MMFF_MAX_GRAD} kcal/mol/Å), as PubChem3D", "none (unlabelled; MMFF94s geometry)",
                 "none", "smiles", _pubchem3d, ("rdkit", "moses")),
    SubsetRecipe("qmugs_xtb", "other MOSES molecules (15% element swap), ETKDGv3 conformer, 0-60 MMFF94s "
                 "steps, Gaussian rattle 0.02-0.07 Å; like QMugs' off-equilibrium drug-like conformers",
                 "GFN2-xTB (tblite)", "energy+forces", "smiles", _qmugs, ("rdkit", "tblite", "moses")),
    SubsetRecipe("t1x_xtb", f"small molecules (2-{T1X_MAX_HEAVY} heavy atoms: BRICS fragments of MOSES molecules, "
                 "capped with H), MMFF94s minimum, displaced along every normal mode with the classical "
                 "amplitude of 300-1000 K; like QM7-X / Transition1x far-from-equilibrium sampling",
                 "GFN2-xTB (tblite)", "energy+forces", "fragments", _t1x, ("rdkit", "tblite", "moses")),
    SubsetRecipe("oc20_emt", "fcc(111)/(100) slabs of 1-2 EMT metals, 3-4 layers, bottom layer fixed, one "
                 "adsorbate (H O N C OH CO NH CH NO CH2 NH2 OOH CH3) on a random site, rattled 0.02-0.12 Å",
                 "ASE EMT", "energy+forces", "none", _oc20, ()),
    SubsetRecipe("oc20_emt_energy", "as oc20_emt, other draws; energy label only", "ASE EMT", "energy", "none",
                 _oc20_energy, ()),
    SubsetRecipe("bulk_gfn1", "periodic bulk and defect cells (>= 8 atoms): elemental crystals over the "
                 "elements periodic GFN1-xTB labels here (docs/corpus.md) and rock-salt binaries, 2% strain, "
                 "vacancy 30%, substitution 20%, rattle 0.02-0.10 Å", "GFN1-xTB, periodic, Γ point (tblite)",
                 "energy+forces", "none", _bulk, ("tblite",)),
)}

# attempts per subset; the unlabelled set is the largest, as in the paper
SCALES: dict[str, dict[str, int]] = {
    "tiny": {"pubchem3d_mmff": 48, "qmugs_xtb": 16, "t1x_xtb": 16, "oc20_emt": 16, "oc20_emt_energy": 8,
             "bulk_gfn1": 12},
    "small": {"pubchem3d_mmff": 4800, "qmugs_xtb": 960, "t1x_xtb": 960, "oc20_emt": 800, "oc20_emt_energy": 400,
              "bulk_gfn1": 480},
    "medium": {"pubchem3d_mmff": 200_000, "qmugs_xtb": 40_000, "t1x_xtb": 40_000, "oc20_emt": 30_000,
               "oc20_emt_energy": 15_000, "bulk_gfn1": 15_000},
}


def attempt_rng(seed: int, subset: str, index: int) -> np.random.Generator:
    """The random stream of one attempt: independent of worker count, part size and scale."""
    import zlib

    return np.random.default_rng([seed, zlib.crc32(subset.encode()), index])
