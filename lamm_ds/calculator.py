"""ASE calculator for lamm-ds potentials: molecular dynamics, relaxations and single points.

>>> from lamm_ds.calculator import LammCalculator
>>> atoms.calc = LammCalculator("model.safetensors", head="mptrj")   # doctest: +SKIP
>>> atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()  # doctest: +SKIP

Units are ASE's: energy eV, forces eV/Å, stress eV/Å^3 as a Voigt 6-vector (xx, yy, zz, yz, xz, xy)
with ASE's sign convention (positive = tensile). See ``docs/calculator.md``.
"""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from lamm_ds.graphs.collate import build_sample, collate
from lamm_ds.model.potential import Potential
from lamm_ds.neighbors import MIN_INTERATOMIC_DISTANCE, Graph, shortest_distance
from lamm_ds.structure import Structure

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_MIN_VOLUME = 1e-6  # Å^3, as in Potential: a smaller "periodic" cell gets no stress

STRESS_HINT = ("export a model trained with model.forces=conservative model.stress=true (stress as the "
               "strain derivative of the energy), or use an EquiformerV2 model with a direct stress head "
               "(equiformer_v2.stress_head=true, e.g. convert-fairchem of an OMat24 checkpoint)")


class NonConservativeForcesWarning(UserWarning):
    """The model predicts forces directly: they are not the gradient of its energy."""


class UnseenElementsWarning(UserWarning):
    """``allow_unseen_elements=True`` and a structure holds elements the head was not trained on."""


class NonFiniteOutputError(RuntimeError):
    """The model returned NaN or inf energy, forces or stress; nothing is stored in ``results``."""


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        return _DTYPES[key]
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


class LammCalculator(Calculator):
    """ASE calculator around a :class:`~lamm_ds.model.potential.Potential`.

    Parameters
    ----------
    model:
        Path of an exported model file (``lamm_ds.engine.export.export_model``) or a ``Potential``.
        A ``Potential`` is used as is when it already has the requested device and dtype (it is put
        in eval mode for each calculation and its train/eval mode restored afterwards); otherwise a
        converted copy is made, so the caller's module is never changed.
    head:
        Dataset whose energy head, reference energies and normalisation are used (a model trained
        on several datasets has one head per dataset, i.e. per level of theory). Required when the model has several heads (an error lists them); a single-head model uses its head.
    device:
        Torch device; default ``"cuda"`` when available, else ``"cpu"``.
    dtype:
        ``torch.float32`` (default) or ``torch.float64`` (or the strings ``"float32"``/``"float64"``);
        both the model and the geometry are evaluated in it. float64 gives smoother finite
        differences and tighter energy conservation in long NVE runs, at a higher cost.
    neighbor_backend:
        Neighbour-list library passed to :func:`lamm_ds.neighbors.radius_graph`.
    compile:
        ``True`` runs the model through ``torch.compile(dynamic=True)`` (inductor): the first
        evaluation compiles (about 10-30 s on a CPU; a C++ compiler is needed there), later ones
        are 1.6-1.9x faster on a CPU for 9-64 atoms (``bench/calculator_speed.py``). Results equal
        the eager model's to float rounding. A compilation failure raises ``RuntimeError`` naming
        the cause; ``compile=False`` (default) is the eager model.
    allow_unseen_elements:
        A model file that records which elements each head was trained on (``trained_elements``)
        makes a structure with other elements raise ``ValueError`` (``UnseenElementsError``);
        ``True`` computes it anyway, with one ``UnseenElementsWarning`` per new element.
    **kwargs:
        Passed to :class:`ase.calculators.calculator.Calculator` (``label``, ``directory``, ...).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: str | os.PathLike | Potential, head: str | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | str = torch.float32,
                 neighbor_backend: str = "vesin", allow_unseen_elements: bool = False, compile: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.allow_unseen_elements = bool(allow_unseen_elements)
        self._warned_unseen: set[int] = set()
        self.dtype = _as_dtype(dtype)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.neighbor_backend = neighbor_backend
        if isinstance(model, Potential):
            ref = next(model.parameters())
            same_device = ref.device.type == self.device.type and self.device.index in (None, ref.device.index)
            if ref.dtype != self.dtype or not same_device:
                model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype).eval()  # our copy
        elif isinstance(model, (str, os.PathLike)):
            from lamm_ds.engine.export import load_model

            model = load_model(model, device=self.device).to(dtype=self.dtype).eval()
        else:
            raise TypeError(f"model must be a path to an exported model or a Potential, got {type(model).__name__}")
        self.model: Potential = model
        self.compile = bool(compile)
        self._compiled = None
        self._compiled_ok = False
        self.heads: list[str] = model.dataset_names
        if head is None:
            if len(self.heads) > 1:  # each head is a level of theory: guessing one gives wrong energies
                raise ValueError(f"this model has {len(self.heads)} energy heads ({', '.join(self.heads)}); "
                                 "choose one with head=...")
            head = self.heads[0]
        if head not in self.heads:
            raise ValueError(f"unknown head {head!r}; this model has heads: {', '.join(self.heads)}")
        self.head = head
        self.dataset_id = model.dataset_index(head)
        cfg = model.cfg
        self.cutoff = float(cfg.cutoff)
        self.max_neighbors = cfg.max_neighbors
        self.max_neighbors_strict = cfg.max_neighbors_strict
        self.conservative = cfg.forces == "conservative"
        # stress as the strain derivative (conservative + cfg.stress) or from EquiformerV2's direct
        # rank-2 head (cfg.stress_head): the model's forward returns it either way
        self.direct_stress = bool(getattr(cfg, "stress_head", False))
        self.has_stress = (self.conservative and bool(getattr(cfg, "stress", False))) or self.direct_stress
        if not self.conservative:
            warnings.warn(
                "this model predicts forces directly (model.forces=direct): they are not the gradient of "
                "its energy, so total energy is not conserved in molecular dynamics (NVE drifts; use a "
                "thermostat, or a model trained with model.forces=conservative)",
                NonConservativeForcesWarning, stacklevel=2)

    # -- helpers -----------------------------------------------------------------------------------

    def _structure(self, atoms) -> Structure:
        numbers = np.asarray(atoms.numbers)
        max_z = self.model.cfg.max_z
        if numbers.size and (numbers.min() < 1 or numbers.max() > max_z):
            bad = sorted({int(z) for z in numbers if z < 1 or z > max_z})
            raise ValueError(f"atomic numbers {bad} are outside the model's range 1..{max_z}")
        self._check_elements(numbers)
        s = Structure(numbers, atoms.positions, np.asarray(atoms.cell[:]), atoms.pbc)
        problems = [p for p in s.problems() if "atomic numbers" not in p]
        if problems:
            raise ValueError(f"cannot evaluate this structure: {'; '.join(problems)}")
        return s

    def _check_elements(self, numbers) -> None:
        from lamm_ds.engine.export import (UnseenElementsError, format_elements, unseen_elements,
                                           unseen_elements_message)

        unseen = unseen_elements(self.model, self.head, numbers)
        if not unseen:
            return
        if not self.allow_unseen_elements:
            raise UnseenElementsError(unseen_elements_message(self.model, self.head, unseen, "LammCalculator"))
        new = sorted(set(unseen) - self._warned_unseen)
        if new:
            self._warned_unseen.update(new)
            warnings.warn(f"head {self.head!r} was not trained on {format_elements(new)}: results for this "
                          f"structure are not meaningful", UnseenElementsWarning, stacklevel=4)

    @staticmethod
    def _check_distances(sample) -> None:
        """Atoms on (almost) the same spot give NaN or huge forces: refuse them with the pair named."""
        st = sample.structure
        short = shortest_distance(st.positions, st.cell, Graph(sample.edge_i, sample.edge_j, sample.shifts))
        if short.distance < MIN_INTERATOMIC_DISTANCE:
            image = f" (periodic image shift {list(short.shift)})" if any(short.shift) else ""
            raise ValueError(f"atoms {short.i} and {short.j}{image} are {short.distance:.4g} Å apart, closer than "
                             f"{MIN_INTERATOMIC_DISTANCE} Å: overlapping atoms (a duplicated atom or a unit "
                             f"mix-up?) cannot be evaluated")

    @staticmethod
    def _check_finite(out: dict[str, torch.Tensor], natoms: int) -> None:
        bad = []
        for key in ("energy", "forces", "stress"):
            if key in out and not bool(torch.isfinite(out[key]).all()):
                if key == "forces":
                    rows = torch.nonzero(~torch.isfinite(out[key]).all(dim=1)).reshape(-1).tolist()
                    bad.append(f"forces on {len(rows)} of {natoms} atoms (e.g. atom {rows[0]})")
                else:
                    bad.append(key)
        if bad:
            raise NonFiniteOutputError(f"the model returned non-finite (NaN/inf) {', '.join(bad)} for this structure; "
                                       f"nothing was stored (check the geometry and the model file)")

    def _stress_allowed(self, atoms) -> bool:
        return bool(np.any(atoms.pbc)) and abs(float(np.linalg.det(atoms.cell[:]))) > _MIN_VOLUME

    def _runner(self):
        if not self.compile:
            return self.model
        if self._compiled is None:
            self._compiled = torch.compile(self.model, dynamic=True)
        return self._compiled

    def _forward(self, sample) -> dict[str, torch.Tensor]:
        model = self.model
        was_training = model.training
        if was_training:  # eval()/train() walk every submodule: only when the mode must change
            model.eval()
        try:
            # Conservative forces/stress are autograd derivatives that Potential.forward takes with
            # grad switched on inside itself, also under no_grad (the caller's no_grad only means
            # that no graph is kept afterwards). Inference mode is left, because inference tensors
            # cannot require grad; the batch is built outside it too.
            with torch.inference_mode(False), torch.no_grad():
                batch = collate([sample], dtype=self.dtype).to(device=self.device)
                try:
                    out = self._runner()(batch)
                except Exception as exc:  # inductor/dynamo errors have many types
                    if self.compile and not self._compiled_ok:  # the first compiled call compiles
                        raise RuntimeError(f"torch.compile of the model failed ({type(exc).__name__}: {exc}); "
                                           "use LammCalculator(..., compile=False)") from exc
                    raise
                self._compiled_ok = self.compile
                return out
        finally:
            if was_training:
                model.train()

    # -- ASE interface -----------------------------------------------------------------------------

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if "stress" in properties:
            if not self.has_stress:
                mode = "direct forces and no stress head" if not self.conservative \
                    else "conservative forces without stress"
                raise PropertyNotImplementedError(
                    f"this model cannot compute stress (it was trained with {mode}); {STRESS_HINT}")
            if not self._stress_allowed(atoms):
                raise PropertyNotImplementedError(
                    "stress needs a periodic cell with non-zero volume (set atoms.cell and atoms.pbc)")

        # A new neighbour list for every geometry: ASE only calls calculate() when the atoms changed.
        sample = build_sample(self._structure(atoms), self.cutoff, self.max_neighbors,
                              dataset_id=self.dataset_id, backend=self.neighbor_backend,
                              strict=self.max_neighbors_strict)
        self._check_distances(sample)
        out = self._forward(sample)
        self._check_finite(out, len(atoms))

        energy = float(out["energy"].detach()[0].double().cpu())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = out["forces"].detach().double().cpu().numpy()
        # The model computes stress with the forces at little extra cost: keep it whenever it is
        # defined, so a later get_stress() on the same geometry needs no second evaluation.
        if self.has_stress and "stress" in out and self._stress_allowed(atoms):
            full = out["stress"].detach()[0].double().cpu().numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(full)
