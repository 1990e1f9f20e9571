"""Pieces of bench/data_scale.py: the synthetic datasets keep exact labels and exact stored edge
counts (a rigid rotation of a real structure), the heavy-tailed sizes sum to the total, and the
index-only arrays open as the scheduler reads them."""

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import data_scale  # noqa: E402

from lamm_ds.neighbors import radius_graph  # noqa: E402
from lamm_ds.shards import LmdbDataset  # noqa: E402


def test_dataset_sizes_are_heavy_tailed_and_exact():
    sizes = data_scale.dataset_sizes(10**7)
    assert sum(sizes) == 10**7 and len(sizes) == data_scale.DATASETS
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    assert sizes[0] / sizes[-1] > 100


def test_random_rotations_are_proper():
    q = data_scale.random_rotations(np.random.default_rng(0), 64)
    np.testing.assert_allclose(q @ q.transpose(0, 2, 1), np.broadcast_to(np.eye(3), q.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(q), 1.0, atol=1e-12)


def _pool(tmp_path):
    from ase.build import bulk, molecule
    from ase.calculators.emt import EMT

    import ase.io

    frames = []
    for k in range(4):
        a = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 1)
        a.rattle(0.05, seed=k)
        a.calc = EMT()
        a.get_potential_energy(), a.get_forces(), a.get_stress()
        frames.append(a)
        m = molecule("CH3CH2OH")
        m.rattle(0.02, seed=k)
        m.calc = EMT()
        m.get_potential_energy(), m.get_forces()
        frames.append(m)
    src = tmp_path / "pool.xyz"
    ase.io.write(src, frames)
    data_scale.ingest_into([str(src)], tmp_path / "pool", 1)
    return tmp_path / "pool"


def test_synthetic_copies_keep_labels_and_edge_counts(tmp_path):
    pool_dir = _pool(tmp_path)
    name, n, _ = data_scale._write_synthetic((str(pool_dir), str(tmp_path / "syn"), 40, 7, "syn"))
    assert (name, n) == ("syn", 40)
    pool, syn = LmdbDataset(pool_dir), LmdbDataset(tmp_path / "syn")
    syn.verify()
    assert len(syn) == 40
    for k in range(len(syn)):
        s = syn[k]
        g = radius_graph(s.positions, s.cell, s.pbc, data_scale.CUTOFF, data_scale.MAX_NEIGHBORS)
        assert int(syn.nedges[k]) == g.num_edges  # the stored count is the rotated structure's own
        # the source structure: same species and energy; forces and stress rotated with it
        match = [p for p in (pool[j] for j in range(len(pool)))
                 if p.energy == s.energy and np.array_equal(p.numbers, s.numbers)]
        assert match, f"sample {k} has no source structure"
        p = match[0]
        d_src = np.linalg.norm(p.positions[:, None] - p.positions[None], axis=-1)
        d_syn = np.linalg.norm(s.positions[:, None] - s.positions[None], axis=-1)
        np.testing.assert_allclose(d_syn, d_src, atol=1e-9)
        np.testing.assert_allclose(np.linalg.norm(s.forces, axis=1), np.linalg.norm(p.forces, axis=1), atol=1e-9)
        if p.stress is not None:
            np.testing.assert_allclose(np.linalg.eigvalsh(s.stress), np.linalg.eigvalsh(p.stress), atol=1e-9)


def test_index_only_arrays_feed_the_scheduler(tmp_path):
    pool_dir = _pool(tmp_path)
    build = data_scale.build_index_only(tmp_path, [pool_dir], 5000, seed=0)
    again = data_scale.build_index_only(tmp_path, [pool_dir], 5000, seed=0)
    assert again == build  # reused, not rebuilt
    res = data_scale.probe(build["datasets"], True, [4, 16], 0, cold=False)
    assert res["samples"] == 5000
    assert set(res["plan_ms_per_step"]) == {"fixed/4x2", "balanced/4x2", "fixed/16x2", "balanced/16x2"}
    pool = LmdbDataset(pool_dir)
    natoms = np.concatenate([np.load(Path(d) / "natoms.npy") for d in build["datasets"]])
    assert set(np.unique(natoms)) <= set(np.unique(pool.natoms))


def test_status_mb_reads_this_process():
    mem = data_scale.status_mb()
    assert mem["VmRSS"] > 0 and mem["RssAnon"] > 0
