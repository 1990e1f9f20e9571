"""The atomic structure record that flows through lamm-ds, and its pickle-free binary codec.

A record is ``MAGIC | crc32(payload) | payload`` where the payload is a msgpack map whose array
fields are raw little-endian bytes of a fixed dtype. Nothing in it can execute code when read.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

MAGIC = b"LMR1"
_HEADER = struct.Struct("<4sI")

# field name -> (dtype, per-atom trailing shape or None for fixed shape)
_ARRAY_FIELDS: dict[str, tuple[str, tuple[int, ...]]] = {
    "numbers": ("<i4", ()),
    "positions": ("<f8", (3,)),
    "forces": ("<f8", (3,)),
    "fixed": ("|u1", ()),
    "tags": ("<i4", ()),
}


class RecordError(ValueError):
    """A stored record could not be decoded (corrupt bytes, wrong version, bad field)."""


@dataclass
class Structure:
    """One atomic structure with optional DFT labels (eV, Å, eV/Å, eV/Å^3)."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None  # full 3x3, ASE sign convention
    fixed: np.ndarray | None = None
    tags: np.ndarray | None = None
    source: str = ""
    source_index: int = -1
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int32).reshape(-1)
        n = self.numbers.shape[0]
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(n, 3)
        self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
        self.pbc = np.asarray(self.pbc, dtype=bool).reshape(3)
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=np.float64).reshape(n, 3)
        if self.stress is not None:
            self.stress = voigt_to_matrix(np.asarray(self.stress, dtype=np.float64))
        if self.fixed is not None:
            self.fixed = np.asarray(self.fixed, dtype=bool).reshape(n)
        if self.tags is not None:
            self.tags = np.asarray(self.tags, dtype=np.int32).reshape(n)
        if self.energy is not None:
            self.energy = float(self.energy)

    @property
    def natoms(self) -> int:
        return int(self.numbers.shape[0])

    def problems(self) -> list[str]:
        """Reasons this structure is unusable (non-finite values, bad numbers, periodic axis without a cell)."""
        out = []
        finite = self._all_finite()  # one test for the usual structure, the per-array ones only when it fails
        if not finite and not np.all(np.isfinite(self.positions)):
            out.append("non-finite positions")
        if not finite and not np.all(np.isfinite(self.cell)):
            out.append("non-finite cell")
        if self.numbers.min(initial=1) < 1 or self.numbers.max(initial=1) > 118:
            out.append("atomic numbers outside 1..118")
        if not finite and self.energy is not None and not math.isfinite(self.energy):
            out.append("non-finite energy")
        if not finite and self.forces is not None and not np.all(np.isfinite(self.forces)):
            out.append("non-finite forces")
        if not finite and self.stress is not None and not np.all(np.isfinite(self.stress)):
            out.append("non-finite stress")
        if not self.pbc.any():
            return out
        lengths = np.sqrt((self.cell * self.cell).sum(axis=1))
        for axis in range(3):
            if self.pbc[axis] and lengths[axis] < 1e-8:
                out.append(f"periodic along axis {axis} but the cell vector is zero")
        if self.pbc.all() and abs(det3(self.cell)) < 1e-6:
            out.append("periodic cell with zero volume")
        return out

    def _all_finite(self) -> bool:
        """Every float array finite: one sum each, since a NaN or inf anywhere makes the sum non-finite
        (a finite sum that overflows only sends the check to the per-array tests)."""
        total = float(self.positions.sum()) + float(self.cell.sum())
        for labels in (self.forces, self.stress):
            if labels is not None:
                total += float(labels.sum())
        if self.energy is not None:
            total += self.energy
        return math.isfinite(total)


def det3(m: np.ndarray) -> float:
    """The determinant of a 3x3 matrix by its triple product: np.linalg.det's LU costs ~10 µs a call,
    measurable per structure at ingest rates."""
    (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = np.asarray(m, dtype=np.float64).tolist()
    return a0 * (b1 * c2 - b2 * c1) - a1 * (b0 * c2 - b2 * c0) + a2 * (b0 * c1 - b1 * c0)


def voigt_to_matrix(stress: np.ndarray) -> np.ndarray:
    """Accept a 3x3 matrix or a 6-vector in ASE Voigt order (xx, yy, zz, yz, xz, xy)."""
    stress = np.asarray(stress, dtype=np.float64)
    if stress.shape == (3, 3):
        return stress
    if stress.size == 9:
        return stress.reshape(3, 3)
    if stress.size == 6:
        xx, yy, zz, yz, xz, xy = stress.reshape(6)
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise ValueError(f"stress must have 6 or 9 components, got shape {stress.shape}")


def _scalar_info(info: dict[str, Any]) -> dict[str, Any]:
    """Keep JSON-like scalars and short numeric lists; drop anything msgpack cannot hold safely."""
    kept: dict[str, Any] = {}
    for key, value in info.items():
        if isinstance(value, (np.generic,)):
            value = value.item()
        if isinstance(value, np.ndarray) and value.ndim <= 1 and value.dtype.kind in "biuf":
            value = value.tolist()
        if isinstance(value, (bool, int, float, str)):
            kept[str(key)] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            kept[str(key)] = list(value)
    return kept


def encode(s: Structure) -> bytes:
    """Serialise a structure to bytes (no pickle)."""
    payload: dict[str, Any] = {
        "v": 1,
        "numbers": s.numbers.astype("<i4").tobytes(),
        "positions": s.positions.astype("<f8").tobytes(),
        "cell": s.cell.astype("<f8").tobytes(),
        "pbc": [bool(p) for p in s.pbc],
        "energy": s.energy,
        "forces": None if s.forces is None else s.forces.astype("<f8").tobytes(),
        "stress": None if s.stress is None else s.stress.astype("<f8").tobytes(),
        "fixed": None if s.fixed is None else s.fixed.astype("|u1").tobytes(),
        "tags": None if s.tags is None else s.tags.astype("<i4").tobytes(),
        "source": s.source,
        "source_index": int(s.source_index),
        "info": _scalar_info(s.info),
    }
    body = msgpack.packb(payload, use_bin_type=True)
    return _HEADER.pack(MAGIC, zlib.crc32(body)) + body


def _array(payload: dict, name: str, n: int) -> np.ndarray | None:
    raw = payload.get(name)
    if raw is None:
        return None
    dtype, trailing = _ARRAY_FIELDS[name]
    arr = np.frombuffer(raw, dtype=dtype)
    expected = n * math.prod(trailing)
    if arr.size != expected:
        raise RecordError(f"field {name!r} has {arr.size} values, expected {expected}")
    return arr.reshape((n, *trailing)).copy()


def decode(data: bytes) -> Structure:
    """Inverse of :func:`encode`; raises :class:`RecordError` on any inconsistency."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise RecordError(f"record is {len(data)} bytes, shorter than its header")
    magic, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RecordError(f"bad magic {magic!r} (not a lamm-ds record)")
    body = data[_HEADER.size:]
    if zlib.crc32(body) != crc:
        raise RecordError("checksum mismatch (record bytes are corrupt)")
    try:
        payload = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RecordError(f"undecodable payload: {exc}") from exc
    if payload.get("v") != 1:
        raise RecordError(f"unsupported record version {payload.get('v')!r}")
    numbers = np.frombuffer(payload["numbers"], dtype="<i4").copy()
    n = numbers.shape[0]
    stress = payload.get("stress")
    return Structure(
        numbers=numbers,
        positions=_array(payload, "positions", n),
        cell=np.frombuffer(payload["cell"], dtype="<f8").reshape(3, 3).copy(),
        pbc=np.array(payload["pbc"], dtype=bool),
        energy=payload.get("energy"),
        forces=_array(payload, "forces", n),
        stress=None if stress is None else np.frombuffer(stress, dtype="<f8").reshape(3, 3).copy(),
        fixed=None if payload.get("fixed") is None else _array(payload, "fixed", n).astype(bool),
        tags=_array(payload, "tags", n),
        source=payload.get("source", ""),
        source_index=int(payload.get("source_index", -1)),
        info=payload.get("info") or {},
    )
