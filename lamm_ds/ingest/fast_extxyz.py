"""Extended-XYZ frames parsed without ASE, giving exactly the records ASE's reader gives.

ASE's extxyz reader costs ~150-250 µs per 20-60-atom frame (a character-by-character comment-line
parser, an ``Atoms`` and a calculator per frame); at the ingest rates LaMM needs that is most of the
time. This module reads the common layout directly: a comment line of ``key=value`` /
``key="quoted value"`` / bare ``key`` tokens, and atom lines whose ``Properties`` columns are
``species`` (or ``Z``), real (``R``) and integer (``I``) columns. It follows ASE's own rules for
that subset (values to ints, floats, booleans, arrays, ``_JSON``; ``Lattice`` / ``virial`` / ``stress``
as 3x3 in column order; which keys become calculator results; ``pbc`` defaults) and hands the result
to :func:`~lamm_ds.ingest.readers.atoms_to_structure`, so labels, keys and checks are the same code.

Anything outside that subset (escapes, brackets or quotes outside a quoted value, ``key = value``,
logical or extra string columns, ``move_mask``, lines with more or fewer columns than announced, an
unknown element, anything that raises) makes :func:`parse_frame` return ``None``; the caller then
parses that frame with ASE, whose result or error is the reference. ``tests/test_fast_extxyz.py``
checks record-for-record byte equality with ASE on the shared DFT sets and on frames written to hit
each rule.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import numpy as np
from ase.data import atomic_numbers

# A comment-line token: KEY, KEY=BARE or KEY="QUOTED", followed by whitespace or the end. Characters that
# open ASE's delimiters or escapes are not allowed outside a quoted value (such lines go to ASE), nor is an
# empty value: ASE's parser then reads the next token into it (key="" a=b gives key "a=b").
_TOKEN = re.compile(r'([^\s="\'\\{}\[\]]+)(?:=(?:"([^"\\]+)"|([^\s="\'\\{}\[\]]+)))?(?=\s|$)')
_SPACE = re.compile(r"\s*")
_PARTS = re.compile(r"[^\s,]+")  # how ASE splits a value into numbers / booleans
_BOOLEANS = {"T": True, "F": False, "true": True, "false": False, "True": True, "False": False,
             "TRUE": True, "FALSE": False}
# ASE's extxyz vocabulary, written out rather than imported: importing ase.io.extxyz imports every
# ase.io format (~0.3-0.5 s), which each spawned ingest worker paid before reading a frame.
# tests/test_fast_extxyz.py checks these equal the installed ASE's tables (ase.io.extxyz,
# ase.calculators.calculator), so an ASE that changes them fails the tests instead of diverging.
# Keys whose 9 numbers become 3x3 in Fortran (column) order, keys kept as text (compared
# lower-cased), column names -> ASE names:
_MATRIX_KEYS = frozenset({"Lattice", "virial", "stress"})
_RAW_KEYS = frozenset({"uid"})
_ASE_NAMES = {"pos": "positions", "Z": "numbers", "charge": "charges", "species": "symbols"}
# What ASE's reader moves into a SinglePointCalculator: columns named like any calculator property,
# then the per-structure properties among the comment-line keys
_CALC_COLUMNS = frozenset({"energy", "forces", "stress", "stresses", "dipole", "charges", "magmom", "magmoms",
                           "free_energy", "energies", "dielectric_tensor", "born_effective_charges",
                           "polarization"})
_CALC_INFO = frozenset({"energy", "free_energy", "stress", "dipole", "magmom", "polarization",
                        "dielectric_tensor"})
_CALC_SCALARS = ("energy", "magmom", "free_energy")  # kept as given; every other result becomes float
_DEFAULT_PROPERTIES = "species:S:1:pos:R:3"


class _Results:
    """The ``calc`` of a parsed frame: what atoms_to_structure reads of a SinglePointCalculator."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results


class ParsedFrame:
    """The parts of an ``ase.Atoms`` that :func:`~lamm_ds.ingest.readers.atoms_to_structure` reads."""

    constraints: tuple = ()

    def __init__(self, numbers, positions, cell, pbc, info, arrays, results) -> None:
        self.numbers, self.positions, self.cell, self.pbc = numbers, positions, cell, pbc
        self.info, self.arrays = info, arrays
        self.calc = _Results(results) if results else None

    def __len__(self) -> int:
        return len(self.numbers)

    def get_tags(self) -> np.ndarray:
        return self.arrays["tags"].copy() if "tags" in self.arrays else np.zeros(len(self), int)


class _Unsupported(Exception):
    """Outside the subset read here: the frame goes to ASE."""


def _value(key: str, text: str) -> Any:
    """A comment-line value converted as ASE converts it."""
    if key.lower() in _RAW_KEYS:
        return text
    parts = _PARTS.findall(text)
    value: Any = text
    if not _never_numeric(parts):
        try:
            # ASE tries int, then float; no integer parser takes a '.', so those go straight to float
            try:
                if any("." in p for p in parts):
                    raise ValueError
                number = np.array(parts, dtype=int)
            except (ValueError, OverflowError):
                number = np.array(parts, dtype=float)
            value = number[0] if len(number) == 1 else number
        except (ValueError, OverflowError):
            pass
    if key in _MATRIX_KEYS:
        if not isinstance(value, np.ndarray) or value.shape != (9,):
            raise _Unsupported(key)  # ASE raises here; let it say so
        value = value.reshape((3, 3), order="F")
    if isinstance(value, str):
        flags = [_BOOLEANS.get(p) for p in parts]
        if flags and all(f is not None for f in flags):
            value = flags[0] if len(flags) == 1 else flags
        elif value.startswith("_JSON "):
            decoded = json.loads(value[len("_JSON "):])
            value = np.array(decoded)
            if value.dtype.kind not in "ifb":
                value = decoded
    return value


def _never_numeric(parts: list[str]) -> bool:
    """Parts that neither int nor float conversion can take: saves two raised conversions for a
    boolean (pbc="T T T") or a word (config_type=bulk). A word is any alphabetic part except the
    ones float() reads (nan, inf, infinity)."""
    return any(p.isalpha() and p.lower() not in _FLOAT_WORDS for p in parts)


_FLOAT_WORDS = frozenset({"nan", "inf", "infinity"})


def comment_info(line: str) -> dict[str, Any]:
    """The comment line as ASE's ``key_val_str_to_dict`` would read it; raises _Unsupported outside
    the token forms described in the module docstring."""
    line = line.strip()
    info: dict[str, Any] = {}
    pos, end = 0, len(line)
    while pos < end:
        m = _TOKEN.match(line, pos)
        if m is None:
            raise _Unsupported(line)
        key, quoted, bare = m.groups()
        text = quoted if quoted is not None else bare if bare is not None else "T"
        info[key] = _value(key, text)
        pos = _SPACE.match(line, m.end()).end()
    return info


def _columns(properties: Any) -> tuple[tuple[tuple[str, str, int, int], ...], int]:
    """``Properties`` as (ASE name, type, first column, count) and the columns per atom line."""
    if not isinstance(properties, str):
        raise _Unsupported("Properties")
    return _parsed_columns(properties)


@functools.lru_cache(maxsize=256)  # a file has one or a few layouts; parsing it per frame is measurable
def _parsed_columns(properties: str) -> tuple[tuple[tuple[str, str, int, int], ...], int]:
    fields = properties.split(":")
    if len(fields) % 3:
        raise _Unsupported(properties)
    columns, seen, ncol = [], set(), 0
    for name, kind, count in zip(fields[0::3], fields[1::3], fields[2::3]):
        ase_name = _ASE_NAMES.get(name, name)
        if not count.isdigit() or int(count) < 1 or ase_name in seen or name == "move_mask":
            raise _Unsupported(properties)
        count = int(count)
        if kind == "S" and not (ase_name == "symbols" and count == 1):
            raise _Unsupported(properties)  # string columns other than the species
        if kind not in "RIS" or (ase_name in ("numbers", "symbols", "positions")
                                 and (count, kind) not in ((1, "I"), (1, "S"), (3, "R"))):
            raise _Unsupported(properties)
        seen.add(ase_name)
        columns.append((ase_name, kind, ncol, count))
        ncol += count
    names = [c[0] for c in columns]
    if "positions" not in names or ("symbols" in names) == ("numbers" in names):
        raise _Unsupported(properties)
    return tuple(columns), ncol


def _int_column(rows: list[list[str]], first: int, count: int) -> np.ndarray:
    """An integer property: Python's int(), as ASE's converter, stored as ASE's int32 field."""
    arr = np.array([[int(v) for v in r[first:first + count]] for r in rows], dtype=np.int32).reshape(len(rows), count)
    return arr[:, 0] if count == 1 else arr


@functools.lru_cache(maxsize=256)  # per layout, like _parsed_columns
def _real_blocks(columns: tuple[tuple[str, str, int, int], ...]) -> tuple[tuple[int, int], ...]:
    """(first, end) of each run of adjacent real columns: one float conversion per run, not per
    property (positions and forces side by side are one block)."""
    blocks: list[tuple[int, int]] = []
    for _, kind, first, count in columns:
        if kind != "R":
            continue
        if blocks and blocks[-1][1] == first:
            blocks[-1] = (blocks[-1][0], first + count)
        else:
            blocks.append((first, first + count))
    return tuple(blocks)


def _frame(comment: str, atom_lines: list[str]) -> ParsedFrame:
    info = comment_info(comment)
    pbc = info.pop("pbc", None)
    if pbc is None:
        pbc = [True] * 3 if "Lattice" in info else [False] * 3
    elif isinstance(pbc, (bool, np.bool_)):
        pbc = [bool(pbc)] * 3
    elif not (isinstance(pbc, list) and len(pbc) == 3):
        raise _Unsupported("pbc")
    lattice = info.pop("Lattice", None)
    cell = np.zeros((3, 3)) if lattice is None else np.array(lattice.T, dtype=np.float64)
    columns, ncol = _columns(info.pop("Properties", _DEFAULT_PROPERTIES))
    rows = [line.split() for line in atom_lines]
    if rows and set(map(len, rows)) != {ncol}:
        raise _Unsupported("columns")
    # one float conversion per run of real columns; each property then copies its own columns out
    # (contiguous arrays, as ASE's)
    block_of = {}
    for start, end in _real_blocks(columns):
        block = np.array([r[start:end] for r in rows], dtype=np.float64).reshape(len(rows), end - start)
        block_of.update({first: (block, start) for first in range(start, end)})
    arrays: dict[str, np.ndarray] = {}
    results: dict[str, Any] = {}
    numbers = None
    for name, kind, first, count in columns:
        if name == "symbols":
            numbers = np.array([atomic_numbers[r[first].capitalize()] for r in rows], dtype=int)
            continue
        if kind == "R":
            block, start = block_of[first]
            value = block[:, first - start:first - start + count].copy()
            value = value[:, 0] if count == 1 else value
        else:
            value = _int_column(rows, first, count)
        if name == "numbers":
            numbers = value.astype(int)
        elif name in _CALC_COLUMNS:
            results[name] = np.array(value, float)
        else:
            arrays[name] = value
    arrays["numbers"] = numbers
    for key in [k for k in info if k in _CALC_INFO]:
        value = info.pop(key)
        if key == "stress" and value.shape == (3, 3):  # ASE keeps stress as Voigt 6
            value = value[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        results[key] = value if key in _CALC_SCALARS else np.array(value, float)
    return ParsedFrame(numbers, arrays["positions"], cell, np.array(pbc, dtype=bool), info, arrays, results)


def parse_frame(comment: str, atom_lines: list[str]) -> ParsedFrame | None:
    """One frame (its comment line and atom lines), or None when ASE must read it."""
    try:
        return _frame(comment, atom_lines)
    except (_Unsupported, KeyError, ValueError, TypeError, OverflowError, IndexError, AttributeError):
        return None
