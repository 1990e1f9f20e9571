"""``lamm-ds predict``: a model's energy, forces and stress for every input structure, written as
extended XYZ beside the structure's reference labels (the habit of MACE's ``eval_configs``), so any
tool can compare them.

Keys written per frame: ``lamm_energy`` (eV), ``lamm_forces`` (eV/Å, per atom), ``lamm_stress``
(eV/Å^3, models that compute stress; a Voigt 6-vector in ASE's order xx yy zz yz xz xy, as
``Atoms.get_stress`` returns it); the reference labels as ``REF_energy``, ``REF_forces``,
``REF_stress`` where the input has them; ``head`` (the energy head used) and the input's own scalar
``info`` (``config_type`` among them). No calculator is attached, so no key is ambiguous.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lamm_ds.engine.evaluate import batch_outputs, check_elements, choose_head, load_structures
from lamm_ds.model.potential import Potential
from lamm_ds.structure import Structure

PREDICTED = "lamm"
REFERENCE = "REF"


@dataclass
class PredictReport:
    out: str
    structures: int
    per_source: dict[str, tuple[int, str]]  # source -> (structures, head)


def to_atoms(s: Structure, energy: float, forces: np.ndarray, stress: np.ndarray | None, head: str):
    """One output frame: the structure, its reference labels as REF_*, the predictions as lamm_*."""
    from ase import Atoms
    from ase.constraints import FixAtoms
    from ase.stress import full_3x3_to_voigt_6_stress

    atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
    if s.tags is not None:
        atoms.set_tags(s.tags)
    if s.fixed is not None and s.fixed.any():
        atoms.set_constraint(FixAtoms(mask=s.fixed))
    atoms.info.update(s.info)
    atoms.info["head"] = head
    if s.energy is not None:
        atoms.info[f"{REFERENCE}_energy"] = float(s.energy)
    if s.stress is not None:
        atoms.info[f"{REFERENCE}_stress"] = full_3x3_to_voigt_6_stress(np.asarray(s.stress, dtype=np.float64))
    if s.forces is not None:
        atoms.new_array(f"{REFERENCE}_forces", np.asarray(s.forces, dtype=np.float64))
    atoms.info[f"{PREDICTED}_energy"] = float(energy)
    atoms.new_array(f"{PREDICTED}_forces", np.asarray(forces, dtype=np.float64))
    if stress is not None:
        atoms.info[f"{PREDICTED}_stress"] = full_3x3_to_voigt_6_stress(np.asarray(stress, dtype=np.float64))
    return atoms


def predict_to_extxyz(model: Potential, sources: Sequence[str | Path], out: str | Path, head: str | None = None,
                      batch_size: int = 16, allow_unseen_elements: bool = False, force: bool = False) -> PredictReport:
    """Predict every structure of ``sources`` and write ``out`` (extxyz) atomically.

    Every source is loaded and checked (head, elements) before anything is predicted; a non-finite
    prediction is an error naming the structure; ``out`` appears only when complete."""
    import ase.io

    out = Path(out)
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    inputs = []
    from lamm_ds.shards import is_dataset_dir

    for source in sources:
        name, structures = load_structures(source, require_labels=False)
        # only a lamm-ds dataset's manifest name may select a head: a file's stem says nothing
        chosen = choose_head(model, name if is_dataset_dir(source) else None, head, what=str(source),
                             hint="pass --head NAME")
        if not allow_unseen_elements:
            check_elements(model, chosen, structures, str(source), override="--allow-unseen-elements")
        inputs.append((str(source), structures, chosen))
    was_training = model.training
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.predict-{os.getpid()}"
    per_source, total = {}, 0
    try:
        with open(tmp, "w") as fh:
            for source, structures, chosen in inputs:
                dataset_id = model.dataset_index(chosen)
                n = len(structures)
                for start in range(0, n, batch_size):
                    chunk = [structures[k] for k in range(start, min(n, start + batch_size))]
                    energy, forces, stress = batch_outputs(model, chunk, dataset_id)
                    frames = [to_atoms(s, float(energy[g]), forces[g], None if stress is None else stress[g].numpy(),
                                       chosen)
                              for g, s in enumerate(chunk)]
                    ase.io.write(fh, frames, format="extxyz")
                per_source[source] = (n, chosen)
                total += n
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        model.train(was_training)
    return PredictReport(str(out), total, per_source)
