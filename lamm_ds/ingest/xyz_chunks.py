"""Extended-XYZ files cut into byte ranges of whole frames, parsed fast and in parallel.

Parsing is most of an ingest's cost for (ext)xyz, and a single file read in the main process caps
``--workers`` at that rate. The main process therefore only finds where frames start (count line,
comment line, n atom lines: a byte scan, ~5 µs per frame) and hands ranges of frames to the workers
(or, with one worker, reads them itself the same way). Each frame is parsed by
:mod:`lamm_ds.ingest.fast_extxyz`, which gives exactly ASE's result for the common layout, and by
ASE's extxyz reader when it is anything else.

Only plain (uncompressed) ``.xyz`` / ``.extxyz`` files with a regular layout are cut: anything else
(a blank line inside, a non-integer count, a truncated last frame, ``VEC`` lines) returns ``None``
and the file goes through the serial ASE reader, whose checks name the fault.
"""

from __future__ import annotations

import io
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lamm_ds.ingest.fast_extxyz import parse_frame
from lamm_ds.ingest.readers import IngestError, LabelKeys, _parse_failure, atoms_to_structure, iter_ase
from lamm_ds.structure import Structure

CHUNKABLE_SUFFIXES = (".xyz", ".extxyz")
RANGE_FRAMES = 256  # frames per range: a worker's task


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
    """Parse one range; structures are numbered and named as the serial reader numbers them. Raises
    IngestError (from the serial reader's own diagnosis) on a bad frame."""
    with open(r.path, "rb") as fh:
        fh.seek(r.start)
        data = fh.read(r.end - r.start)
    out: list[Structure] = []
    try:
        # split on "\n" only, as the byte scan did: a stray "\r" or form feed stays inside its line
        lines = data.decode("utf-8").split("\n")
        at = 0
        for k in range(r.count):
            n = int(lines[at])
            frame = parse_frame(lines[at + 1], lines[at + 2:at + 2 + n]) or _ase_frame(lines[at:at + 2 + n])
            out.append(atoms_to_structure(frame, r.path, r.first + k, keys))
            at += 2 + n
    except Exception as exc:  # noqa: BLE001 - ASE raises many types; the serial diagnosis names the frame
        if isinstance(exc, IngestError):
            raise
        raise IngestError(_parse_failure(Path(r.path), r.first + len(out), exc)) from exc
    return out


def _ase_frame(lines: list[str]):
    import ase.io

    return ase.io.read(io.StringIO("\n".join(lines) + "\n"), index=0, format="extxyz")


def iter_ase_source(path: Path, ctx, spec) -> Iterator[Structure]:
    """``--format ase`` (the reader signature of lamm_ds.ingest.formats): plain extxyz files by
    ranges as above, everything else through ASE."""
    ranges = frame_ranges(path, RANGE_FRAMES)
    if ranges is None:
        yield from iter_ase(path, ctx.keys)
        return
    for r in ranges:
        yield from read_range(r, ctx.keys)
