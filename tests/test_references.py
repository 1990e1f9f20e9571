"""Reference energies (E0s) of a head: least-squares fit (default), zero, an isolated-atoms file,
or given per element, as MACE offers them; every element of the set must get one."""

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from lamm_ds.engine.config import DatasetConfig
from lamm_ds.engine.data import fit_stats
from lamm_ds.ingest import IngestOptions, ingest
from lamm_ds.shards import LmdbDataset

MAX_Z = 30


def _labelled(atoms):
    atoms.calc = EMT()
    atoms.get_potential_energy(), atoms.get_forces()
    return atoms


@pytest.fixture(scope="module")
def alloy(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    frames = []
    for k in range(12):
        a = bulk("Cu", "fcc", a=3.6, cubic=True)
        a.symbols[: k % 4] = "Al"
        a.rattle(0.03, seed=k)
        frames.append(_labelled(a))
    ase.io.write(root / "alloy.xyz", frames)
    ingest([str(root / "alloy.xyz")], root / "ds", IngestOptions(name="alloy", progress=False))
    iso = [_labelled(Atoms(s, positions=[[0, 0, 0]], cell=[20, 20, 20])) for s in ("Cu", "Al")]
    ase.io.write(root / "iso.xyz", iso)
    ase.io.write(root / "iso_cu.xyz", iso[:1])
    return root, LmdbDataset(root / "ds"), {29: iso[0].get_potential_energy(), 13: iso[1].get_potential_energy()}


def test_isolated_atoms_file_sets_the_references(alloy):
    root, ds, e0 = alloy
    st = fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", path=str(root / "ds"),
                                                        references=f"isolated:{root / 'iso.xyz'}"))
    assert st.references[29] == pytest.approx(e0[29]) and st.references[13] == pytest.approx(e0[13])
    assert np.count_nonzero(st.references) == 2
    # the normalisation is fitted on what those references leave
    resid = [(ds[k].energy - sum(e0[int(z)] for z in ds[k].numbers)) / ds[k].natoms for k in range(len(ds))]
    assert st.energy_mean == pytest.approx(np.mean(resid), rel=1e-9)
    fitted = fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", path=str(root / "ds")))
    assert fitted.references[29] != pytest.approx(e0[29])  # the default is the least-squares fit
    assert fit_stats(ds, MAX_Z, 100).references.tolist() == fitted.references.tolist()


def test_zero_and_per_element_references(alloy):
    root, ds, _ = alloy
    zero = fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", references="zero"))
    assert not zero.references.any()
    given = fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", references="zero",
                                                           reference_energies={"Cu": -1.5, "Al": -2.0}))
    assert given.references[29] == -1.5 and given.references[13] == -2.0
    mixed = fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", references=f"isolated:{root / 'iso_cu.xyz'}",
                                                           reference_energies={"Al": -2.0}))
    assert mixed.references[13] == -2.0 and mixed.references[29] != 0


def test_average_references_give_every_element_the_mean_energy_per_atom(alloy):
    _, ds, _ = alloy
    frames = [ds[i] for i in range(len(ds))]
    mean = np.mean([s.energy / s.natoms for s in frames])
    st = fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", references="average"))
    assert st.references[29] == pytest.approx(mean) and st.references[13] == pytest.approx(mean)
    assert np.count_nonzero(st.references) == 2
    given = fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", references="average",
                                                          reference_energies={"Al": -2.0}))
    assert given.references[13] == -2.0 and given.references[29] == pytest.approx(mean)


def test_average_references_need_energies(tmp_path):
    frames = []
    for k in range(3):
        a = _labelled(bulk("Cu", "fcc", a=3.6, cubic=True))
        a.calc.results.pop("energy")
        frames.append(a)
    ase.io.write(tmp_path / "forces_only.xyz", frames)
    ingest([str(tmp_path / "forces_only.xyz")], tmp_path / "ds", IngestOptions(name="fo", progress=False))
    with pytest.raises(ValueError, match=r"dataset 'fo' .*references 'average' needs energies"):
        fit_stats(LmdbDataset(tmp_path / "ds"), MAX_Z, 100, entry=DatasetConfig(name="fo", references="average"))


def test_reference_errors_name_the_dataset_file_and_element(alloy):
    root, ds, _ = alloy
    with pytest.raises(ValueError, match=r"no reference energy for Al \(Z=13\) in .*iso_cu\.xyz"):
        fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", references=f"isolated:{root / 'iso_cu.xyz'}"))
    with pytest.raises(ValueError, match="references must be 'fit', 'average', 'zero' or 'isolated:<file>'"):
        DatasetConfig(name="alloy", references="mean")
    with pytest.raises(ValueError, match="reference_energies needs references 'zero', 'average' or 'isolated"):
        fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", reference_energies={"Cu": -1.0}))
    with pytest.raises(ValueError, match="'Xx' is not an element"):
        fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", references="zero", reference_energies={"Xx": 1}))
    with pytest.raises(ValueError, match="no single-atom structures"):
        fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", references=f"isolated:{root / 'alloy.xyz'}"))


def test_isolated_atoms_file_faults_name_the_file(alloy, tmp_path):
    root, ds, e0 = alloy
    cu = Atoms("Cu", positions=[[0, 0, 0]], cell=[20, 20, 20])
    unlabelled = tmp_path / "no_energy.xyz"
    ase.io.write(unlabelled, [_labelled(Atoms("Al", positions=[[0, 0, 0]], cell=[20, 20, 20])), cu])
    with pytest.raises(ValueError, match=r"no_energy\.xyz: structure 1 .* has no energy"):
        fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", references=f"isolated:{unlabelled}"))
    twice = tmp_path / "twice.xyz"
    other = _labelled(Atoms("Cu", positions=[[0, 0, 0]], cell=[20, 20, 20]))
    other.calc.results["energy"] += 0.5
    ase.io.write(twice, [_labelled(cu.copy()), other])
    with pytest.raises(ValueError, match=r"twice\.xyz: two different energies for the isolated atom Z=29"):
        fit_stats(ds, MAX_Z, 100, entry=DatasetConfig(name="alloy", references=f"isolated:{twice}"))
