"""OC20-like catalyst cells: fcc metal slabs (alloyed) with a small adsorbate on a random site,
bottom layer fixed, rattled as in a relaxation trajectory; labelled with ASE's EMT."""

from __future__ import annotations

import numpy as np

# EMT's parameterised elements (ASE): the metals and the adsorbate atoms
EMT_METALS = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")
LATTICE = {"Al": 4.05, "Ni": 3.52, "Cu": 3.61, "Pd": 3.89, "Ag": 4.09, "Pt": 3.92, "Au": 4.08}
ADSORBATES = ("H", "O", "N", "C", "OH", "CO", "NH", "CH", "NO", "CH2", "NH2", "OOH", "CH3")
SITES = {"fcc111": ("ontop", "bridge", "fcc", "hcp"), "fcc100": ("ontop", "bridge", "hollow")}
# adsorbate height above the surface plane by site (Å): metal-adsorbate bonds of about 1.8-2.1 Å
HEIGHTS = {"ontop": (1.7, 2.1), "bridge": (1.3, 1.8), "fcc": (1.0, 1.5), "hcp": (1.0, 1.5), "hollow": (0.9, 1.4)}


def _adsorbate(name: str):
    """The adsorbate with its binding atom (the first) at the origin and the rest above it."""
    ads = _adsorbate_geometry(name)
    if len(ads) > 1:
        ads.positions -= ads.positions[0]
        up = ads.positions[1:].mean(axis=0)
        if np.linalg.norm(up) > 1e-6:
            ads.rotate(up, "z")
    return ads


def _adsorbate_geometry(name: str):
    from ase import Atoms
    from ase.build import molecule

    if len(name) == 1:
        return Atoms(name)
    table = {"OH": "OH", "NO": "NO", "CH2": "CH2_s1A1d", "NH2": "NH2"}
    if name in table:
        return molecule(table[name])
    if name == "CO":  # carbon-bound, as on metals
        return Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.13)])
    if name == "CH3":  # methane less one hydrogen: the open valence points at the surface
        ch4 = molecule("CH4")
        del ch4[1]
        return ch4
    if name == "NH":
        return Atoms("NH", positions=[(0, 0, 0), (0, 0, 1.04)])
    if name == "CH":
        return Atoms("CH", positions=[(0, 0, 0), (0, 0, 1.12)])
    if name == "OOH":
        return Atoms("OOH", positions=[(0, 0, 0), (0.9, 0, 1.0), (0.9, 0.95, 1.3)])
    raise KeyError(name)


def slab_with_adsorbate(rng: np.random.Generator):
    """A 2x2..3x3, 3..4-layer (111) or (100) slab of one or two EMT metals with one adsorbate."""
    from ase.build import add_adsorbate, fcc100, fcc111
    from ase.constraints import FixAtoms

    facet = "fcc111" if rng.random() < 0.6 else "fcc100"
    metals = list(rng.choice(EMT_METALS, size=int(rng.integers(1, 3)), replace=False))
    a = float(np.mean([LATTICE[m] for m in metals]))
    size = (int(rng.integers(2, 4)), int(rng.integers(2, 4)), int(rng.integers(3, 5)))
    build = fcc111 if facet == "fcc111" else fcc100
    slab = build(metals[0], size=size, a=a, vacuum=7.0)
    slab.set_chemical_symbols(list(rng.choice(metals, size=len(slab))))
    name = str(rng.choice(ADSORBATES))
    site = str(rng.choice(SITES[facet]))
    add_adsorbate(slab, _adsorbate(name), height=float(rng.uniform(*HEIGHTS[site])), position=site)
    slab.info.pop("adsorbate_info", None)
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == size[2]))  # the bottom layer (tag = layer number)
    free = slab.get_tags() != size[2]
    slab.set_tags(0)  # ASE numbers layers from the top; nothing downstream reads these tags
    sigma = float(rng.uniform(0.02, 0.12))
    # adsorbate atoms (appended last) get half the width: EMT's X-H bonds are stiff
    width = np.where(np.arange(len(slab)) >= len(slab) - len(_adsorbate(name)), 0.5 * sigma, sigma)[free]
    slab.positions[free] += rng.normal(0.0, 1.0, size=(int(free.sum()), 3)) * width[:, None]
    slab.info.update({"facet": facet, "adsorbate": name, "site": site, "metals": "-".join(sorted(metals)),
                      "rattle_sigma": sigma})
    return slab
