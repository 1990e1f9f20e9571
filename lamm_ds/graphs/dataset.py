"""Map-style dataset that turns stored structures into graph samples inside DataLoader workers."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

from lamm_ds.graphs.collate import GraphSample, build_sample
from lamm_ds.shards import LmdbDataset


class GraphDataset(Dataset):
    """Items are addressed by ``(dataset_id, index)`` or ``(dataset_id, index, draw_id)`` keys.

    The neighbour list is computed here, i.e. in the worker process that loads the sample, at the
    model's cutoff and ``max_neighbors`` (not necessarily those used for the stored edge counts).
    """

    def __init__(self, datasets: Sequence[LmdbDataset], cutoff: float, max_neighbors: int | None,
                 backend: str = "vesin", strict: bool = True):
        self.datasets = list(datasets)
        self.cutoff = cutoff
        self.max_neighbors = max_neighbors
        self.backend = backend
        self.strict = strict

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key) -> GraphSample:
        if isinstance(key, int):  # flat index over all datasets, for plain samplers
            for k, d in enumerate(self.datasets):
                if key < len(d):
                    key = (k, key)
                    break
                key -= len(d)
            else:
                raise IndexError("flat index out of range")
        dataset_id, index, *rest = key
        draw_id = rest[0] if rest else -1
        structure = self.datasets[dataset_id][int(index)]
        return build_sample(structure, self.cutoff, self.max_neighbors, int(dataset_id), int(index),
                            int(draw_id), self.backend, self.strict)
