"""Energies and forces (and stress for periodic cells) from tblite's GFN1/GFN2-xTB ASE calculator,
or ASE's EMT; failures become countable :class:`~lamm_ds.corpus.molecules.Rejected` reasons."""

from __future__ import annotations

import numpy as np

from lamm_ds.corpus.molecules import Rejected

XTB_ACCURACY = 1.0
XTB_MAX_ITERATIONS = 250
MAX_FORCE = 50.0  # eV/Å: larger means the SCF landed somewhere unphysical (or the geometry is broken)


def xtb_calculator(method: str, atoms):
    """tblite's calculator, quiet, with settings fixed here so a direct call can reproduce a label:
    neutral, lowest spin multiplicity for the electron count (core shells are paired, so the parity
    of the valence electrons is that of sum(Z)), Fermi smearing of 1000 K for periodic cells."""
    from tblite.ase import TBLite

    multiplicity = 1 + int(atoms.numbers.sum()) % 2
    return TBLite(method=method, accuracy=XTB_ACCURACY, max_iterations=XTB_MAX_ITERATIONS, verbosity=0,
                  charge=0, multiplicity=multiplicity,
                  electronic_temperature=300.0 if not atoms.pbc.any() else 1000.0)


def label(atoms, method: str, what: str, stress: bool = False):
    """``atoms`` with a single-point calculator holding energy, forces (and stress); ``method`` is
    ``GFN2-xTB``, ``GFN1-xTB`` or ``EMT``."""
    from ase.calculators.singlepoint import SinglePointCalculator

    if method == "EMT":
        from ase.calculators.emt import EMT

        atoms.calc = EMT()
    else:
        atoms.calc = xtb_calculator(method, atoms)
    try:
        # the physical forces on fixed atoms too (as OC20 stores them); the loss leaves fixed atoms out
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(apply_constraint=False)}
        if stress:
            results["stress"] = atoms.get_stress()
    except Exception as exc:  # tblite raises its own error for an SCF that does not converge
        reason = "xtb_not_converged" if "converge" in str(exc).lower() else "calculator_failed"
        raise Rejected(reason, f"{what}: {method}: {str(exc).strip()[:200]}") from None
    values = [np.asarray(v, dtype=float) for v in results.values()]
    if not all(np.all(np.isfinite(v)) for v in values):
        raise Rejected("label_nonfinite", f"{what}: {method} gave non-finite results")
    fmax = float(np.abs(results["forces"]).max()) if len(atoms) else 0.0
    if fmax > MAX_FORCE:
        raise Rejected("label_force_too_large", f"{what}: {method} force component {fmax:.1f} eV/Å > {MAX_FORCE}")
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms
