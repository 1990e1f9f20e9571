"""Our dataset format: LMDB shards of pickle-free records, a manifest, memory-mapped index arrays."""

from lamm_ds.shards.dataset import DatasetError, LmdbDataset
from lamm_ds.shards.format import DatasetWriter, GraphSettings, is_dataset_dir, read_manifest

__all__ = ["DatasetError", "DatasetWriter", "GraphSettings", "LmdbDataset", "is_dataset_dir", "read_manifest"]
