"""Ingest of the real DFT sets in ../shared/data (skipped when they are absent)."""

import ase.io
import numpy as np
import pytest

from lamm_ds.ingest import IngestOptions, LabelKeys, ingest
from lamm_ds.shards import LmdbDataset

SETS = [
    ("acac/train_300K.xyz", LabelKeys()),
    ("acac/test_MD_600K.xyz", LabelKeys()),
    ("3bpa/train_300K.xyz", LabelKeys()),
    # mlearn's virial_stress_kbar uses another sign convention and component order than ASE (see
    # docs/data.md), so its stress is not ingested here.
    ("mlearn/Si/training.xyz", LabelKeys()),
    ("mlearn/Mo/test.xyz", LabelKeys()),
]


@pytest.mark.parametrize("rel,keys", SETS, ids=[s[0] for s in SETS])
def test_ingest_real_dataset(shared_data, tmp_path, rel, keys):
    src = shared_data / rel
    rep = ingest([str(src)], tmp_path / "ds", IngestOptions(name=rel.split("/")[0], keys=keys, workers=2,
                                                            progress=False))
    frames = ase.io.read(src, ":")
    assert rep.read == len(frames) == rep.written + rep.dropped
    ds = LmdbDataset(tmp_path / "ds")
    assert ds.index["has_energy"].all() and ds.index["has_forces"].all()
    for k in range(0, len(ds), max(1, len(ds) // 25)):
        s, a = ds[k], frames[k]
        np.testing.assert_array_equal(s.positions, a.positions)
        np.testing.assert_array_equal(s.forces, a.get_forces())
        assert s.energy == a.get_potential_energy()
        np.testing.assert_array_equal(s.pbc, a.pbc)
    assert ds.nedges.min() > 0
