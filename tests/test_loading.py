import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lamm_ds.graphs import GraphDataset, collate
from lamm_ds.neighbors import radius_graph
from lamm_ds.shards import LmdbDataset


def test_demo_sets_have_the_promised_labels(demo_data):
    metals = LmdbDataset(demo_data["demo_metals"])
    energy = LmdbDataset(demo_data["demo_energy"])
    mols = LmdbDataset(demo_data["demo_molecules"])
    down = LmdbDataset(demo_data["demo_downstream"])
    assert metals.index["has_energy"].all() and metals.index["has_forces"].all()
    assert metals.index["has_stress"].any() and not metals.index["has_stress"].all()  # bulk only
    assert energy.index["has_energy"].all() and not energy.index["has_forces"].any()
    assert not mols.index["has_energy"].any() and not mols.index["has_forces"].any()
    assert (mols.natoms >= 2).all()
    assert set(down.manifest["elements"]) <= {29, 46, 79}
    s = metals[0]
    assert s.pbc[:2].all() and s.natoms >= 7
    # EMT labels are real: forces on a rattled cell are not zero and sum to ~0
    f = np.concatenate([metals[k].forces for k in range(5)])
    assert np.abs(f).max() > 1e-3


def test_make_demo_is_idempotent(demo_data):
    from lamm_ds.demo import make_demo

    before = (demo_data["demo_metals"] / "manifest.json").stat().st_mtime_ns
    make_demo(demo_data["demo_metals"].parent)
    assert (demo_data["demo_metals"] / "manifest.json").stat().st_mtime_ns == before


def test_stored_edge_counts_match_graph_building(demo_data):
    ds = LmdbDataset(demo_data["demo_metals"])
    g = ds.manifest["graph"]
    for k in range(0, len(ds), 7):
        s = ds[k]
        assert radius_graph(s.positions, s.cell, s.pbc, g["cutoff"], g["max_neighbors"]).num_edges == ds.nedges[k]


@pytest.mark.parametrize("workers", [0, 2])
def test_multiworker_loading_is_complete_and_consistent(demo_data, workers):
    sets = [LmdbDataset(demo_data[n]) for n in ("demo_metals", "demo_molecules")]
    sets[0][0]  # open an environment in the parent before the workers fork
    gd = GraphDataset(sets, cutoff=5.0, max_neighbors=20)
    keys = [(k, i) for k, d in enumerate(sets) for i in range(len(d))]
    loader = DataLoader(keys, batch_size=8, num_workers=workers, collate_fn=lambda ks: collate([gd[x] for x in ks]))
    seen = []
    for batch in loader:
        assert batch.pos.dtype == torch.float32 and batch.edge_index.max() < batch.num_atoms
        d = batch.edge_vectors().norm(dim=1)
        assert (d < 5.0 + 1e-4).all()
        counts = torch.bincount(batch.edge_index[0], minlength=batch.num_atoms)
        assert counts.max() <= 20
        seen += list(zip(batch.dataset_id.tolist(), batch.sample_id.tolist()))
        assert (batch.has_energy == (batch.dataset_id == 0)).all()
    assert sorted(seen) == sorted(keys)


def test_edge_vectors_differentiable(demo_data):
    gd = GraphDataset([LmdbDataset(demo_data["demo_metals"])], cutoff=4.0, max_neighbors=None)
    b = collate([gd[(0, 0)], gd[(0, 1)]], dtype=torch.float64)
    pos = b.pos.clone().requires_grad_(True)
    cell = b.cell.clone().requires_grad_(True)
    (b.edge_vectors(pos, cell).norm(dim=1).sum()).backward()
    assert pos.grad is not None and cell.grad.abs().sum() > 0


def test_batch_select_roundtrip(demo_data):
    gd = GraphDataset([LmdbDataset(demo_data["demo_metals"])], cutoff=4.0, max_neighbors=12)
    samples = [gd[(0, k)] for k in range(5)]
    full = collate(samples)
    part = full.select([3, 1])
    ref = collate([samples[3], samples[1]])
    for name in ("pos", "z", "batch", "edge_index", "shifts", "forces", "natoms"):
        assert torch.equal(getattr(part, name), getattr(ref, name)), name


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 22])
def test_labelled_sample_is_the_whole_array_draw_in_chunks(chunk):
    """fit_stats picks the same structures as drawing from all labelled indices at once (what it did
    before it worked in chunks), whatever the chunk size; fewer labelled than asked: all of them."""
    from lamm_ds.engine.data import labelled_sample

    rng = np.random.default_rng(3)
    for n, p in ((500, 0.3), (500, 0.0), (1000, 0.9), (37, 1.0)):
        he, hf = rng.random(n) < p, rng.random(n) < p / 2
        labelled = np.flatnonzero(he | hf)
        for samples, seed in ((10, 0), (100, 4), (len(labelled), 1), (len(labelled) + 5, 2)):
            got = labelled_sample(he, hf, samples, seed, chunk=chunk)
            want = labelled if len(labelled) <= samples else \
                np.sort(np.random.default_rng(seed).choice(labelled, samples, replace=False))
            np.testing.assert_array_equal(got, want)
