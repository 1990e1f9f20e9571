"""On-disk layout of a lamm-ds dataset directory and its writer.

    DIR/manifest.json          name, level of theory, units, elements, label counts, graph settings,
                               format version, shard list, checksum
    DIR/index/natoms.npy       int32   per-sample arrays, memory-mapped by readers and the scheduler
    DIR/index/nedges.npy       int32   edges at the manifest's cutoff / max_neighbors
    DIR/index/has_energy.npy   bool
    DIR/index/has_forces.npy   bool
    DIR/index/has_stress.npy   bool
    DIR/shards/shard-00000.lmdb  one LMDB environment (a single file) per ``shard_size`` samples
    DIR/dropped.jsonl          every structure the ingest dropped, and why

Sample ``k`` lives in shard ``k // shard_size`` under the 8-byte big-endian key ``k % shard_size``, so
no per-sample lookup table is needed. Records are :mod:`lamm_ds.structure` bytes (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_DIR = "index"
SHARD_DIR = "shards"
DROPPED = "dropped.jsonl"
INDEX_ARRAYS = {
    "natoms": np.int32,
    "nedges": np.int32,
    "has_energy": np.bool_,
    "has_forces": np.bool_,
    "has_stress": np.bool_,
}
UNITS = {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3", "positions": "Å"}
_KEY = struct.Struct(">Q")
_MAP_SIZE = 1 << 40  # sparse: LMDB only reserves address space


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.lmdb"


def record_key(local_index: int) -> bytes:
    return _KEY.pack(local_index)


def is_dataset_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


MANIFEST_CHECKSUM = "manifest_checksum"


def read_manifest(path: str | os.PathLike) -> dict:
    """Load and sanity-check ``DIR/manifest.json``; errors name the file."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no manifest (not a lamm-ds dataset, or an unfinished ingest)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # a flipped byte can make it invalid UTF-8
        raise ValueError(f"{file}: corrupt manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{file}: corrupt manifest: not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {version!r}, this lamm-ds reads {FORMAT_VERSION}")
    for key, kind in _MANIFEST_FIELDS.items():  # a damaged key name would otherwise be a bare KeyError later
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{file}: corrupt manifest: {key!r} is missing or not a {kind.__name__}")
    stored = manifest.get(MANIFEST_CHECKSUM)  # absent in datasets written before it existed
    if stored is not None and stored != manifest_checksum(manifest):
        raise ValueError(f"{file}: corrupt manifest: its fields changed since ingest (manifest checksum mismatch)")
    return manifest


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 of every manifest field but itself (canonical JSON): the dataset checksum covers the
    records and index arrays, this one the descriptive fields (name, level of theory, counts, ...)."""
    fields = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    return "sha256:" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# fields every reader relies on (all written by DatasetWriter.finalize and the ingest)
_MANIFEST_FIELDS = {"name": str, "level_of_theory": str, "num_samples": int, "num_atoms": int, "elements": list,
                    "label_counts": dict, "shard_size": int, "shards": list, "checksum": str, "graph": dict,
                    "ingest": dict}


@dataclass
class GraphSettings:
    cutoff: float = 6.0
    max_neighbors: int | None = 50
    backend: str = "vesin"


class DatasetWriter:
    """Appends encoded records in order to fixed-size LMDB shards and collects the index arrays.

    Index values are streamed to raw files, so memory stays flat however many samples are written.
    """

    def __init__(self, root: str | os.PathLike, shard_size: int = 100_000):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.root = Path(root)
        self.shard_size = shard_size
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=False)
        (self.root / INDEX_DIR).mkdir()
        self._raw = {k: open(self.root / INDEX_DIR / f"{k}.raw", "wb") for k in INDEX_ARRAYS}
        self._rows: dict[str, list] = {k: [] for k in INDEX_ARRAYS}  # index values not yet in the raw streams
        self._env: lmdb.Environment | None = None
        self._txn = None
        self._pending = 0
        self.count = 0
        self._hash = hashlib.sha256()
        self.elements: set[int] = set()
        self.label_counts = {"energy": 0, "forces": 0, "stress": 0, "unlabelled": 0}
        self.shards: list[str] = []

    def _open_shard(self, k: int) -> None:
        self._close_shard()
        name = shard_name(k)
        self.shards.append(name)
        self._env = lmdb.open(str(self.root / SHARD_DIR / name), map_size=_MAP_SIZE, subdir=False,
                              meminit=False, map_async=True, lock=True)
        self._txn = self._env.begin(write=True)

    def _close_shard(self) -> None:
        if self._env is not None:
            self._txn.commit()
            self._env.sync(True)
            self._env.close()
            self._env = None
            self._txn = None
            # LMDB leaves a "-lock" file next to a subdir=False environment; it carries no data.
            lock = self.root / SHARD_DIR / (self.shards[-1] + "-lock")
            if lock.exists():
                lock.unlink()

    def add(self, record: bytes, numbers: np.ndarray, nedges: int, has_energy: bool, has_forces: bool,
            has_stress: bool) -> int:
        """Store one encoded record; returns its sample index."""
        k, local = divmod(self.count, self.shard_size)
        if local == 0:
            self._open_shard(k)
        key = record_key(local)
        self._txn.put(key, record, append=True)
        self._pending += 1
        if self._pending >= 1000:  # bound the size of one write transaction
            self._txn.commit()
            self._txn = self._env.begin(write=True)
            self._pending = 0
        self._hash.update(struct.pack("<QQ", self.count, len(record)))
        self._hash.update(record)
        row = self._rows
        row["natoms"].append(len(numbers))
        row["nedges"].append(int(nedges))
        row["has_energy"].append(bool(has_energy))
        row["has_forces"].append(bool(has_forces))
        row["has_stress"].append(bool(has_stress))
        if len(row["natoms"]) >= 4096:
            self._flush_rows()
        self.elements.update(np.asarray(numbers).tolist())
        self.label_counts["energy"] += bool(has_energy)
        self.label_counts["forces"] += bool(has_forces)
        self.label_counts["stress"] += bool(has_stress)
        self.label_counts["unlabelled"] += not (has_energy or has_forces or has_stress)
        self.count += 1
        return self.count - 1

    def _flush_rows(self) -> None:
        """Append the buffered index values to the raw streams (memory stays bounded)."""
        for name, dtype in INDEX_ARRAYS.items():
            self._raw[name].write(np.asarray(self._rows[name], dtype=dtype).tobytes())
            self._rows[name].clear()

    def finalize(self, manifest_fields: dict) -> dict:
        """Close shards, turn raw index streams into .npy files, write the manifest last."""
        self._close_shard()
        self._flush_rows()
        for name, dtype in INDEX_ARRAYS.items():
            self._raw[name].close()
            raw_path = self.root / INDEX_DIR / f"{name}.raw"
            values = np.fromfile(raw_path, dtype=dtype)
            if values.shape[0] != self.count:
                raise RuntimeError(f"{raw_path}: {values.shape[0]} index entries for {self.count} records")
            np.save(self.root / INDEX_DIR / f"{name}.npy", values)
            self._hash.update(name.encode() + values.tobytes())
            raw_path.unlink()
        natoms = np.load(self.root / INDEX_DIR / "natoms.npy", mmap_mode="r")
        manifest = {
            "format_version": FORMAT_VERSION,
            **manifest_fields,
            "units": UNITS,
            "num_samples": self.count,
            "num_atoms": int(natoms.sum(dtype=np.int64)) if self.count else 0,
            "elements": sorted(self.elements),
            "label_counts": self.label_counts,
            "shard_size": self.shard_size,
            "shards": self.shards,
            "checksum": "sha256:" + self._hash.hexdigest(),
        }
        manifest[MANIFEST_CHECKSUM] = manifest_checksum(manifest)
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.root / MANIFEST)
        return manifest

    def abort(self) -> None:
        """Release file handles after a failure (the caller deletes the temporary directory)."""
        try:
            if self._env is not None:
                self._txn.abort()
                self._env.close()
        finally:
            self._env = None
            for f in self._raw.values():
                f.close()
