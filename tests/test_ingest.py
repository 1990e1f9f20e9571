import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import ase.io
import lmdb
import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from lamm_ds.cli import main as cli_main
from lamm_ds.ingest import IngestError, IngestOptions, LabelKeys, ingest
from lamm_ds.shards import DatasetError, LmdbDataset, read_manifest
from lamm_ds.shards.format import SHARD_DIR


def _frames(n=25, seed=0, big_every=0):
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        if big_every and k % big_every == 0:
            a = bulk("Cu", "fcc", a=3.6, cubic=True) * (5, 5, 4)  # 400 atoms > 300
        elif k % 2:
            a = bulk("Cu", "fcc", a=3.6) * (2, 2, int(rng.integers(1, 3)))
        else:
            a = molecule(["H2O", "CH4", "C6H6"][k % 3])
        a.rattle(0.05, seed=k)
        if k % 5 == 0:
            a.set_constraint(FixAtoms(indices=[0]))
        a.calc = SinglePointCalculator(a, energy=float(rng.normal()), forces=rng.normal(size=(len(a), 3)))
        frames.append(a)
    return frames


def _write(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return str(path)


def _opts(**kw):
    kw.setdefault("name", "t")
    kw.setdefault("progress", False)
    return IngestOptions(**kw)


def test_roundtrip_every_structure_once(tmp_path):
    frames = _frames(30)
    f1 = _write(tmp_path / "a.xyz", frames[:17])
    f2 = _write(tmp_path / "b.xyz", frames[17:])
    rep = ingest([str(tmp_path / "*.xyz")], tmp_path / "ds", _opts(shard_size=7))
    assert rep.read == rep.written == 30 and rep.dropped == 0
    ds = LmdbDataset(tmp_path / "ds")
    assert len(ds) == 30 and len(ds.manifest["shards"]) == 5
    sources = []
    as_read = ase.io.read(f1, ":") + ase.io.read(f2, ":")  # the file's own precision is the reference
    for k in range(30):
        s = ds[k]
        src = as_read[k]
        np.testing.assert_array_equal(s.numbers, src.numbers)
        np.testing.assert_allclose(s.positions, src.positions, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s.forces, src.get_forces(apply_constraint=False), atol=1e-12)
        assert s.energy == pytest.approx(src.get_potential_energy(), abs=1e-12)
        np.testing.assert_array_equal(s.pbc, src.pbc)
        if k % 5 == 0:
            assert s.fixed[0] and not s.fixed[1:].any()
        sources.append((s.source, s.source_index))
        assert ds.natoms[k] == len(src) and ds.index["has_energy"][k] and ds.index["has_forces"][k]
    assert sources == [(f1, i) for i in range(17)] + [(f2, i) for i in range(13)]
    m = read_manifest(tmp_path / "ds")
    assert m["label_counts"] == {"energy": 30, "forces": 30, "stress": 0, "unlabelled": 0}
    assert m["elements"] == [1, 6, 8, 29] and m["num_atoms"] == int(ds.natoms.sum())
    ds.verify()


def test_size_filter_reports_every_drop(tmp_path):
    f = _write(tmp_path / "a.xyz", _frames(12, big_every=4))
    rep = ingest([f], tmp_path / "ds", _opts())
    assert rep.read == 12 and rep.dropped == 3 and rep.written == 9
    lines = [json.loads(x) for x in (tmp_path / "ds" / "dropped.jsonl").read_text().splitlines()]
    assert [d["index"] for d in lines] == [0, 4, 8]
    assert all(d["natoms"] == 400 and d["reason"] == "more than 300 atoms" and d["source"] == f for d in lines)
    assert read_manifest(tmp_path / "ds")["ingest"]["dropped"] == 3


def test_deterministic_across_worker_counts(tmp_path):
    f = _write(tmp_path / "a.xyz", _frames(150))
    ingest([f], tmp_path / "w1", _opts(workers=1))
    ingest([f], tmp_path / "w2", _opts(workers=2))
    m1, m2 = read_manifest(tmp_path / "w1"), read_manifest(tmp_path / "w2")
    assert m1["checksum"] == m2["checksum"]
    for name in ("natoms", "nedges", "has_energy"):
        np.testing.assert_array_equal(np.load(tmp_path / "w1/index" / f"{name}.npy"),
                                      np.load(tmp_path / "w2/index" / f"{name}.npy"))


def test_refuses_overwrite_without_force(tmp_path):
    f = _write(tmp_path / "a.xyz", _frames(3))
    ingest([f], tmp_path / "ds", _opts())
    with pytest.raises(IngestError, match="already exists; pass --force"):
        ingest([f], tmp_path / "ds", _opts())
    rep = ingest([f], tmp_path / "ds", _opts(force=True))
    assert rep.written == 3 and sorted(os.listdir(tmp_path)) == ["a.xyz", "ds"]


def _assert_nothing_left(tmp_path, out="ds"):
    assert not (tmp_path / out).exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temporary directory left behind"


def test_malformed_file_names_file(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("3\nLattice=\"1 0 0 0 1 0 0 0 1\" Properties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0\n")
    with pytest.raises(IngestError, match="bad.xyz"):
        ingest([str(bad)], tmp_path / "ds", _opts())
    _assert_nothing_left(tmp_path)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    with pytest.raises(IngestError, match="empty.xyz"):
        ingest([str(empty)], tmp_path / "ds", _opts())
    _assert_nothing_left(tmp_path)


def test_missing_explicit_energy_key(tmp_path):
    frames = _frames(4)
    for a in frames:
        a.info["dft_energy"] = 1.0
    del frames[2].info["dft_energy"]
    f = _write(tmp_path / "a.xyz", frames)
    with pytest.raises(IngestError, match=r"a.xyz: structure 2 has no energy under the key 'dft_energy'"):
        ingest([f], tmp_path / "ds", _opts(keys=LabelKeys(energy="dft_energy")))
    _assert_nothing_left(tmp_path)
    rep = ingest([f], tmp_path / "ds", _opts(keys=LabelKeys(energy="dft_energy", allow_missing=True)))
    ds = LmdbDataset(tmp_path / "ds")
    assert rep.written == 4 and ds[2].energy is None and ds[1].energy == 1.0
    assert ds.index["has_energy"].tolist() == [True, True, False, True]


def test_nan_positions_error_or_skip(tmp_path):
    frames = _frames(5)
    frames[3].positions[1, 0] = np.nan
    f = _write(tmp_path / "a.xyz", frames)
    with pytest.raises(IngestError, match=r"a.xyz: structure 3: non-finite positions"):
        ingest([f], tmp_path / "ds", _opts())
    _assert_nothing_left(tmp_path)
    rep = ingest([f], tmp_path / "ds", _opts(skip_invalid=True))
    assert rep.written == 4 and rep.dropped_by_reason == {"non-finite positions": 1}


def test_degenerate_cell_error_or_skip(tmp_path):
    # a finite, non-zero-volume cell whose planes are 1e-5 A apart: would need millions of images
    frames = _frames(5)
    flat = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    flat.set_cell([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 1e-5]], scale_atoms=False)
    flat.calc = SinglePointCalculator(flat, energy=0.0, forces=np.zeros((2, 3)))
    frames[2] = flat
    f = _write(tmp_path / "a.xyz", frames)
    with pytest.raises(IngestError, match=r"a.xyz: structure 2: degenerate periodic cell .*spacing 1e-05 A"):
        ingest([f], tmp_path / "ds", _opts())
    _assert_nothing_left(tmp_path)
    rep = ingest([f], tmp_path / "ds", _opts(skip_invalid=True))
    assert rep.written == 4
    assert rep.dropped_by_reason == {"degenerate periodic cell (too many neighbour pairs)": 1}


def test_unlabelled_and_stress_units(tmp_path):
    a = bulk("Si", "diamond", a=5.43)
    a.info["virial_stress_kbar"] = [1602.1766208, 0, 0, 0, 0, 0]
    b = molecule("H2O")
    f = _write(tmp_path / "a.xyz", [a, b])
    ingest([f], tmp_path / "ds", _opts(keys=LabelKeys(stress="virial_stress_kbar", stress_unit="kbar",
                                                       allow_missing=True)))
    ds = LmdbDataset(tmp_path / "ds")
    assert ds[0].stress[0, 0] == pytest.approx(1.0) and ds[1].stress is None
    assert ds.manifest["label_counts"]["unlabelled"] == 1


def test_ase_db_input(tmp_path):
    import ase.db

    frames = _frames(6)
    with ase.db.connect(tmp_path / "x.db") as db:
        for a in frames:
            db.write(a, config="md")
    rep = ingest([str(tmp_path / "x.db")], tmp_path / "ds", _opts())
    ds = LmdbDataset(tmp_path / "ds")
    assert rep.written == 6
    for k in range(6):
        np.testing.assert_allclose(ds[k].forces, frames[k].get_forces(apply_constraint=False))
        assert ds[k].energy == pytest.approx(frames[k].get_potential_energy())
        assert ds[k].source_index == k + 1 and ds[k].info["config"] == "md"


def _write_fairchem_lmdb(path, frames):
    import torch
    from torch_geometric.data import Data

    env = lmdb.open(str(path), subdir=False, map_size=1 << 30)
    with env.begin(write=True) as txn:
        for k, a in enumerate(frames):
            d = Data(pos=torch.tensor(a.positions, dtype=torch.float32),
                     atomic_numbers=torch.tensor(a.numbers, dtype=torch.float32),
                     cell=torch.tensor(np.asarray(a.cell[:]), dtype=torch.float32).view(1, 3, 3),
                     natoms=len(a), y=float(a.get_potential_energy()),
                     force=torch.tensor(a.get_forces(apply_constraint=False), dtype=torch.float32),
                     fixed=torch.zeros(len(a)), tags=torch.ones(len(a), dtype=torch.long),
                     sid=1000 + k, fid=k)
            txn.put(str(k).encode(), pickle.dumps(d, protocol=-1))
        txn.put(b"length", pickle.dumps(len(frames), protocol=-1))
    env.close()


def test_fairchem_lmdb_needs_trust_pickle(tmp_path):
    frames = [f for f in _frames(8) if f.pbc.all()]
    (tmp_path / "oc").mkdir()
    _write_fairchem_lmdb(tmp_path / "oc" / "data.0000.lmdb", frames)
    with pytest.raises(IngestError, match="--trust-pickle"):
        ingest([str(tmp_path / "oc")], tmp_path / "ds", _opts())
    _assert_nothing_left(tmp_path)
    rep = ingest([str(tmp_path / "oc")], tmp_path / "ds", _opts(trust_pickle=True))
    ds = LmdbDataset(tmp_path / "ds")
    assert rep.written == len(frames)
    for k, a in enumerate(frames):
        s = ds[k]
        np.testing.assert_allclose(s.positions, a.positions, atol=1e-5)
        np.testing.assert_allclose(s.forces, a.get_forces(apply_constraint=False), atol=1e-5)
        np.testing.assert_array_equal(s.numbers, a.numbers)
        assert s.energy == pytest.approx(a.get_potential_energy(), abs=1e-6)
        assert s.info["sid"] == 1000 + k and s.tags.tolist() == [1] * len(a) and s.pbc.all()
        assert s.source.endswith("data.0000.lmdb") and s.source_index == k


def test_corrupt_and_truncated_shards(tmp_path):
    f = _write(tmp_path / "a.xyz", _frames(20))
    ingest([f], tmp_path / "ds", _opts(shard_size=10))
    shard = tmp_path / "ds" / SHARD_DIR / "shard-00001.lmdb"
    data = bytearray(shard.read_bytes())
    # corrupt one record payload in place: find a record by its magic bytes
    pos = data.find(b"LMR1")
    data[pos + 30] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = LmdbDataset(tmp_path / "ds")
    bad = [k for k in range(10, 20) if _raises(ds, k)]
    assert bad, "the flipped byte went unnoticed"
    with pytest.raises(DatasetError, match=r"shard-00001.lmdb: key \d+ \(sample \d+\) is corrupt"):
        ds[bad[0]]
    ds[0]  # the other shard is fine
    with pytest.raises(DatasetError, match="checksum|corrupt"):
        ds.verify()
    shard.write_bytes(bytes(data[:4096]))  # truncate
    ds2 = LmdbDataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match="shard-00001.lmdb"):
        ds2[15]
    shard.unlink()
    with pytest.raises(DatasetError, match="shard file\\(s\\) missing: .*shard-00001.lmdb"):
        LmdbDataset(tmp_path / "ds")


def _raises(ds, k):
    try:
        ds[k]
        return False
    except DatasetError:
        return True


def test_interrupted_ingest_leaves_nothing(tmp_path):
    f = _write(tmp_path / "a.xyz", _frames(400))
    script = (f"import os, lamm_ds.shards.format as F\n"
              f"orig = F.DatasetWriter.add\n"
              f"def add(self, *a):\n"
              f"    if self.count == 150: os.kill(os.getpid(), 9)\n"
              f"    return orig(self, *a)\n"
              f"F.DatasetWriter.add = add\n"
              f"from lamm_ds.ingest import ingest, IngestOptions\n"
              f"ingest([{f!r}], {str(tmp_path / 'ds')!r}, IngestOptions(name='t', progress=False))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert not (tmp_path / "ds").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ds.ingest")]
    assert leftovers and not (leftovers[0] / "manifest.json").exists()  # nothing that looks complete
    ingest([f], tmp_path / "ds", IngestOptions(name="t", progress=False))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.ingest")]  # stale temp cleaned


def test_cli_ingest_and_info_json(tmp_path, capsys):
    f = _write(tmp_path / "a.xyz", _frames(5))
    assert cli_main(["ingest", f, "--name", "cli", "--out", str(tmp_path / "ds"), "--quiet",
                     "--level-of-theory", "PBE"]) == 0
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "ds"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["name"] == "cli" and m["level_of_theory"] == "PBE" and m["num_samples"] == 5
    assert m["graph"]["cutoff"] == 6.0 and m["checksum"].startswith("sha256:")
    assert cli_main(["ingest", f, "--name", "cli", "--out", str(tmp_path / "ds"), "--quiet"]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_parallel_extxyz_ranges_give_the_serial_dataset(tmp_path, monkeypatch):
    """With workers > 1 the workers parse byte ranges of extxyz files themselves; a mix of such files
    and files read in the main process (a .traj) gives the same dataset, byte for byte, as one worker
    and as ASE's own reader of the whole file (the fast frame parser and its ranges switched off)."""
    import lamm_ds.ingest.pipeline as pipeline
    import lamm_ds.ingest.xyz_chunks as xyz_chunks

    for module in (pipeline, xyz_chunks):  # several ranges per file, a short last one
        monkeypatch.setattr(module, "RANGE_FRAMES", 7)
    frames = _frames(60)
    f1 = _write(tmp_path / "a.xyz", frames[:31])
    traj = tmp_path / "b.traj"
    ase.io.write(traj, frames[31:45])
    f3 = _write(tmp_path / "c.extxyz", frames[45:])
    with open(f3, "a") as fh:
        fh.write("\n\n")  # trailing blank lines end a file, as for the serial reader
    inputs = [f1, str(traj), f3]
    r1 = ingest(inputs, tmp_path / "w1", _opts(workers=1))
    r2 = ingest(inputs, tmp_path / "w2", _opts(workers=2))
    assert r1.read == r2.read == 60 and r2.written == 60
    m1, m2 = read_manifest(tmp_path / "w1"), read_manifest(tmp_path / "w2")
    assert m1["checksum"] == m2["checksum"] and m1["manifest_checksum"] == m2["manifest_checksum"]
    with monkeypatch.context() as m:
        m.setattr(xyz_chunks, "frame_ranges", lambda *a: None)  # the whole file through ase.io.iread
        ingest(inputs, tmp_path / "ase", _opts(workers=1))
    assert read_manifest(tmp_path / "ase")["checksum"] == m1["checksum"]
    ds = LmdbDataset(tmp_path / "w2")
    assert [(ds[k].source, ds[k].source_index) for k in (0, 30, 31, 45, 59)] == \
        [(f1, 0), (f1, 30), (str(traj), 0), (f3, 0), (f3, 14)]


def test_parallel_extxyz_errors_name_the_structure(tmp_path, monkeypatch):
    import lamm_ds.ingest.pipeline as pipeline

    import lamm_ds.ingest.xyz_chunks as xyz_chunks

    for module in (pipeline, xyz_chunks):
        monkeypatch.setattr(module, "RANGE_FRAMES", 4)
    f = _write(tmp_path / "a.xyz", _frames(12))
    lines = Path(f).read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip().isdigit()]
    atom_line = starts[9] + 2  # first atom line of structure 9 (its third range)
    lines[atom_line] = lines[atom_line].replace(lines[atom_line].split()[1], "1.0.0", 1)
    Path(f).write_text("".join(lines))
    messages = []
    for w in (1, 2):
        with pytest.raises(IngestError) as exc:
            ingest([f], tmp_path / f"w{w}", _opts(workers=w))
        messages.append(str(exc.value))
        _assert_nothing_left(tmp_path, f"w{w}")
    assert messages[0] == messages[1] and "structure 9 (line" in messages[1] and f in messages[1]
    # and a file without labels is refused by the ranged path as by the serial one
    bare = tmp_path / "bare.xyz"
    ase.io.write(bare, [molecule("H2O"), molecule("CH4")], format="extxyz")
    with pytest.raises(IngestError, match="no structure has an energy, forces or stress label"):
        ingest([str(bare)], tmp_path / "bare", _opts(workers=2))


def test_frame_ranges_cut_only_regular_extxyz(tmp_path):
    """Ranges cover every frame exactly once (CRLF line ends too); anything irregular is left to the
    serial reader (None)."""
    from lamm_ds.ingest.xyz_chunks import frame_ranges

    f = Path(_write(tmp_path / "a.xyz", _frames(10)))
    ranges = frame_ranges(f, 3)
    assert [(r.first, r.count) for r in ranges] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    data = f.read_bytes()
    assert b"".join(data[r.start:r.end] for r in ranges) == data
    crlf = tmp_path / "crlf.xyz"
    crlf.write_bytes(data.replace(b"\n", b"\r\n"))
    assert [r.count for r in frame_ranges(crlf, 4)] == [4, 4, 2]
    lines = data.decode().splitlines(keepends=True)
    for name, text in (("blank.xyz", "".join(lines[:5] + ["\n"] + lines[5:])),
                       ("truncated.xyz", "".join(lines[:-1])),
                       ("bom.xyz", "\ufeff" + data.decode())):
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert frame_ranges(tmp_path / name, 3) is None, name
    (tmp_path / "a.xyz.gz").write_bytes(b"")
    assert frame_ranges(tmp_path / "a.xyz.gz", 3) is None
    assert frame_ranges(tmp_path / "a.traj", 3) is None
