"""Read-only, fork-safe random access to a lamm-ds dataset directory."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import lmdb
import numpy as np

from lamm_ds.shards.format import INDEX_ARRAYS, INDEX_DIR, SHARD_DIR, read_manifest, record_key
from lamm_ds.structure import RecordError, Structure, decode


class DatasetError(RuntimeError):
    """A record is missing or corrupt; the message names the shard file and key."""


# One environment per shard file and process: LMDB refuses a second open of the same file in a
# process, and an environment must not cross a fork (DataLoader workers), so handles live here,
# keyed by path, tagged with the owning pid and the file's identity (a rewritten file is reopened).
_ENVS: dict[str, tuple[int, tuple, lmdb.Environment]] = {}


def _file_identity(path: Path) -> tuple:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_env(path: Path) -> lmdb.Environment:
    key = str(path)
    try:
        identity = _file_identity(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: shard file missing") from None
    entry = _ENVS.get(key)
    if entry is not None:
        pid, ident, env = entry
        if pid == os.getpid() and ident == identity:
            return env
        # Also in a forked child: closing only unmaps the child's copy (read-only, lock-free env),
        # and LMDB refuses to reopen a path while the inherited handle is alive.
        env.close()
        del _ENVS[key], entry, env
    try:
        env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=False, meminit=False,
                        max_readers=1)
    except lmdb.Error as exc:
        raise DatasetError(f"{path}: cannot open LMDB shard (truncated or corrupt?): {exc}") from exc
    _ENVS[key] = (os.getpid(), identity, env)
    return env


def _close_env(path: Path) -> None:
    entry = _ENVS.pop(str(path), None)
    if entry is not None:
        entry[2].close()


def _record(txn, path: Path, local: int, index: int) -> bytes:
    """Record ``local`` of shard ``path`` (sample ``index``) in an open read transaction."""
    data = txn.get(record_key(local))
    if data is None:
        raise DatasetError(f"{path}: key {local} (sample {index}) is missing")
    return data


def _read_failed(path: Path, local: int, index: int, exc: lmdb.Error) -> DatasetError:
    return DatasetError(f"{path}: key {local} (sample {index}): LMDB read failed: {exc}")


class LmdbDataset:
    """Structures of one dataset directory, indexed ``0 .. len-1`` across all its shards.

    LMDB environments are opened lazily and re-opened in every new process (DataLoader workers
    fork after construction; an environment must not cross a fork). The per-sample index arrays
    (natoms, nedges, has_energy, has_forces, has_stress) are memory-mapped, never loaded.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.name: str = self.manifest["name"]
        self.shard_size: int = int(self.manifest["shard_size"])
        self.shard_paths = [self.path / SHARD_DIR / s for s in self.manifest["shards"]]
        missing = [str(p) for p in self.shard_paths if not p.is_file()]
        if missing:
            raise DatasetError(f"{self.path}: shard file(s) missing: {', '.join(missing)}")
        self._len = int(self.manifest["num_samples"])
        self.index: dict[str, np.ndarray] = {}
        for name in INDEX_ARRAYS:
            file = self.path / INDEX_DIR / f"{name}.npy"
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{file}: unreadable index array: {exc}") from exc
            if arr.shape != (self._len,):
                raise DatasetError(f"{file}: shape {arr.shape}, manifest says {self._len} samples")
            self.index[name] = arr

    def __len__(self) -> int:
        return self._len

    natoms = property(lambda self: self.index["natoms"], doc="atoms per sample (memory-mapped)")
    nedges = property(lambda self: self.index["nedges"], doc="stored edges per sample (memory-mapped)")

    def _env(self, shard: int) -> lmdb.Environment:
        return _open_env(self.shard_paths[shard])

    def raw(self, index: int) -> bytes:
        """The stored bytes of sample ``index``."""
        if not -self._len <= index < self._len:
            raise IndexError(f"{self.path}: index {index} out of range for {self._len} samples")
        index %= self._len
        shard, local = divmod(index, self.shard_size)
        path = self.shard_paths[shard]
        try:
            with self._env(shard).begin(buffers=False) as txn:
                return _record(txn, path, local, index)
        except lmdb.Error as exc:
            raise _read_failed(path, local, index, exc) from exc

    def __getitem__(self, index: int) -> Structure:
        return self._decoded(self.raw(index), index)

    def _decoded(self, data: bytes, index: int) -> Structure:
        try:
            return decode(data)
        except (RecordError, KeyError, ValueError, TypeError) as exc:
            shard, local = divmod(index % self._len, self.shard_size)
            raise DatasetError(f"{self.shard_paths[shard]}: key {local} (sample {index}) is corrupt: {exc}") from exc

    def verify(self, decode: bool = True) -> None:
        """Re-read every record and recompute the manifest checksum; raises on any mismatch. With
        ``decode`` (the default, ``lamm-ds verify``) every record is also decoded, so its CRC and
        fields are checked. Ingest passes ``decode=False``: it verifies bytes it has just encoded and
        hashed, so an equal SHA-256 over the read-back bytes proves them intact, and decoding again
        would only re-test ``encode`` (~20 µs a record, serial in the main process). One read
        transaction per shard: a transaction and file check per record cost as much as the decode."""
        digest = hashlib.sha256()
        for shard, path in enumerate(self.shard_paths):
            first = shard * self.shard_size
            local = 0
            try:
                with self._env(shard).begin(buffers=False) as txn:
                    for local in range(min(self.shard_size, self._len - first)):
                        index = first + local
                        data = _record(txn, path, local, index)
                        if decode:
                            self._decoded(data, index)
                        digest.update(struct.pack("<QQ", index, len(data)))
                        digest.update(data)
            except lmdb.Error as exc:
                raise _read_failed(path, local, first + local, exc) from exc
        for name in INDEX_ARRAYS:
            digest.update(name.encode() + np.ascontiguousarray(self.index[name]).tobytes())
        if "sha256:" + digest.hexdigest() != self.manifest["checksum"]:
            raise DatasetError(f"{self.path}: checksum mismatch (data changed since ingest)")

    def close(self) -> None:
        for path in self.shard_paths:
            _close_env(path)
