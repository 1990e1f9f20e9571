"""Extended-XYZ files cut into byte ranges of whole frames, so ingest workers parse in parallel.

Parsing is most of an ingest's cost for (ext)xyz (ASE's parser: ~300 µs for a 27-atom frame), and a
single file read in the main process caps ``--workers`` at that rate. The main process therefore only
finds where frames start (count line, comment line, n atom lines: a byte scan, ~5 µs per frame) and
hands ranges of frames to the workers, which parse them with ASE exactly as the serial reader does.

Only plain (uncompressed) ``.xyz`` / ``.extxyz`` files with a regular layout are cut: anything else
(a blank line inside, a non-integer count, a truncated last frame, ``VEC`` lines) returns ``None``
and the file goes through the serial reader, whose checks name the fault.
"""

from __future__ import annotations

import io
from array import array
from dataclasses import dataclass
from pathlib import Path

from lamm_ds.ingest.readers import IngestError, LabelKeys, _parse_failure, atoms_to_structure
from lamm_ds.structure import Structure

CHUNKABLE_SUFFIXES = (".xyz", ".extxyz")


@dataclass(frozen=True)
class FrameRange:
    """Frames ``first .. first + count - 1`` of ``path``, stored in bytes ``[start, end)``."""

    path: str
    first: int
    count: int
    start: int
    end: int


def frame_offsets(path: str | Path) -> array | None:
    """Byte offset of every frame's count line, then the file's end; None for an irregular layout.
    (8 bytes per frame: a 10^7-frame file costs 80 MB here, not the 0.4 GB of a list of ints.)"""
    offsets = array("q")
    pos = 0
    with open(path, "rb") as fh:
        readline = fh.readline
        while True:
            line = readline()
            if not line:
                break
            text = line.strip()
            if not text.isdigit():
                if not text and not fh.read().strip():
                    break  # trailing blank lines end the file
                return None
            offsets.append(pos)
            pos += len(line)
            for _ in range(int(text) + 1):  # comment line + atom lines
                line = readline()
                if not line:
                    return None  # truncated last frame
                pos += len(line)
    if not offsets:
        return None
    offsets.append(pos)
    return offsets


def frame_ranges(path: str | Path, frames_per_range: int) -> list[FrameRange] | None:
    """``path`` cut into ranges of ``frames_per_range`` frames, or None when it cannot be cut."""
    if Path(path).suffix.lower() not in CHUNKABLE_SUFFIXES:
        return None
    offsets = frame_offsets(path)
    if offsets is None:
        return None
    n = len(offsets) - 1
    out = []
    for a in range(0, n, frames_per_range):
        b = min(n, a + frames_per_range)
        out.append(FrameRange(str(path), a, b - a, offsets[a], offsets[b]))
    return out


def read_range(r: FrameRange, keys: LabelKeys) -> list[Structure]:
    """Parse one range with ASE's extxyz reader; structures are numbered and named as the serial
    reader numbers them. Raises IngestError (from the serial reader's own diagnosis) on a bad frame."""
    import ase.io

    with open(r.path, "rb") as fh:
        fh.seek(r.start)
        data = fh.read(r.end - r.start)
    out: list[Structure] = []
    try:
        text = data.decode("utf-8")
        for k, atoms in enumerate(ase.io.iread(io.StringIO(text), index=":", format="extxyz")):
            out.append(atoms_to_structure(atoms, r.path, r.first + k, keys))
    except Exception as exc:  # noqa: BLE001 - ASE raises many types; the serial diagnosis names the frame
        if isinstance(exc, IngestError):
            raise
        raise IngestError(_parse_failure(Path(r.path), r.first + len(out), exc)) from exc
    if len(out) != r.count:
        raise IngestError(f"{r.path}: ASE read {len(out)} structures in frames {r.first}..{r.first + r.count - 1}, "
                          f"expected {r.count}")
    return out
