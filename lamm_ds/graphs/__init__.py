"""Graph samples, neighbour lists in DataLoader workers, and the flat AtomsBatch."""

from lamm_ds.graphs.batch import AtomsBatch
from lamm_ds.graphs.collate import GraphSample, build_sample, collate
from lamm_ds.graphs.dataset import GraphDataset

__all__ = ["AtomsBatch", "GraphDataset", "GraphSample", "build_sample", "collate"]
