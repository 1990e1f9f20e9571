"""Dataset-format faults (issue 16): a file that does not match its dataset's layout, an option that
does not apply to a format, or a missing optional package gives exit code 2, a message naming the
file and the missing group / key / package, and nothing on disk."""

import json
import sys

import numpy as np
import pytest

import dataset_files as files
from lamm_ds.cli import main as cli_main


def _fails(capsys, tmp_path, src, *flags, match):
    rc = cli_main(["ingest", str(src), "--out", str(tmp_path / "ds"), "--name", "t", "--quiet", *map(str, flags)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("lamm-ds ingest: error: ")
    for m in [match] if isinstance(match, str) else match:
        assert m in err, err
    assert not (tmp_path / "ds").exists(), "an output directory was written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")], "temporary directories left behind"
    return err


def _h5_edit(path, edit):
    import h5py

    with h5py.File(path, "a") as f:
        edit(f)
    return path


# --------------------------------------------------------------------------------------------- HDF5

@pytest.mark.parametrize("member, match", [
    ("train/CH4/rxn0002/wB97x_6-31G(d).forces", "group '/train/CH4/rxn0002' has no 'wB97x_6-31G(d).forces'"),
    ("train/CH4/rxn0002/reactant", "group '/train/CH4/rxn0002' has no 'reactant'"),
    ("val/C2H4O/rxn0003/product/positions", "group '/val/C2H4O/rxn0003/product' has no 'positions'"),
])
def test_transition1x_missing_member(tmp_path, capsys, member, match):
    pytest.importorskip("h5py")
    src, _ = files.transition1x(tmp_path / "t1x.h5")
    _h5_edit(src, lambda f: f.__delitem__(member))
    _fails(capsys, tmp_path, src, "--format", "transition1x", match=[src, match, "Transition1x"])


def test_transition1x_missing_split(tmp_path, capsys):
    pytest.importorskip("h5py")
    src, _ = files.transition1x(tmp_path / "t1x.h5")
    _fails(capsys, tmp_path, src, "--split", "test", match=f"{src}: group '/' has no 'test'")


def test_transition1x_wrong_forces_shape(tmp_path, capsys):
    pytest.importorskip("h5py")
    src, _ = files.transition1x(tmp_path / "t1x.h5")

    def edit(f):
        del f["train/CH4/rxn0002/wB97x_6-31G(d).forces"]
        f["train/CH4/rxn0002/wB97x_6-31G(d).forces"] = np.zeros((3, 2, 3))
    _h5_edit(src, edit)
    _fails(capsys, tmp_path, src, match=[src, "'/train/CH4/rxn0002': forces have shape (3, 2, 3), expected (3, 5, 3)"])


def test_hdf5_in_no_known_layout(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["something"] = np.zeros(3)
    _fails(capsys, tmp_path, tmp_path / "x.h5", match=["an HDF5 file in no layout lamm-ds knows",
                                                        "['something']", "--format transition1x, qm7x, ani1x"])


def test_not_an_hdf5_file(tmp_path, capsys):
    pytest.importorskip("h5py")
    (tmp_path / "x.hdf5").write_text("not hdf5")
    _fails(capsys, tmp_path, tmp_path / "x.hdf5", "--format", "qm7x",
           match=f"{tmp_path / 'x.hdf5'}: cannot open as HDF5")


@pytest.mark.parametrize("member, match", [
    ("1/Geom-m1-i1-c1-d0/totFOR", "group '/1/Geom-m1-i1-c1-d0' has no 'totFOR'"),
    ("2/Geom-m2-i1-c1-d1/ePBE0+MBD", "group '/2/Geom-m2-i1-c1-d1' has no 'ePBE0+MBD'"),
])
def test_qm7x_missing_member(tmp_path, capsys, member, match):
    pytest.importorskip("h5py")
    src, _ = files.qm7x(tmp_path / "1000.hdf5")
    _h5_edit(src, lambda f: f.__delitem__(member))
    _fails(capsys, tmp_path, src, "--format", "qm7x", match=[src, match, "QM7-X"])


def test_qm7x_dataset_where_a_group_belongs(tmp_path, capsys):
    pytest.importorskip("h5py")
    src, _ = files.qm7x(tmp_path / "1000.hdf5")
    _h5_edit(src, lambda f: f.create_dataset("3", data=[1.0]))
    _fails(capsys, tmp_path, src, "--format", "qm7x",
           match="'/3' is a dataset where the QM7-X layout has a molecule group")


def test_ani1x_missing_coordinates_and_unknown_energy_key(tmp_path, capsys):
    pytest.importorskip("h5py")
    src, _ = files.ani1x(tmp_path / "ani.h5")
    _fails(capsys, tmp_path, src, "--energy-key", "wb97x_tz.energy", match="group '/C1H4' has no 'wb97x_tz.energy'")
    _h5_edit(src, lambda f: f.__delitem__("C2H4O1/coordinates"))
    _fails(capsys, tmp_path, src, "--format", "ani1x", match=[src, "group '/C2H4O1' has no 'coordinates'"])


def test_spice_units_and_missing_gradient(tmp_path, capsys):
    pytest.importorskip("h5py")
    src, _ = files.spice(tmp_path / "SPICE.hdf5", units="angstrom")
    _fails(capsys, tmp_path, src, match="'/103914/conformations' is in 'angstrom'; the SPICE layout stores bohr")
    src, _ = files.spice(tmp_path / "SPICE2.hdf5")
    _h5_edit(src, lambda f: f.__delitem__("water/dft_total_gradient"))
    _fails(capsys, tmp_path, src, match=[src, "group '/water' has no 'dft_total_gradient'"])


# ---------------------------------------------------------------------------------------------- SDF

def test_qmugs_missing_or_bad_energy_field(tmp_path, capsys):
    pytest.importorskip("rdkit")
    _, _ = files.qmugs(tmp_path)
    sdf = tmp_path / "structures" / "CHEMBL100" / "conf_00.sdf"
    text = sdf.read_text()
    sdf.write_text(text.replace("<DFT:TOTAL_ENERGY>", "<DFT:OTHER>"))
    _fails(capsys, tmp_path, sdf, match=[f"{sdf}: SDF record 0 has no <DFT:TOTAL_ENERGY> data field"])
    sdf.write_text(text.replace(f"{-228.1:.6f}", "n/a"))
    _fails(capsys, tmp_path, sdf, match="<DFT:TOTAL_ENERGY> is 'n/a', not a number")


def test_pubchem3d_format_on_another_sdf(tmp_path, capsys):
    pytest.importorskip("rdkit")
    _, _ = files.qmugs(tmp_path)
    sdf = tmp_path / "structures" / "CHEMBL100" / "conf_00.sdf"
    _fails(capsys, tmp_path, sdf, "--format", "pubchem3d", match="not a PubChem3D conformer SDF")


def test_unparsable_sdf_record(tmp_path, capsys):
    pytest.importorskip("rdkit")
    src, _ = files.pubchem3d(tmp_path / "c.sdf")
    text = open(src).read()
    head, rest = text.split("$$$$\n", 1)
    lines = rest.splitlines(keepends=True)
    lines[3] = "garbage counts line\n"
    open(src, "w").write(head + "$$$$\n" + "".join(lines))
    _fails(capsys, tmp_path, src, match=f"{src}: SDF record 1 cannot be parsed")


# --------------------------------------------------------------------------------------------- JSON

def test_mptrj_missing_label_and_structure(tmp_path, capsys):
    src, _ = files.mptrj(tmp_path / "mptrj.json")
    data = json.load(open(src))
    del data["mp-2"]["mp-2-0-1"]["force"]
    json.dump(data, open(src, "w"))
    _fails(capsys, tmp_path, src, match=f"{src}: mp-2 / mp-2-0-1 has no 'force'")
    del data["mp-2"]["mp-2-0-1"]["structure"]["lattice"]
    json.dump(data, open(src, "w"))
    _fails(capsys, tmp_path, src, "--format", "mptrj", match="mp-2 / mp-2-0-1: the structure has no lattice.matrix")


def test_mptrj_partial_occupancy(tmp_path, capsys):
    src, _ = files.mptrj(tmp_path / "mptrj.json")
    data = json.load(open(src))
    data["mp-1"]["mp-1-0-0"]["structure"]["sites"][0]["species"] = [{"element": "Li", "occu": 0.5},
                                                                    {"element": "Na", "occu": 0.5}]
    json.dump(data, open(src, "w"))
    _fails(capsys, tmp_path, src, match="mp-1 / mp-1-0-0: site 0: a site with partial or mixed occupancy")


@pytest.mark.parametrize("text, match", [
    ('{"mp-1": {"f": {"structure": {"lattice', "not valid JSON"),
    ('[{"structure": {}, "uncorrected_total_energy": 1}]', "expected '{' at the start of the file"),
    ('{"mp-1": [1, 2], "x": "structure total_energy"}', "material 'mp-1' is a list"),
])
def test_mptrj_not_the_layout(tmp_path, capsys, text, match):
    (tmp_path / "m.json").write_text(text)
    _fails(capsys, tmp_path, tmp_path / "m.json", "--format", "mptrj", match=match)


# --------------------------------------------------------------------------------------------- LMDB

def test_aselmdb_empty_file(tmp_path, capsys):
    pytest.importorskip("ase_db_backends")
    (tmp_path / "x.aselmdb").write_bytes(b"")
    _fails(capsys, tmp_path, tmp_path / "x.aselmdb", match="x.aselmdb: the file is empty")


def test_fairchem_presets_need_trust_and_their_energy(tmp_path, capsys):
    src = files.fairchem(tmp_path / "oc22.lmdb", [files.oc_record(0, y=-3.0), files.oc_record(1)])
    _fails(capsys, tmp_path, src, "--format", "oc22", match="Pass --trust-pickle only if you trust")
    _fails(capsys, tmp_path, src, "--format", "oc22", "--trust-pickle",
           match=f"{src}: key 1 has no energy under the attribute 'y'")
    _fails(capsys, tmp_path, src, "--format", "odac23", "--trust-pickle", "--energy-kind", "total",
           match="key 0 has no energy under the attribute 'raw_y'")


# ------------------------------------------------------------------------------ options and packages

@pytest.mark.parametrize("flags, match", [
    (["--energy-kind", "formation"], "--format transition1x holds the energy kinds total, atomization; got "
                                     "--energy-kind formation"),
    (["--energy-key", "x"], "--energy-key does not apply to --format transition1x"),
    (["--stress-unit", "GPa"], "--stress-unit does not apply to --format transition1x"),
])
def test_options_that_do_not_apply(tmp_path, capsys, flags, match):
    pytest.importorskip("h5py")
    src, _ = files.transition1x(tmp_path / "t1x.h5")
    _fails(capsys, tmp_path, src, *flags, match=match)


def test_energy_kind_with_a_keys_format(tmp_path, capsys):
    (tmp_path / "a.xyz").write_text("1\nProperties=species:S:1:pos:R:3 energy=-1.0\nH 0 0 0\n")
    _fails(capsys, tmp_path, tmp_path / "a.xyz", "--energy-kind", "total",
           match="--energy-kind does not apply to --format ase")


@pytest.mark.parametrize("module, maker, extra", [
    ("h5py", lambda p: files.qm7x(p / "1000.hdf5")[0], "lamm-ds[hdf5]"),
    ("rdkit", lambda p: files.pubchem3d(p / "c.sdf")[0], "lamm-ds[sdf]"),
    ("ase_db_backends", lambda p: files.aselmdb(p / "o.aselmdb")[0], "lamm-ds[aselmdb]"),
])
def test_missing_optional_package_names_the_extra(tmp_path, capsys, monkeypatch, module, maker, extra):
    pytest.importorskip(module)
    src = maker(tmp_path)
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    fmt = {"h5py": "qm7x", "rdkit": "pubchem3d", "ase_db_backends": "omat24"}[module]
    _fails(capsys, tmp_path, src, "--format", fmt, match=f"pip install '{extra}'")
