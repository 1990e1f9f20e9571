"""Source files (extxyz, ASE db, anything ase.io reads, fairchem LMDB, and the paper's datasets in their
published formats: lamm_ds.ingest.formats, docs/datasets.md) -> lamm-ds datasets."""

from lamm_ds.ingest.pipeline import IngestOptions, IngestReport, ingest
from lamm_ds.ingest.readers import IngestError, LabelKeys

__all__ = ["IngestError", "IngestOptions", "IngestReport", "LabelKeys", "ingest"]
