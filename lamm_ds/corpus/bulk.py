"""Periodic bulk and defect cells across the periodic table (the element coverage of the paper's
Figure 3 in miniature): elemental crystals in their ASE reference structure (fcc where ASE has
none we can build), and rock-salt binaries; strained, rattled, with vacancies and substitutions;
labelled with periodic GFN1-xTB (tblite).

Which elements GFN1-xTB labels here was measured by :func:`survey` (``python -m
lamm_ds.corpus.bulk``, docs/corpus.md); :data:`BULK_ELEMENTS` holds the ones that passed.
"""

from __future__ import annotations

import numpy as np

# Survey of 2026-12-02 (bench/results/corpus_element_survey.jsonl, docs/corpus.md): three perturbed
# cells per element; kept where all three were labelled with every force component <= 20 eV/Å.
# Absent: H He O F Cl (no sensible elemental crystal here: huge forces), K Rb Cs Ba Ga In and Ce-Yb
# but Ho Er Tm (SCF not converging or failing in tblite, or forces > 50 eV/Å).
BULK_ELEMENTS: tuple[str, ...] = (
    "Li", "Be", "B", "C", "N", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Ar", "Ca", "Sc", "Ti", "V", "Cr", "Mn",
    "Fe", "Co", "Ni", "Cu", "Zn", "Ge", "As", "Se", "Br", "Kr", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh",
    "Pd", "Ag", "Cd", "Sn", "Sb", "Te", "I", "Xe", "La", "Ho", "Er", "Tm", "Lu", "Hf", "Ta", "W", "Re", "Os",
    "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn")
SURVEY_MAX_FORCE = 20.0  # eV/Å
# Cs and Ba salts failed in tblite in the survey (SCF or eigensolver), so they are not drawn
ROCKSALT_CATIONS = ("Li", "Na", "K", "Rb", "Mg", "Ca", "Sr")
SURVEY_CATIONS = ROCKSALT_CATIONS + ("Cs", "Ba")
ROCKSALT_ANIONS = {1: ("F", "Cl", "Br", "I"), 2: ("O", "S", "Se", "Te")}
_VALENCE = {"Li": 1, "Na": 1, "K": 1, "Rb": 1, "Cs": 1, "Mg": 2, "Ca": 2, "Sr": 2, "Ba": 2}
_BUILDABLE = ("fcc", "bcc", "hcp", "diamond", "sc")
MIN_ATOMS = 8


def elemental_cell(symbol: str):
    """The element's ASE reference crystal when ASE can build it, else fcc at twice the covalent radius."""
    from ase.build import bulk
    from ase.data import atomic_numbers, covalent_radii, reference_states

    state = reference_states[atomic_numbers[symbol]] or {}
    if state.get("symmetry") in _BUILDABLE:
        try:
            return bulk(symbol), state["symmetry"]
        except ValueError:  # e.g. a reference crystal that needs a basis ASE does not store
            pass
    nn = 2.0 * covalent_radii[atomic_numbers[symbol]]
    return bulk(symbol, "fcc", a=nn * np.sqrt(2.0)), "fcc (no ASE reference crystal)"


def rocksalt_cell(cation: str, anion: str):
    from ase.build import bulk
    from ase.data import atomic_numbers, covalent_radii

    a = 2.0 * (covalent_radii[atomic_numbers[cation]] + covalent_radii[atomic_numbers[anion]])
    return bulk(cation + anion, "rocksalt", a=a), "rocksalt"


def _supercell(atoms, rng: np.random.Generator):
    reps = [1, 1, 1]
    while len(atoms) * int(np.prod(reps)) < MIN_ATOMS:
        lengths = atoms.cell.lengths() * reps
        reps[int(np.argmin(lengths))] += 1
    return atoms * tuple(reps)


def perturbed(atoms, rng: np.random.Generator, substitutes: tuple[str, ...] = ()):
    """Supercell of at least :data:`MIN_ATOMS`, symmetric strain (2%), a vacancy (30%), a substitution
    (20%, from ``substitutes``) and a Gaussian rattle of random width."""
    atoms = _supercell(atoms, rng)
    strain = rng.normal(0.0, 0.02, size=(3, 3))
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
    defects = []
    if rng.random() < 0.3:
        k = int(rng.integers(len(atoms)))
        defects.append(f"vacancy {atoms[k].symbol}")
        del atoms[k]
    if substitutes and rng.random() < 0.2:
        k = int(rng.integers(len(atoms)))
        new = str(rng.choice(substitutes))
        defects.append(f"{atoms[k].symbol}->{new}")
        atoms[k].symbol = new
    sigma = float(rng.uniform(0.02, 0.10))
    atoms.positions += rng.normal(0.0, sigma, size=atoms.positions.shape)
    atoms.info.update({"defects": ", ".join(defects) or "none", "rattle_sigma": sigma})
    return atoms


def random_cell(rng: np.random.Generator, elements: tuple[str, ...] | None = None):
    """Half elemental crystals over ``elements`` (default :data:`BULK_ELEMENTS`), half rock-salt binaries."""
    elements = elements or BULK_ELEMENTS
    if rng.random() < 0.5 or not elements:
        cation = str(rng.choice(ROCKSALT_CATIONS))
        anion = str(rng.choice(ROCKSALT_ANIONS[_VALENCE[cation]]))
        atoms, kind = rocksalt_cell(cation, anion)
        subs = ROCKSALT_ANIONS[_VALENCE[cation]]
    else:
        symbol = str(rng.choice(elements))
        atoms, kind = elemental_cell(symbol)
        subs = tuple(e for e in elements if e != symbol)
    atoms = perturbed(atoms, rng, subs)
    atoms.info["prototype"] = kind
    return atoms


def survey(max_z: int = 86, samples: int = 3, seed: int = 0) -> list[dict]:
    """Label ``samples`` perturbed cells per element (elemental) and per rock-salt pair with periodic
    GFN1-xTB; a row per cell kind: how many labelled, why the others failed, seconds per cell."""
    import time

    from ase.data import chemical_symbols

    from lamm_ds.corpus.molecules import Rejected
    from lamm_ds.corpus.xtb import label

    kinds = [(chemical_symbols[z], lambda s=chemical_symbols[z]: elemental_cell(s)) for z in range(1, max_z + 1)]
    kinds += [(c + a, lambda c=c, a=a: rocksalt_cell(c, a)) for c in SURVEY_CATIONS
              for a in ROCKSALT_ANIONS[_VALENCE[c]]]
    rows = []
    for k, (name, build) in enumerate(kinds):
        ok, reasons, seconds, fmax = 0, {}, 0.0, 0.0
        for i in range(samples):
            atoms, prototype = build()
            atoms = perturbed(atoms, np.random.default_rng([seed, k, i]))
            t0 = time.perf_counter()
            try:
                label(atoms, "GFN1-xTB", name, stress=True)
                ok += 1
                fmax = max(fmax, float(np.abs(atoms.get_forces()).max()))
            except Rejected as exc:
                reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            seconds += time.perf_counter() - t0
        rows.append({"cell": name, "prototype": prototype, "labelled": ok, "of": samples, "failures": reasons,
                     "max_force": round(fmax, 2), "seconds_per_cell": round(seconds / samples, 2)})
    return rows


if __name__ == "__main__":
    import json
    import sys

    for r in survey():
        print(json.dumps(r), flush=True)
    sys.exit(0)
