"""Denoising pseudo-labels for unlabelled structures (semi-supervised pre-training).

Free atoms are displaced by Gaussian noise ``dx ~ N(0, sigma^2)`` per component; the model is asked
to predict the restoring "force"

    label = -force_scale * (dx - mean_free(dx)) / sigma          (mean_subtraction=True, default)
    label = -force_scale * dx / sigma                             (mean_subtraction=False, old method)

and the positions fed to the model are ``x + dx - mean_free(dx)`` (resp. ``x + dx``), i.e. the
label is always exactly the applied displacement, scaled. Dividing by sigma makes the labels
unit-variance per component independent of sigma, so with the default ``force_scale=1.0`` (eV/Å)
they have the magnitude of typical DFT forces; ``force_scale`` is therefore in eV/Å per sigma.
Centring removes the net translation, which no physical force field can produce (forces of an
isolated or periodic system sum to zero), so the centred labels are learnable by a conservative
model. Fixed atoms get zero noise and a zero label and are excluded from the loss anyway.

Randomness is keyed, not streamed: the noise of a graph is a pure function of
``(seed, epoch, dataset_id, sample_id, draw_id)`` (numpy Philox seeded by a SeedSequence over that
tuple), so it does not depend on batch composition, order, rank, worker or resume point, and the
same structure drawn twice in an epoch (different ``draw_id``) gets different noise. Noise is drawn
for all ``natoms`` atoms (then fixed ones zeroed), so an atom's noise does not depend on which
other atoms are fixed. The neighbour list is not rebuilt: with sigma ~0.05 Å the pre-noise edges
remain a good approximation for smooth-cutoff models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lamm_ds.graphs.batch import AtomsBatch

_M64 = (1 << 64) - 1
# Domain tags keep the noise stream and the labelled-sample coin independent for the same key.
_TAG_NOISE = 0x6E6F697365  # "noise"
_TAG_COIN = 0x636F696E     # "coin"


@dataclass
class DenoiseConfig:
    """sigma: noise std per component (Å). force_scale: label magnitude per unit normalised noise
    (label = -force_scale * (dx - mean dx) / sigma). mean_subtraction: centre the noise over free
    atoms (False = earlier uncentred method, for comparison). labelled_probability: chance that a
    labelled graph is also denoised for a given draw (its labels are then replaced)."""

    sigma: float = 0.05
    force_scale: float = 1.0
    mean_subtraction: bool = True
    labelled_probability: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not 0.0 <= self.labelled_probability <= 1.0:
            raise ValueError(f"labelled_probability must be in [0, 1], got {self.labelled_probability}")


def _rng(tag: int, seed: int, epoch: int, dataset_id: int, sample_id: int, draw_id: int) -> np.random.Generator:
    # Two's complement keeps -1 ("none") ids valid SeedSequence entropy, distinct from every id >= 0.
    key = [int(v) & _M64 for v in (tag, seed, epoch, dataset_id, sample_id, draw_id)]
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(key)))


def graph_noise(cfg: DenoiseConfig, epoch: int, dataset_id: int, sample_id: int, draw_id: int,
                natoms: int) -> np.ndarray:
    """Raw per-atom noise (natoms, 3) float64, std sigma, before fixing/centring; pure function of the key."""
    rng = _rng(_TAG_NOISE, cfg.seed, epoch, dataset_id, sample_id, draw_id)
    return rng.standard_normal((natoms, 3)) * cfg.sigma


def denoise_labelled(cfg: DenoiseConfig, epoch: int, dataset_id: int, sample_id: int, draw_id: int) -> bool:
    """Whether a labelled graph is denoised in this draw; pure function of the key."""
    if cfg.labelled_probability <= 0.0:
        return False
    rng = _rng(_TAG_COIN, cfg.seed, epoch, dataset_id, sample_id, draw_id)
    return bool(rng.random() < cfg.labelled_probability)


def pseudo_displacement(noise: np.ndarray, fixed: np.ndarray, mean_subtraction: bool) -> np.ndarray:
    """Displacement actually applied: noise on free atoms, centred over them if requested; 0 on fixed atoms."""
    d = np.where(fixed[:, None], 0.0, noise)
    free = ~fixed
    if mean_subtraction and free.any():
        d[free] -= d[free].mean(axis=0)
    return d


def apply_denoising(batch: AtomsBatch, cfg: DenoiseConfig, epoch: int) -> AtomsBatch:
    """A new batch where every unlabelled graph (no energy and no forces), plus labelled graphs picked
    with ``labelled_probability``, is noised and carries pseudo-force labels (``has_forces`` and
    ``is_pseudo`` True, ``has_energy``/``has_stress`` False). Other graphs are unchanged."""
    targets = []
    meta = zip(batch.has_energy.tolist(), batch.has_forces.tolist(), batch.dataset_id.tolist(),
               batch.sample_id.tolist(), batch.draw_id.tolist())
    for g, (he, hf, ds, sid, did) in enumerate(meta):
        if not (he or hf) or denoise_labelled(cfg, epoch, ds, sid, did):
            targets.append((g, ds, sid, did))
    if not targets:
        return batch

    starts = (torch.cumsum(batch.natoms, 0) - batch.natoms).tolist()
    natoms = batch.natoms.tolist()
    fixed_all = batch.fixed.cpu().numpy()
    atom_idx, disp = [], []
    for g, ds, sid, did in targets:
        a0, n = starts[g], natoms[g]
        noise = graph_noise(cfg, epoch, ds, sid, did, n)
        disp.append(pseudo_displacement(noise, fixed_all[a0:a0 + n], cfg.mean_subtraction))
        atom_idx.append(np.arange(a0, a0 + n))
    dev, dt = batch.pos.device, batch.pos.dtype
    atoms = torch.as_tensor(np.concatenate(atom_idx), device=dev)
    d64 = np.concatenate(disp)
    label = torch.as_tensor(-cfg.force_scale / cfg.sigma * d64, device=dev, dtype=batch.forces.dtype)
    graphs = torch.as_tensor([t[0] for t in targets], device=dev)

    pos = batch.pos.clone()
    pos[atoms] = (pos[atoms].to(torch.float64) + torch.as_tensor(d64, device=dev)).to(dt)
    forces = batch.forces.clone()
    forces[atoms] = label
    energy, stress = batch.energy.clone(), batch.stress.clone()
    energy[graphs] = 0
    stress[graphs] = 0

    def set_flag(t: torch.Tensor, value: bool) -> torch.Tensor:
        t = t.clone()
        t[graphs] = value
        return t

    return batch.replace(
        pos=pos, forces=forces, energy=energy, stress=stress,
        has_forces=set_flag(batch.has_forces, True), is_pseudo=set_flag(batch.is_pseudo, True),
        has_energy=set_flag(batch.has_energy, False), has_stress=set_flag(batch.has_stress, False),
    )
