"""MPtrj JSON reader (CHGNet's ``MPtrj_2022.9_full.json``): ``{mp_id: {frame_id: frame}}``.

A frame holds ``structure`` (a pymatgen Structure as a dict: ``lattice.matrix`` rows in Å and
``sites`` with ``species`` and Cartesian ``xyz``), ``uncorrected_total_energy`` and
``corrected_total_energy`` (eV), ``force`` (eV/Å), ``stress`` (kBar, VASP sign: positive is
compressive) and ``magmom``. pymatgen is not needed: the dict is read directly. The ~12 GB file is
streamed one material at a time, so memory stays at one material's frames.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers
from ase.units import GPa

from lamm_ds.ingest.readers import IngestError
from lamm_ds.structure import Structure

KBAR_TO_EV_PER_A3 = 0.1 * GPa  # 1 kBar = 0.1 GPa
_CHUNK = 1 << 22


class _Stream:
    """A growing text buffer over a file, for decoding one top-level JSON member at a time."""

    def __init__(self, fh):
        self.fh, self.buf, self.pos, self.eof = fh, "", 0, False

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.fh.read(max(_CHUNK, len(self.buf)))  # double on large members: linear total work
        self.eof = not data
        self.buf, self.pos = self.buf[self.pos:] + data, 0
        return not self.eof

    def peek(self) -> str:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def decode(self, decoder: json.JSONDecoder, path: Path):
        self.peek()
        while True:
            error = None
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
                # a number may continue in the next chunk; objects and strings end with their delimiter
                if end < len(self.buf) or self.eof or isinstance(value, (dict, list, str)):
                    self.pos = end
                    return value
            except json.JSONDecodeError as exc:
                error = exc
            if not self.more() and error is not None:
                raise IngestError(f"{path}: not valid JSON ({error.msg}); truncated or not an MPtrj file?") from None


def _expect(stream: _Stream, char: str, path: Path, what: str) -> None:
    if stream.peek() != char:
        raise IngestError(f"{path}: expected {char!r} {what}, found {stream.peek()!r} (MPtrj layout: "
                          "{mp_id: {frame_id: {structure, uncorrected_total_energy, force, stress, ...}}})")
    stream.pos += 1


def iter_materials(path: Path) -> Iterator[tuple[str, dict]]:
    """(mp_id, {frame_id: frame}) of the top-level object, one material decoded at a time."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    decoder = json.JSONDecoder()
    with opener(path, "rt", encoding="utf-8") as fh:
        stream = _Stream(fh)
        _expect(stream, "{", path, "at the start of the file")
        first = True
        while stream.peek() != "}":
            if not first:
                _expect(stream, ",", path, "between materials")
            first = False
            key = stream.decode(decoder, path)
            _expect(stream, ":", path, f"after the material id {key!r}")
            frames = stream.decode(decoder, path)
            if not isinstance(key, str) or not isinstance(frames, dict):
                raise IngestError(f"{path}: material {key!r} is a {type(frames).__name__}, expected an object "
                                  "of frames {frame_id: frame}")
            yield key, frames
            if stream.peek() == "":
                raise IngestError(f"{path}: the file ends inside the top-level object (truncated?)")


def _element(species: list, where: str) -> int:
    if len(species) != 1 or abs(float(species[0].get("occu", 1.0)) - 1.0) > 1e-6:
        raise IngestError(f"{where}: a site with partial or mixed occupancy {species}; only ordered structures "
                          "can be ingested")
    symbol = re.sub(r"[\d+\-.]+$", "", str(species[0].get("element", "")))  # "Fe2+" -> "Fe"
    if symbol not in atomic_numbers:
        raise IngestError(f"{where}: unknown element {species[0].get('element')!r}")
    return atomic_numbers[symbol]


def structure_arrays(structure: dict, where: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """(numbers, positions, cell, pbc) of a pymatgen Structure dict, without pymatgen."""
    try:
        lattice = structure["lattice"]
        cell = np.asarray(lattice["matrix"], dtype=np.float64).reshape(3, 3)
        sites = structure["sites"]
    except (KeyError, TypeError, ValueError) as exc:
        raise IngestError(f"{where}: the structure has no lattice.matrix (3x3) and sites ({exc!r})") from None
    numbers, positions = [], []
    for k, site in enumerate(sites):
        numbers.append(_element(site.get("species", []), f"{where}: site {k}"))
        xyz = site.get("xyz")
        positions.append(xyz if xyz is not None else np.asarray(site["abc"], dtype=np.float64) @ cell)
    pbc = np.asarray(lattice.get("pbc", (True, True, True)), dtype=bool)
    return numbers, np.asarray(positions, dtype=np.float64).reshape(-1, 3), cell, pbc


def _frame(frame: dict, where: str, key: str, allow_missing: bool):
    """(energy, forces, stress) of one frame, stress converted to eV/Å^3 with ASE's sign."""
    values = {}
    for name in (key, "force", "stress"):
        values[name] = frame.get(name)
        if values[name] is None and not allow_missing:
            raise IngestError(f"{where} has no '{name}' (pass --allow-missing-labels to store such frames without it)")
    stress = values["stress"]
    if stress is not None:
        stress = -np.asarray(stress, dtype=np.float64) * KBAR_TO_EV_PER_A3  # VASP: positive = compressive
    return values[key], values["force"], stress


def iter_mptrj(path: Path, ctx, spec) -> Iterator[Structure]:
    """Every frame: energy from ``--energy-kind`` (uncorrected by default), forces, stress; the other
    energy, ``mp_id`` and the frame id go to ``info``, magnetic moments are dropped."""
    kind, choice = spec.energy(ctx.energy_kind)
    other = "corrected_total_energy" if kind == "uncorrected" else "uncorrected_total_energy"
    index = 0
    for mp_id, frames in iter_materials(path):
        for frame_id, frame in frames.items():
            where = f"{path}: {mp_id} / {frame_id}"
            if not isinstance(frame, dict) or "structure" not in frame:
                raise IngestError(f"{where} has no 'structure'")
            numbers, positions, cell, pbc = structure_arrays(frame["structure"], where)
            energy, forces, stress = _frame(frame, where, choice.key, ctx.keys.allow_missing)
            info = {"mp_id": mp_id, "frame_id": frame_id}
            if frame.get(other) is not None:
                info[other] = float(frame[other])
            try:
                yield Structure(numbers=numbers, positions=positions, cell=cell, pbc=pbc, energy=energy,
                                forces=forces, stress=stress, source=str(path), source_index=index, info=info)
            except (ValueError, TypeError) as exc:
                raise IngestError(f"{where}: malformed labels: {exc}") from exc
            index += 1
