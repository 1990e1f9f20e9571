"""A fixed subset of a dataset (replay of pre-training data during fine-tuning, or any ``samples: N``
entry): the same interface as :class:`~lamm_ds.shards.dataset.LmdbDataset`, indexed ``0 .. N-1``."""

from __future__ import annotations

import numpy as np

from lamm_ds.shards.dataset import LmdbDataset
from lamm_ds.structure import Structure


class SubsetDataset:
    """Samples ``indices`` (sorted, unique) of ``base``; its index arrays are the subset's (in RAM: a
    subset is small), its manifest the base's with the subset's label counts."""

    def __init__(self, base: LmdbDataset, indices) -> None:
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        if indices.size == 0 or indices[0] < 0 or indices[-1] >= len(base):
            raise ValueError(f"{base.path}: a subset needs indices in 0..{len(base) - 1}, got {indices.size} "
                             "indices" + (f" spanning {indices[0]}..{indices[-1]}" if indices.size else ""))
        self.base, self.indices = base, indices
        self.path, self.name, self.shard_size = base.path, base.name, base.shard_size
        self.index = {k: np.asarray(v[indices]) for k, v in base.index.items()}
        has = {k: self.index.get(f"has_{k}", np.zeros(indices.size, bool)) for k in ("energy", "forces", "stress")}
        unlabelled = ~(has["energy"] | has["forces"] | has["stress"])
        self.manifest = {**base.manifest, "num_samples": int(indices.size),
                         "label_counts": {**{k: int(v.sum()) for k, v in has.items()},
                                          "unlabelled": int(unlabelled.sum())},
                         "subset_of": {"path": str(base.path), "num_samples": len(base)}}

    def __len__(self) -> int:
        return int(self.indices.size)

    natoms, nedges = LmdbDataset.natoms, LmdbDataset.nedges  # read from this subset's own index

    def source_index(self, index: int) -> int:
        """The base dataset's index of subset sample ``index``."""
        return int(self.indices[index])

    def raw(self, index: int) -> bytes:
        return self.base.raw(self.source_index(index))

    def __getitem__(self, index: int) -> Structure:
        return self.base[self.source_index(index)]
