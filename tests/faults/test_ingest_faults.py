"""Ingest faults (issue #11, "no silent wrong results"): every bad input gives a non-zero exit, a
message naming the file / structure / key, and leaves nothing half-written on disk."""

import gzip
import json
import pickle
import subprocess
import sys
import time

import ase.io
import lmdb
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from lamm_ds.cli import main as cli_main
from lamm_ds.ingest import IngestError, IngestOptions, LabelKeys, ingest
from lamm_ds.neighbors import MIN_INTERATOMIC_DISTANCE, radius_graph, shortest_distance
from lamm_ds.shards import LmdbDataset, read_manifest
from lamm_ds.shards.format import SHARD_DIR

WATER = [("O", (0.0, 0.0, 0.12)), ("H", (0.0, 0.76, -0.48)), ("H", (0.0, -0.76, -0.48))]


def _frame(k=0, energy=True, forces=True, atoms=WATER, extra=""):
    """One extxyz frame (3 atoms: 5 lines, so frame k's count line is line 5k + 1)."""
    props = "species:S:1:pos:R:3" + (":forces:R:3" if forces else "")
    head = f"{len(atoms)}\nProperties={props}" + (f" energy={-10.0 - k}" if energy else "") + f' pbc="F F F"{extra}\n'
    lines = [f"{s} {x + 0.01 * k:.6f} {y:.6f} {z:.6f}" + (" 0.1 0.0 -0.1" if forces else "")
             for s, (x, y, z) in atoms]
    return head + "\n".join(lines) + "\n"


def _xyz(path, n=6, **kw):
    path.write_text("".join(_frame(k, **kw) for k in range(n)))
    return str(path)


def _lines(path, n=6, **kw):
    return "".join(_frame(k, **kw) for k in range(n)).splitlines(keepends=True)


def _cli(capsys, *args):
    rc = cli_main(["ingest", *map(str, args), "--name", "t", "--quiet"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _nothing_left(tmp_path, out="ds"):
    assert not (tmp_path / out).exists(), "an output directory was written"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out}.")]
    assert not leftovers, f"temporary directories left behind: {leftovers}"


def _fails(capsys, tmp_path, src, *flags, match):
    rc, out, err = _cli(capsys, src, "--out", tmp_path / "ds", *flags)
    assert rc == 2, (out, err)
    assert err.startswith("lamm-ds ingest: error: ")
    for m in ([match] if isinstance(match, str) else match):
        assert m in err, err
    _nothing_left(tmp_path)
    return err


# --------------------------------------------------------------------- labels under other keys

def _mace_style(path, n=4):
    frames = []
    for k in range(n):
        a = Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.96], [0.93, 0, -0.24]])
        a.info["REF_energy"] = -14.0 + 0.1 * k
        a.info["config_type"] = "md"
        a.arrays["REF_forces"] = np.full((3, 3), 0.1 * k)
        frames.append(a)
    ase.io.write(path, frames, format="extxyz")
    return str(path)


def test_labels_under_other_keys_are_refused_with_suggestion(tmp_path, capsys):
    f = _mace_style(tmp_path / "mace.xyz")
    err = _fails(capsys, tmp_path, f, match=[
        f"{f}: no structure has an energy, forces or stress label under the keys used (energy, forces, stress)",
        "keys that look like labels: info 'REF_energy', arrays 'REF_forces'",
        "pass --energy-key REF_energy --forces-key REF_forces, or --unlabelled"])
    assert "config_type" not in err


def test_labels_under_other_keys_with_keys_and_summary_counts(tmp_path, capsys):
    f = _mace_style(tmp_path / "mace.xyz")
    rc, out, err = _cli(capsys, f, "--out", tmp_path / "ds", "--energy-key", "REF_energy", "--forces-key", "REF_forces")
    assert rc == 0, err
    assert "read 4, wrote 4 (energy 4, forces 4, stress 0, unlabelled 0), dropped 0 in" in out
    assert LmdbDataset(tmp_path / "ds")[2].forces[0, 0] == pytest.approx(0.2)


def test_file_without_any_label_is_refused(tmp_path, capsys):
    f = _xyz(tmp_path / "bare.xyz", energy=False, forces=False)
    _fails(capsys, tmp_path, f, match=[f"{f}: no structure has an energy, forces or stress label",
                                       "no other key looks like a label; pass --unlabelled"])


@pytest.mark.parametrize("flag", ["--unlabelled", "--allow-missing-labels"])
def test_file_without_labels_with_flag(tmp_path, capsys, flag):
    f = _xyz(tmp_path / "bare.xyz", energy=False, forces=False)
    rc, out, err = _cli(capsys, f, "--out", tmp_path / "ds", flag)
    assert rc == 0, err
    assert "wrote 6 (energy 0, forces 0, stress 0, unlabelled 6)" in out


def test_unlabelled_drops_existing_labels_and_is_recorded(tmp_path, capsys):
    f = _xyz(tmp_path / "mmff.xyz")
    rc, out, err = _cli(capsys, f, "--out", tmp_path / "ds", "--unlabelled")
    assert rc == 0, err
    assert "(energy 0, forces 0, stress 0, unlabelled 6)" in out
    ds = LmdbDataset(tmp_path / "ds")
    assert ds[0].energy is None and ds[0].forces is None and "energy" not in ds[0].info
    assert read_manifest(tmp_path / "ds")["ingest"]["label_keys"]["unlabelled"] is True


@pytest.mark.parametrize("key", ["--energy-key", "--forces-key", "--stress-key"])
def test_unlabelled_with_a_label_key_is_an_error(tmp_path, capsys, key):
    f = _xyz(tmp_path / "a.xyz")
    _fails(capsys, tmp_path, f, "--unlabelled", key, "REF", match=f"--unlabelled stores no labels, so it cannot be "
                                                                  f"combined with {key} REF")


def test_zero_label_check_is_per_file(tmp_path, capsys):
    good = _xyz(tmp_path / "a.xyz")
    bare = _xyz(tmp_path / "b.xyz", energy=False, forces=False)
    rc, out, err = _cli(capsys, good, bare, "--out", tmp_path / "ds")
    assert rc == 2 and f"{bare}: no structure has" in err and f"{good}:" not in err
    _nothing_left(tmp_path)


def test_zero_label_check_with_workers(tmp_path, capsys):
    good = _xyz(tmp_path / "a.xyz", n=70)  # more than one chunk of 64 before the bad file
    bare = _mace_style(tmp_path / "b.xyz")
    rc, out, err = _cli(capsys, good, bare, "--out", tmp_path / "ds", "--workers", "2")
    assert rc == 2 and f"{bare}: no structure has" in err and "--energy-key REF_energy" in err
    _nothing_left(tmp_path)


def test_zero_label_check_ase_db(tmp_path, capsys):
    import ase.db

    db_file = tmp_path / "x.db"
    with ase.db.connect(db_file) as db:
        for k in range(3):
            a = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
            db.write(a, REF_energy=-1.0 - k, data={"REF_forces": np.full((2, 3), 0.5)})
    _fails(capsys, tmp_path, db_file, match=[f"{db_file}: no structure has", "info 'REF_energy'",
                                             "arrays 'REF_forces'", "--energy-key REF_energy --forces-key REF_forces"])
    rc, out, err = _cli(capsys, db_file, "--out", tmp_path / "ds", "--energy-key", "REF_energy",
                        "--forces-key", "REF_forces")
    assert rc == 0 and "(energy 3, forces 3, stress 0, unlabelled 0)" in out, err


def _fairchem_lmdb(path, records):
    import torch
    from torch_geometric.data import Data

    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, fields in enumerate(records):
            d = Data(**{name: torch.tensor(v) if isinstance(v, np.ndarray) else v for name, v in fields.items()})
            txn.put(str(k).encode(), pickle.dumps(d, protocol=-1))
    env.close()
    return str(path)


def _oc_record(**kw):
    rec = {"pos": np.array([[0.0, 0, 0], [1.5, 0, 0]]), "atomic_numbers": np.array([29.0, 29.0]),
           "cell": np.eye(3).reshape(1, 3, 3) * 6.0, "natoms": 2, "sid": 7}
    rec.update(kw)
    return rec


def test_zero_label_check_fairchem_lmdb_and_energy_key(tmp_path, capsys):
    f = _fairchem_lmdb(tmp_path / "is2re.lmdb", [_oc_record(y_relaxed=-3.5 - k) for k in range(3)])
    _fails(capsys, tmp_path, f, "--trust-pickle", match=[f"{f}: no structure has", "attribute 'y_relaxed'",
                                                          "pass --energy-key y_relaxed"])
    rc, out, err = _cli(capsys, f, "--out", tmp_path / "ds", "--trust-pickle", "--energy-key", "y_relaxed")
    assert rc == 0 and "(energy 3, forces 0, stress 0, unlabelled 0)" in out, err
    assert LmdbDataset(tmp_path / "ds")[1].energy == pytest.approx(-4.5)


def test_fairchem_wrong_shape_forces(tmp_path, capsys):
    f = _fairchem_lmdb(tmp_path / "s2ef.lmdb", [_oc_record(y=-1.0, force=np.zeros((2, 3))),
                                                 _oc_record(y=-1.0, force=np.zeros((1, 3)))])
    _fails(capsys, tmp_path, f, "--trust-pickle",
           match=f"{f}: key 1: the forces have shape (1, 3), expected (2, 3)")


# ---------------------------------------------------------------------------- coincident atoms

def _labelled(a):
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.zeros((len(a), 3)))
    return a


def _ok_molecule():
    return _labelled(Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.96], [0.93, 0, -0.24]]))


@pytest.mark.parametrize("case,bad,match", [
    ("molecule", Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.96], [0, 0, 0.96005]]),
     "atoms 1 (H) and 2 (O) are 5e-05 Å apart"),
    ("periodic_image", Atoms("Cu2", positions=[[0, 0, 0], [4.99999, 0, 0]], cell=[5, 5, 5], pbc=True),
     "atoms 0 (Cu) and 1 (Cu) in the periodic image (-1, 0, 0) are 1e-05 Å apart"),
    ("own_image", Atoms("Cu", positions=[[0, 0, 0]], cell=[[0.05, 0, 0], [0, 10, 0], [0, 0, 10]], pbc=True),
     "atom 0 (Cu) and its own periodic image (-1, 0, 0) are 0.05 Å apart (a lattice vector that short)"),
], ids=["molecule", "periodic_image", "own_image"])
def test_coincident_atoms_error_or_skip(tmp_path, capsys, case, bad, match):
    f = tmp_path / "c.xyz"
    ase.io.write(f, [_ok_molecule(), _ok_molecule(), _labelled(bad)], format="extxyz")
    _fails(capsys, tmp_path, f, match=[f"{f}: structure 2: coincident atoms (closer than 0.1 Å): {match}",
                                       "--skip-invalid"])
    rc, out, err = _cli(capsys, f, "--out", tmp_path / "ds", "--skip-invalid")
    assert rc == 0, err
    assert "dropped 1: coincident atoms (closer than 0.1 Å)" in out
    (entry,) = [json.loads(x) for x in (tmp_path / "ds" / "dropped.jsonl").read_text().splitlines()]
    assert entry["index"] == 2 and entry["reason"] == "coincident atoms (closer than 0.1 Å)"
    assert entry["detail"] == match


def test_shortest_distance_helper():
    assert MIN_INTERATOMIC_DISTANCE == 0.1
    pos = np.array([[0.0, 0, 0], [4.9, 0, 0], [2.5, 2.5, 2.5]])
    cell = np.eye(3) * 5.0
    g = radius_graph(pos, cell, np.ones(3, bool), 3.0, 50)
    d, i, j, shift = shortest_distance(pos, cell, g)
    assert d == pytest.approx(0.1) and {i, j} == {0, 1} and abs(shift[0]) == 1
    g = radius_graph(pos, np.zeros((3, 3)), np.zeros(3, bool), 5.0, 50)
    assert shortest_distance(pos, np.zeros((3, 3)), g)[:3] == (pytest.approx(np.linalg.norm(pos[1] - pos[2])), 1, 2)
    empty = radius_graph(pos[:1], np.zeros((3, 3)), np.zeros(3, bool), 3.0, 50)
    assert shortest_distance(pos[:1], np.zeros((3, 3)), empty) == (float("inf"), -1, -1, (0, 0, 0))


# ------------------------------------------------------------------ (ext)xyz layout, frame blamed

def _edit(tmp_path, name, edit):
    lines = _lines(tmp_path)
    lines = edit(lines)
    path = tmp_path / name
    path.write_text("".join(lines))
    return str(path)


FRAME_FAULTS = [
    ("count.xyz", lambda L: L[:15] + ["abc\n"] + L[16:],
     "structure 3 (line 16): the atom-count line reads 'abc', expected an integer"),
    ("trunc.xyz", lambda L: L[:27],
     "structure 5 (line 26) is truncated: 3 atoms announced, the file ends after 0 atom lines"),
    ("trunc2.xyz", lambda L: L[:28],
     "structure 5 (line 26) is truncated: 3 atoms announced, the file ends after 1 atom line"),
    ("big.xyz", lambda L: L[:15] + ["5\n"] + L[16:],
     "structure 3 (line 16) announces 5 atoms, but line 21, after 3 atom lines, reads '3'"),
    ("small.xyz", lambda L: L[:15] + ["2\n"] + L[16:],
     "structure 4 (line 20): the atom-count line reads 'H 0.030000 -0.760000"),
    ("hole.xyz", lambda L: L[:12] + ["\n"] + L[15:],
     "structure 2 (line 11) is truncated: 3 atoms announced, line 13 after 0 atom lines is blank"),
    ("blank.xyz", lambda L: L[:15] + ["\n"] + L[15:],
     "line 16 is blank where the atom-count line of structure 3 was expected, but more lines follow"),
    ("columns.xyz", lambda L: L[:17] + ["H 0.0 0.0\n"] + L[18:],
     "structure 3 (line 16): line 18 (atom 0) has 3 columns, expected 7, as the comment line's Properties say"),
    ("element.xyz", lambda L: L[:17] + ["Xx 0.0 0.0 0.0 0.1 0.0 -0.1\n"] + L[18:],
     "structure 3 (line 16): line 18 (atom 0): unknown element symbol 'Xx'"),
]


@pytest.mark.parametrize("name,edit,match", FRAME_FAULTS, ids=[c[0].removesuffix(".xyz") for c in FRAME_FAULTS])
def test_bad_frame_in_the_middle_is_located(tmp_path, capsys, name, edit, match):
    f = _edit(tmp_path, name, edit)
    _fails(capsys, tmp_path, f, match=f"{f}: {match}")


def test_small_count_points_at_previous_frame(tmp_path, capsys):
    f = _edit(tmp_path, "small.xyz", lambda L: L[:15] + ["2\n"] + L[16:])
    _fails(capsys, tmp_path, f, match="it looks like an atom line: structure 3 (line 16) may announce fewer atoms")


def test_other_parse_error_names_structure_and_line(tmp_path, capsys):
    # a 6-component stress: ASE's extxyz reader wants 9; not a layout fault, ASE's message is kept
    f = _edit(tmp_path, "stress.xyz", lambda L: L[:16] + [L[16].rstrip("\n") + ' stress="1 2 3 4 5 6"\n'] + L[17:])
    _fails(capsys, tmp_path, f, match=[f"{f}: cannot parse structure 3 (line 16): ValueError:", "stress"])


def test_trailing_blank_lines_are_fine(tmp_path, capsys):
    f = tmp_path / "t.xyz"
    f.write_text("".join(_lines(tmp_path)) + "\n\n  \n")
    rc, out, err = _cli(capsys, f, "--out", tmp_path / "ds")
    assert rc == 0 and "read 6, wrote 6 (energy 6, forces 6, stress 0, unlabelled 0)" in out, err


def test_empty_file(tmp_path, capsys):
    f = tmp_path / "empty.xyz"
    f.write_text("")
    _fails(capsys, tmp_path, f, match=f"{f}: the file is empty")


def test_only_blank_lines(tmp_path, capsys):
    f = tmp_path / "blank.xyz"
    f.write_text("\n\n\n")
    _fails(capsys, tmp_path, f, match=f"{f}: contains no structures")


def test_garbage_bytes_xyz(tmp_path, capsys):
    f = tmp_path / "garbage.xyz"
    f.write_bytes(bytes(range(256)) * 8)
    _fails(capsys, tmp_path, f, match=[f"{f}: structure 0 (line 1): the atom-count line reads",
                                       "is this an (ext)xyz text file?"])


@pytest.mark.parametrize("name,match", [("garbage.dat", "cannot parse structure 0: not UTF-8 text"),
                                        ("garbage", "cannot tell the file format")])
def test_garbage_bytes_other_names(tmp_path, capsys, name, match):
    f = tmp_path / name
    f.write_bytes(bytes(range(256)) * 8)
    _fails(capsys, tmp_path, f, match=f"{f}: {match}")


def test_gzip_extxyz_works(tmp_path, capsys):
    f = tmp_path / "a.xyz.gz"
    with gzip.open(f, "wt") as fh:
        fh.writelines(_lines(tmp_path))
    rc, out, err = _cli(capsys, f, "--out", tmp_path / "ds")
    assert rc == 0 and "read 6, wrote 6 (energy 6, forces 6" in out, err
    assert LmdbDataset(tmp_path / "ds")[5].energy == -15.0


def test_gzip_with_a_bad_frame_is_located(tmp_path, capsys):
    f = tmp_path / "a.xyz.gz"
    with gzip.open(f, "wt") as fh:
        fh.writelines(_lines(tmp_path)[:15] + ["abc\n"] + _lines(tmp_path)[16:])
    _fails(capsys, tmp_path, f, match=f"{f}: structure 3 (line 16): the atom-count line reads 'abc'")


def test_corrupt_gzip(tmp_path, capsys):
    f = tmp_path / "a.xyz.gz"
    data = bytearray(gzip.compress("".join(_lines(tmp_path)).encode()))
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    _fails(capsys, tmp_path, f, match=f"{f}: cannot decompress (.gz stream damaged?)")


# ------------------------------------------------------------------------------ label values

def test_wrong_shape_forces(tmp_path, capsys):
    f = tmp_path / "f.xyz"
    f.write_text(_frame(0) + "2\nProperties=species:S:1:pos:R:3:forces:R:2 energy=-1.0\nH 0 0 0 1 1\nH 0 0 0.74 1 1\n")
    _fails(capsys, tmp_path, f, match=f"{f}: structure 1: the forces have shape (2, 2), expected (2, 3)")


def test_wrong_shape_forces_under_named_key(tmp_path, capsys):
    a = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], info={"E": -1.0})
    a.arrays["F"] = np.zeros((2, 2))
    f = tmp_path / "f.xyz"
    ase.io.write(f, [a], format="extxyz")
    _fails(capsys, tmp_path, f, "--energy-key", "E", "--forces-key", "F",
           match=f"{f}: structure 0: the forces have shape (2, 2), expected (2, 3)")


@pytest.mark.parametrize("value,match", [('"1 2 3"', "the energy has shape (3,), expected a single number"),
                                         ("abc", "the energy is 'abc', not a number")])
def test_malformed_energy(tmp_path, capsys, value, match):
    f = tmp_path / "e.xyz"
    f.write_text(_frame(0) + _frame(1).replace("energy=-11.0", f"energy={value}"))
    _fails(capsys, tmp_path, f, match=f"{f}: structure 1: {match}")


NON_FINITE = [
    ("positions", lambda s: s.replace("H 0.010000 0.760000", "H nan 0.760000"), "non-finite positions"),
    ("positions_inf", lambda s: s.replace("H 0.010000 0.760000", "H inf 0.760000"), "non-finite positions"),
    ("energy", lambda s: s.replace("energy=-11.0", "energy=nan"), "non-finite energy"),
    ("energy_inf", lambda s: s.replace("energy=-11.0", "energy=-inf"), "non-finite energy"),
    ("forces", lambda s: s.replace("0.010000 0.760000 -0.480000 0.1", "0.010000 0.760000 -0.480000 nan"),
     "non-finite forces"),
]


@pytest.mark.parametrize("what,edit,reason", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_values_error_or_skip(tmp_path, capsys, what, edit, reason):
    f = tmp_path / "n.xyz"
    text = "".join(_lines(tmp_path, n=3))
    f.write_text(edit(text))
    assert f.read_text() != text
    _fails(capsys, tmp_path, f, match=f"{f}: structure 1: {reason}")
    rc, out, err = _cli(capsys, f, "--out", tmp_path / "ds", "--skip-invalid")
    assert rc == 0 and f"dropped 1: {reason}" in out, err


@pytest.mark.parametrize("species", ["X 0.0 0.0 0.0", "200 0.0 0.0 0.0"], ids=["X", "Z200"])
def test_atomic_numbers_out_of_range(tmp_path, capsys, species):
    f = tmp_path / "z.xyz"
    if species.startswith("X"):
        f.write_text(_frame(0, forces=False) + f"2\nProperties=species:S:1:pos:R:3 energy=-1\n{species}\nH 0 0 1\n")
    else:
        f.write_text(_frame(0, forces=False) + f"2\nProperties=Z:I:1:pos:R:3 energy=-1\n{species}\n1 0 0 1\n")
    _fails(capsys, tmp_path, f, match=f"{f}: structure 1: atomic numbers outside 1..118")


@pytest.mark.parametrize("cell,pbc,match", [
    ("0 0 0 0 5 0 0 0 5", "T T T", "periodic along axis 0 but the cell vector is zero"),
    ("5 0 0 0 5 0 5 5 0", "T T T", "periodic cell with zero volume"),
    ("3 0 0 0 3 0 0 0 0.00001", "T T T", "degenerate periodic cell (too many neighbour pairs)"),
], ids=["zero_vector", "zero_volume", "flat"])
def test_degenerate_cell(tmp_path, capsys, cell, pbc, match):
    f = tmp_path / "cell.xyz"
    f.write_text(_frame(0) + f'2\nLattice="{cell}" Properties=species:S:1:pos:R:3 energy=-1 pbc="{pbc}"\n'
                             "Cu 0 0 0\nCu 1.2 1.2 0\n")
    _fails(capsys, tmp_path, f, match=f"{f}: structure 1: {match}")


def test_bad_stress_unit_api():
    with pytest.raises(IngestError, match="unknown stress unit 'psi'"):
        LabelKeys(stress_unit="psi")


# ----------------------------------------------------------------------- inputs and outputs

def test_existing_output_without_force(tmp_path, capsys):
    f = _xyz(tmp_path / "a.xyz")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("mine")
    rc, out, err = _cli(capsys, f, "--out", tmp_path / "ds")
    assert rc == 2 and f"{tmp_path / 'ds'} already exists; pass --force to replace it" in err
    assert (tmp_path / "ds" / "keep.txt").read_text() == "mine"


def test_directory_that_is_not_a_fairchem_lmdb(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    _xyz(tmp_path / "folder" / "a.xyz")
    _fails(capsys, tmp_path, tmp_path / "folder",
           match=f"{tmp_path / 'folder'}: a directory, but not a fairchem LMDB folder (no *.lmdb inside)")


def test_not_an_lmdb_file(tmp_path, capsys):
    f = tmp_path / "x.lmdb"
    f.write_bytes(b"not an lmdb" * 100)
    _fails(capsys, tmp_path, f, "--trust-pickle", match=f"{f}: cannot open LMDB")


def test_empty_ase_db_file_is_not_modified(tmp_path, capsys):
    f = tmp_path / "x.db"
    f.write_bytes(b"")
    _fails(capsys, tmp_path, f, match=f"{f}: the file is empty")
    assert f.stat().st_size == 0


def test_non_matching_glob_and_missing_file(tmp_path, capsys):
    pattern = str(tmp_path / "*.extxyz")
    _fails(capsys, tmp_path, pattern, match=f"{pattern}: the pattern matches no file")
    _fails(capsys, tmp_path, tmp_path / "nope.xyz", match=f"{tmp_path / 'nope.xyz'}: no such file or directory")


def _small_dataset(tmp_path):
    f = _xyz(tmp_path / "a.xyz", n=20)
    ingest([f], tmp_path / "ds", IngestOptions(name="t", progress=False, shard_size=10))
    return tmp_path / "ds"


def test_corrupt_shard_verify(tmp_path, capsys):
    ds = _small_dataset(tmp_path)
    shard = ds / SHARD_DIR / "shard-00001.lmdb"
    data = bytearray(shard.read_bytes())
    data[data.find(b"LMR1") + 40] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli_main(["verify", str(ds)]) == 2
    err = capsys.readouterr().err
    assert f"{shard}: key " in err and "is corrupt" in err


def test_a_record_deleted_from_a_shard_is_named_by_verify(tmp_path, capsys):
    import lmdb

    from lamm_ds.shards.format import record_key

    ds = _small_dataset(tmp_path)
    shard = ds / SHARD_DIR / "shard-00001.lmdb"
    env = lmdb.open(str(shard), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        assert txn.delete(record_key(3))
    env.close()
    assert cli_main(["verify", str(ds)]) == 2
    assert f"{shard}: key 3 (sample 13) is missing" in capsys.readouterr().err


def test_truncated_shard_verify(tmp_path, capsys):
    ds = _small_dataset(tmp_path)
    shard = ds / SHARD_DIR / "shard-00001.lmdb"
    shard.write_bytes(shard.read_bytes()[:4096])
    assert cli_main(["verify", str(ds)]) == 2
    assert str(shard) in capsys.readouterr().err


@pytest.mark.parametrize("command", ["info", "verify"])
def test_corrupt_manifest(tmp_path, capsys, command):
    ds = _small_dataset(tmp_path)
    manifest = ds / "manifest.json"
    data = bytearray(manifest.read_bytes())
    data[data.find(b":")] ^= 0xFF
    manifest.write_bytes(bytes(data))
    assert cli_main([command, str(ds)]) == 2
    assert f"{manifest}: corrupt manifest" in capsys.readouterr().err


def test_flipped_checksum_or_index_bytes_verify(tmp_path, capsys):
    ds = _small_dataset(tmp_path)
    natoms = ds / "index" / "natoms.npy"
    data = bytearray(natoms.read_bytes())
    data[-1] ^= 0x01
    natoms.write_bytes(bytes(data))
    assert cli_main(["verify", str(ds)]) == 2
    assert f"{ds}: checksum mismatch" in capsys.readouterr().err


def test_ingest_read_back_catches_a_changed_record_and_writes_nothing(tmp_path, monkeypatch):
    """Ingest verifies by digest, without decoding: a record that reads back one byte different from
    what was written (a bad disk, a buggy LMDB) still fails the ingest, and nothing is left."""
    import lamm_ds.shards.dataset as dataset

    read = dataset._record

    def flipped(txn, path, local, index):
        data = read(txn, path, local, index)
        return data[:-1] + bytes([data[-1] ^ 0x01]) if index == 13 else data

    monkeypatch.setattr(dataset, "_record", flipped)
    f = _xyz(tmp_path / "a.xyz", n=20)
    with pytest.raises(dataset.DatasetError, match="checksum mismatch"):
        ingest([f], tmp_path / "ds", IngestOptions(name="t", progress=False, shard_size=10))
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))


def test_verify_without_decode_still_sees_a_flipped_record_byte(tmp_path):
    ds = _small_dataset(tmp_path)
    shard = ds / SHARD_DIR / "shard-00001.lmdb"
    data = bytearray(shard.read_bytes())
    data[data.find(b"LMR1") + 40] ^= 0xFF
    shard.write_bytes(bytes(data))
    from lamm_ds.shards.dataset import DatasetError

    with pytest.raises(DatasetError, match="checksum mismatch"):
        LmdbDataset(ds).verify(decode=False)


@pytest.mark.slow
def test_killed_ingest_leaves_no_output_and_rerun_cleans_up(tmp_path, capsys):
    big = tmp_path / "big.xyz"
    big.write_text(_frame(0) * 3000)
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-m", "lamm_ds.cli", "ingest", str(big), "--name", "k", "--out",
                             str(out), "--shard-size", "20", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp = tmp_path / f".ds.ingest-{proc.pid}"
    deadline = time.monotonic() + 60
    try:
        while not (tmp / SHARD_DIR / "shard-00003.lmdb").exists():
            assert proc.poll() is None, f"ingest ended before it could be killed: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "ingest never got going"
            time.sleep(0.01)
    finally:
        proc.kill()  # SIGKILL: no clean-up possible
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -9
    assert not out.exists()
    assert tmp.is_dir() and not (tmp / "manifest.json").exists()
    rc, stdout, err = _cli(capsys, big, "--out", out, "--shard-size", "500")
    assert rc == 0 and "read 3000, wrote 3000" in stdout, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")], "stale temporary directory kept"
    assert len(LmdbDataset(out)) == 3000


@pytest.mark.parametrize("key", ["shards", "shard_size", "name"])
def test_manifest_with_a_damaged_key_name(tmp_path, capsys, key):
    ds = _small_dataset(tmp_path)
    manifest = ds / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'"{key}":', f'"{key[0]}X{key[2:]}":', 1))
    assert cli_main(["info", str(ds)]) == 2
    assert f"{manifest}: corrupt manifest: {key!r} is missing" in capsys.readouterr().err


def test_wrong_size_stress_under_named_key(tmp_path, capsys):
    a = Atoms("Cu", positions=[[0, 0, 0]], cell=[3, 3, 3], pbc=True, info={"energy_dft": -1.0, "s": [1.0, 2, 3, 4]})
    f = tmp_path / "s.xyz"
    ase.io.write(f, [a], format="extxyz")
    _fails(capsys, tmp_path, f, "--energy-key", "energy_dft", "--stress-key", "s",
           match=f"{f}: structure 0: the stress has shape (4,), expected 6 (Voigt) or 9 (3x3) components")


def test_info_refuses_a_damaged_index_array(tmp_path, capsys):
    ds = _small_dataset(tmp_path)
    natoms = ds / "index" / "natoms.npy"
    data = bytearray(natoms.read_bytes())
    data[-2] ^= 0x10  # one structure now claims thousands of atoms
    natoms.write_bytes(bytes(data))
    assert cli_main(["info", str(ds)]) == 2
    captured = capsys.readouterr()
    assert "the index arrays disagree with the manifest (num_atoms: index" in captured.err
    assert "lamm-ds verify" in captured.err and "structures" not in captured.out


@pytest.mark.parametrize("edit", [("\"level_of_theory\": \"unknown\"", "\"level_of_theory\": \"unknowm\""),
                                  ("\"energy\": 20", "\"energy\": 21")], ids=["level_of_theory", "label_count"])
def test_a_changed_manifest_field_is_caught(tmp_path, capsys, edit):
    ds = _small_dataset(tmp_path)
    manifest = ds / "manifest.json"
    text = manifest.read_text()
    assert edit[0] in text
    manifest.write_text(text.replace(edit[0], edit[1], 1))  # still valid JSON
    assert cli_main(["info", str(ds)]) == 2
    assert f"{manifest}: corrupt manifest: its fields changed since ingest" in capsys.readouterr().err
    with pytest.raises(ValueError, match="manifest checksum mismatch"):
        LmdbDataset(ds)


def test_a_manifest_without_its_own_checksum_still_opens(tmp_path):
    """Datasets written before the manifest checksum existed keep working."""
    ds = _small_dataset(tmp_path)
    manifest = ds / "manifest.json"
    fields = json.loads(manifest.read_text())
    del fields["manifest_checksum"]
    manifest.write_text(json.dumps(fields))
    assert len(LmdbDataset(ds)) == 20


def test_forces_under_another_key_beside_standard_energies_get_a_note(tmp_path, capsys):
    frames = []
    for k in range(3):
        atoms = Atoms("H2O", positions=[p for _, p in WATER])
        atoms.info["energy"] = -10.0 - k
        atoms.arrays["REF_forces"] = np.full((3, 3), 0.1)
        frames.append(atoms)
    ase.io.write(tmp_path / "mixed.extxyz", frames)
    rc, out, err = _cli(capsys, tmp_path / "mixed.extxyz", "--out", tmp_path / "ds")
    assert rc == 0, err
    assert "(energy 3, forces 0, stress 0, unlabelled 0)" in out
    assert "note:" in out and "no structure has forces, but arrays 'REF_forces' looks like forces" in out
    assert "--forces-key REF_forces" in out
