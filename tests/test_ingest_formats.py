"""Readers for the paper's datasets in their published layouts (issue 16): every field round-trips
through `lamm-ds ingest` into a dataset, in eV / Å, with the energy kind and the level of theory
recorded in the manifest. Files are written in each dataset's own layout by tests/dataset_files.py."""

import numpy as np
import pytest

import dataset_files as files
from lamm_ds.cli import main as cli_main
from lamm_ds.shards import LmdbDataset


def _ingest(capsys, tmp_path, src, *flags, out="ds"):
    rc = cli_main(["ingest", str(src), "--out", str(tmp_path / out), "--name", "t", "--quiet", *map(str, flags)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return LmdbDataset(tmp_path / out), captured.out


def _check(ds, expected, energy="energy", atol=1e-9):
    assert len(ds) == len(expected)
    for k, want in enumerate(expected):
        s = ds[k]
        if "numbers" in want:
            assert s.numbers.tolist() == list(want["numbers"])
        np.testing.assert_allclose(s.positions, want["positions"], atol=atol)
        if energy is None:
            assert s.energy is None
        else:
            assert s.energy == pytest.approx(want[energy], abs=1e-9)
        for name in ("forces", "stress", "cell"):
            if name in want:
                np.testing.assert_allclose(getattr(s, name) if name != "stress" else s.stress,
                                           _matrix(want[name]) if name == "stress" else want[name], atol=1e-9)
        yield s


def _matrix(stress):
    from lamm_ds.structure import voigt_to_matrix

    return voigt_to_matrix(np.asarray(stress))


def _ingest_info(ds):
    return ds.manifest["ingest"]["formats"]


# --------------------------------------------------------------------------------------------- HDF5

def test_transition1x_total_and_atomization(tmp_path, capsys):
    pytest.importorskip("h5py")
    src, expected = files.transition1x(tmp_path / "transition1x.h5")
    ds, out = _ingest(capsys, tmp_path, src)
    structures = list(_check(ds, expected))
    assert [s.info["part"] for s in structures[:5]] == ["reactant", "product", "path", "path", "path"]
    assert {s.info["split"] for s in structures} == {"train", "val"}
    assert not structures[0].pbc.any() and np.all(structures[0].cell == 0)
    assert ds.manifest["level_of_theory"] == "wB97x/6-31G(d)"
    assert _ingest_info(ds)["transition1x"]["energy"]["kind"] == "total"
    assert "format transition1x: 1 file(s); energy: total" in out

    ds, _ = _ingest(capsys, tmp_path, src, "--energy-kind", "atomization", "--split", "val", out="ds2")
    val = [e for e in expected if e["split"] == "val"]
    refs = {1: -13.62222753701504, 6: -1029.4130839658328, 8: -2041.8396277138045}
    for e in val:
        e["atomization"] = e["energy"] - sum(refs[z] for z in e["numbers"])
    list(_check(ds, val, energy="atomization"))
    assert ds.manifest["ingest"]["split"] == "val"


def test_qm7x_total_and_atomization(tmp_path, capsys):
    pytest.importorskip("h5py")
    src, expected = files.qm7x(tmp_path / "1000.hdf5")
    ds, _ = _ingest(capsys, tmp_path, src)
    structures = list(_check(ds, expected))
    assert structures[0].info == {"mol_id": "1", "conf_id": "Geom-m1-i1-c1-d0"}
    assert ds.manifest["level_of_theory"] == "PBE0+MBD (FHI-aims, QM7-X)"
    ds, _ = _ingest(capsys, tmp_path, src, "--energy-kind", "atomization", out="ds2")
    list(_check(ds, expected, energy="atomization"))
    assert _ingest_info(ds)["qm7x"]["energy"]["source_key"] == "eAT"


def test_ani1x_hartree_to_ev_and_other_methods(tmp_path, capsys):
    pytest.importorskip("h5py")
    src, expected = files.ani1x(tmp_path / "ani1x-release.h5")
    ds, _ = _ingest(capsys, tmp_path, src)
    list(_check(ds, expected))
    assert ds.manifest["level_of_theory"] == "wB97x/6-31G(d) (Gaussian, ANI-1x)"
    # CCSD(T) energies exist for some conformers only and come without forces (none at that level)
    ds, out = _ingest(capsys, tmp_path, src, "--energy-key", "ccsd(t)_cbs.energy", out="ds2")
    kept = [dict(e, forces=None) for e in expected if not np.isnan(e["ccsd"])]
    assert len(ds) == len(kept) == 4
    for s, e in zip(ds, kept):
        assert s.energy == pytest.approx(e["ccsd"]) and s.forces is None
    assert ds.manifest["level_of_theory"] == "CCSD(T)*/CBS (ORCA, ANI-1ccx)"
    assert "skipped 2 conformers without a ccsd(t)_cbs.energy value" in out
    assert ds.manifest["ingest"]["notes"]


def test_spice_atomic_units_and_gradient_sign(tmp_path, capsys):
    pytest.importorskip("h5py")
    src, expected = files.spice(tmp_path / "SPICE-2.0.1.hdf5")
    ds, _ = _ingest(capsys, tmp_path, src)
    structures = list(_check(ds, expected, atol=1e-6))
    assert [s.info["charge"] for s in structures] == [e["charge"] for e in expected]
    assert structures[0].info["subset"].startswith("SPICE PubChem")
    assert ds.manifest["level_of_theory"] == "wB97M-D3(BJ)/def2-TZVPPD (Psi4, SPICE)"
    ds, _ = _ingest(capsys, tmp_path, src, "--energy-kind", "formation", out="ds2")
    list(_check(ds, expected, energy="formation", atol=1e-6))


# ---------------------------------------------------------------------------------------------- SDF

def test_qmugs_sdf_energies(tmp_path, capsys):
    pytest.importorskip("rdkit")
    src, expected = files.qmugs(tmp_path)
    ds, _ = _ingest(capsys, tmp_path, src)
    structures = list(_check(ds, expected, atol=1e-4))  # SDF coordinates have 4 decimals
    assert [(s.info["chembl_id"], s.info["charge"]) for s in structures] == [("CHEMBL100", -1), ("CHEMBL101", 0)]
    assert all(s.forces is None for s in structures)
    assert ds.manifest["level_of_theory"] == "wB97X-D/def2-SVP (Psi4, QMugs)"
    for kind in ("formation", "gfn2"):
        ds, _ = _ingest(capsys, tmp_path, src, "--energy-kind", kind, out=f"ds-{kind}")
        list(_check(ds, expected, energy=kind, atol=1e-4))
    assert ds.manifest["level_of_theory"] == "GFN2-xTB (QMugs)"


@pytest.mark.parametrize("gz", [False, True])
def test_pubchem3d_unlabelled_conformers(tmp_path, capsys, gz):
    pytest.importorskip("rdkit")
    src, expected = files.pubchem3d(tmp_path / ("Conformer3D.sdf" + (".gz" if gz else "")), gz=gz)
    ds, out = _ingest(capsys, tmp_path, src)
    structures = list(_check(ds, expected, energy=None, atol=1e-4))
    assert [s.info["cid"] for s in structures] == ["702", "702", "887", "887"]
    assert ds.manifest["label_counts"]["unlabelled"] == 4 and "unlabelled 4" in out


# --------------------------------------------------------------------------------------------- JSON

@pytest.mark.parametrize("chunk", [None, 97])
def test_mptrj_json_energies_forces_stress(tmp_path, capsys, monkeypatch, chunk):
    import lamm_ds.ingest.mptrj as mptrj

    if chunk:  # the streaming decoder across tiny chunks
        monkeypatch.setattr(mptrj, "_CHUNK", chunk)
    src, expected = files.mptrj(tmp_path / "MPtrj_2022.9_full.json")
    ds, _ = _ingest(capsys, tmp_path, src)
    structures = list(_check(ds, expected))
    assert all(s.pbc.all() for s in structures)
    assert structures[0].info["mp_id"] == "mp-1" and structures[0].info["frame_id"] == "mp-1-0-0"
    assert ds.manifest["level_of_theory"] == "PBE/PBE+U (VASP, Materials Project)"
    ds, _ = _ingest(capsys, tmp_path, src, "--energy-kind", "corrected", out="ds2")
    list(_check(ds, expected, energy="corrected"))
    assert _ingest_info(ds)["mptrj"]["energy"]["source_key"] == "corrected_total_energy"


def test_mptrj_stress_sign_is_ase_convention():
    """VASP's stress is positive under compression, ASE's (and ours) negative: a compressed cell
    (VASP +10 kBar on the diagonal) must read as -1 GPa."""
    from ase.units import GPa

    from lamm_ds.ingest.mptrj import _frame

    _, _, stress = _frame({"e": 0.0, "force": [[0, 0, 0]], "stress": np.eye(3) * 10.0}, "x", "e", False)
    np.testing.assert_allclose(stress, -np.eye(3) * GPa)


# --------------------------------------------------------------------------------------------- LMDB

def test_aselmdb_omat24(tmp_path, capsys):
    pytest.importorskip("ase_db_backends")
    src, expected = files.aselmdb(tmp_path / "omat24-train-0.aselmdb")
    for fmt, out in (("auto", "ds"), ("omat24", "ds2")):
        ds, _ = _ingest(capsys, tmp_path, src, "--format", fmt, out=out)
        structures = list(_check(ds, expected))
        assert structures[1].info["sid"] == "omat-1" and structures[0].pbc.all()
    assert ds.manifest["level_of_theory"] == "PBE/PBE+U (VASP, OMat24)"


def test_oc22_total_energy_lmdb(tmp_path, capsys):
    records = [files.oc_record(k, y=-300.0 - k, oc22=1) for k in range(3)]
    src = files.fairchem(tmp_path / "oc22.lmdb", records)
    ds, _ = _ingest(capsys, tmp_path, src, "--format", "oc22", "--trust-pickle")
    for k, s in enumerate(ds):
        assert s.energy == -300.0 - k
        np.testing.assert_allclose(s.forces, records[k]["force"])
        np.testing.assert_allclose(s.positions, records[k]["pos"])
        assert s.fixed.tolist() == [False, True, False] and s.tags.tolist() == [1, 0, 2]
        assert s.info["sid"] == 100 + k
    assert ds.manifest["level_of_theory"] == "PBE+U (VASP, OC22)"


def test_odac23_adsorption_or_total_energy(tmp_path, capsys):
    records = [files.oc_record(k, y=-0.4 - 0.1 * k, raw_y=-1500.0 - k) for k in range(3)]
    src = files.fairchem(tmp_path / "odac23.lmdb", records)
    ds, _ = _ingest(capsys, tmp_path, src, "--format", "odac23", "--trust-pickle")
    assert [s.energy for s in ds] == pytest.approx([-0.4, -0.5, -0.6])
    assert ds[0].info["raw_y"] == -1500.0
    assert _ingest_info(ds)["odac23"]["energy"]["kind"] == "adsorption"
    ds, _ = _ingest(capsys, tmp_path, src, "--format", "odac23", "--trust-pickle", "--energy-kind", "total",
                    out="ds2")
    assert [s.energy for s in ds] == [-1500.0, -1501.0, -1502.0]


def test_hdf5_sniffed_without_an_extension(tmp_path, capsys):
    """QM7-X's archives decompress to bare names (1000, 2000, ...): the HDF5 signature is enough."""
    pytest.importorskip("h5py")
    src, expected = files.qm7x(tmp_path / "1000")
    ds, out = _ingest(capsys, tmp_path, src)
    list(_check(ds, expected))
    assert "format qm7x" in out


def test_explicit_level_of_theory_wins(tmp_path, capsys):
    pytest.importorskip("h5py")
    src, _ = files.qm7x(tmp_path / "1000.hdf5")
    ds, _ = _ingest(capsys, tmp_path, src, "--level-of-theory", "mine")
    assert ds.manifest["level_of_theory"] == "mine"
