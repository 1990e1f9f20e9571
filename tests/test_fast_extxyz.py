"""The fast extxyz frame parser gives byte-for-byte the records ASE's reader gives, and hands every
frame outside its subset to ASE (whose result, or error, is then the one ingest sees)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from lamm_ds.ingest.fast_extxyz import parse_frame
from lamm_ds.ingest.readers import IngestError, LabelKeys, atoms_to_structure
from lamm_ds.ingest.xyz_chunks import frame_ranges, read_range
from lamm_ds.structure import encode

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ATOMS3 = ["Si 0.0 0.0 0.0", "si 1.3 1.4 1.5", "SI 2.6 0.1 2.7"]


def _frames(text: str) -> list[tuple[str, list[str]]]:
    lines, out, at = text.split("\n"), [], 0
    while at < len(lines) and lines[at].strip():
        n = int(lines[at])
        out.append((lines[at + 1], lines[at + 2:at + 2 + n]))
        at += 2 + n
    return out


def _ase_record(comment: str, atom_lines: list[str], keys: LabelKeys) -> bytes:
    text = "\n".join([str(len(atom_lines)), comment, *atom_lines]) + "\n"
    return encode(atoms_to_structure(ase.io.read(io.StringIO(text), format="extxyz"), "f.xyz", 0, keys))


def _fast_record(comment: str, atom_lines: list[str], keys: LabelKeys) -> bytes | None:
    frame = parse_frame(comment, atom_lines)
    return None if frame is None else encode(atoms_to_structure(frame, "f.xyz", 0, keys))


@pytest.mark.parametrize("name", ["3bpa/train_mixedT.xyz", "3bpa/iso_atoms.xyz", "acac/train_300K.xyz",
                                  "acac/isolated_atoms.xyz", "mlearn/Si/training.xyz", "mlearn/Mo/test.xyz"])
def test_every_frame_of_the_shared_sets_is_read_fast_and_exactly_as_ase_reads_it(name):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not found (the shared DFT sets live in ../shared/data)")
    frames = _frames(path.read_text())
    assert len(frames) == len(ase.io.read(path, ":"))
    keys = LabelKeys(allow_missing=True)
    for k, (comment, atom_lines) in enumerate(frames[:300]):
        fast = _fast_record(comment, atom_lines, keys)
        assert fast is not None, f"{name}: frame {k} fell back to ASE: {comment[:120]}"
        assert fast == _ase_record(comment, atom_lines, keys), f"{name}: frame {k} differs"


LATTICE = 'Lattice="5.4 0.0 0.0 0.1 5.5 0.0 0.2 0.3 5.6"'
FAST_COMMENTS = [
    f"{LATTICE} Properties=species:S:1:pos:R:3:forces:R:3 energy=-12.5 pbc=\"T T F\"",
    f"{LATTICE} Properties=species:S:1:pos:R:3:forces:R:3 energy=-12 stress=\"1 2 3 2 5 6 3 6 9\" "
    'virial="9 8 7 6 5 4 3 2 1" config_type=bulk_md free_energy=-11.5 flag',
    'Properties=species:S:1:pos:R:3 REF_energy=-3.25 uid=00123 weight=2 ints="1 2 3" vals="1.5 2" '
    'bools="T F T" blank=" " word=abc sentence="two words" dihedrals="_JSON [209.44, 80.54]" '
    'names="_JSON [1, 2.5]" inf=inf',
    f"{LATTICE} Properties=Z:I:1:pos:R:3:REF_forces:R:3:tags:I:1:charge:R:1:magmoms:R:1 REF_energy=-7.0 pbc=T",
    "",  # no comment at all: species and positions, no cell
    "Energy: -123.4 eV (PBE) converged",  # a plain-xyz free-text comment: ASE makes bare keys of it
    "   energy=-1.0e+01   Properties=species:S:1:pos:R:3   ",
    f"{LATTICE} Properties=species:S:1:pos:R:3:initial_charges:R:1:some_int:I:3 energy=2 dipole=\"0.1 0.2 0.3\"",
    "Properties=species:S:1:pos:R:3:dipole:R:3:magmoms:R:1 free_energy=-1 energy=-2",  # columns named like results
    # values that skip a conversion ASE would try (a '.', a word, booleans) and ones that must not
    'Properties=species:S:1:pos:R:3 energy=-1.5e3 a=nan b=Infinity c=-inf d="1 abc" e=+5 f=1_000 g="TRUE FALSE" '
    'h=infinite i="2 3.5" j=1e3 k=NaN',
    # real columns in three runs (pos, then forces + charge, then one after an integer column)
    "Properties=species:S:1:pos:R:3:tags:I:1:forces:R:3:charge:R:1:some_int:I:2:magmoms:R:1 energy=-3",
]
ASE_COMMENTS = [  # outside the fast subset: ASE parses them (and the result must be ASE's)
    "energy = -3.0 Properties=species:S:1:pos:R:3",
    "Properties=species:S:1:pos:R:3 meta='_JSON {\"a\": [1, 2]}' energy=-1",
    'Properties=species:S:1:pos:R:3 energy=-1 note="a \\"quoted\\" word"',
    "Properties=species:S:1:pos:R:3:move_mask:L:1 energy=-1",
    "Properties=species:S:1:pos:R:3:label:S:1 energy=-1",
    "Properties=species:S:1:pos:R:3 energy=-1 key=[1,2]",
    "Properties=species:S:1:pos:R:3:positions:R:3 energy=-1",  # two columns for one ASE name
    'Properties=species:S:1:pos:R:3 empty="" energy=-1',  # ASE reads "energy=-1" as the value of empty
]


def _atom_lines(properties: str) -> list[str]:
    """Three atom lines matching ``properties`` (values chosen to be exactly representable or not)."""
    rng = np.random.default_rng(len(properties))
    fields = properties.split(":")
    lines = []
    for a in range(3):
        cols = []
        for name, kind, count in zip(fields[0::3], fields[1::3], fields[2::3]):
            for c in range(int(count)):
                if kind == "S":
                    cols.append(ATOMS3[a].split()[0] if name == "species" else f"lab{a}")
                elif kind == "L":
                    cols.append("T" if a else "F")
                elif kind == "I":
                    cols.append(str(14 if name == "Z" else a * 3 + c - 2))
                elif name == "pos":
                    cols.append(ATOMS3[a].split()[1 + c])
                else:
                    cols.append(f"{rng.normal():.17g}")
        lines.append("  ".join(cols))
    return lines


def _properties(comment: str) -> str:
    m = re.search(r"Properties=(\S+)", comment)
    return m.group(1) if m else "species:S:1:pos:R:3"


@pytest.mark.parametrize("comment", FAST_COMMENTS)
def test_each_comment_and_column_rule_matches_ase(comment):
    lines = _atom_lines(_properties(comment))
    for keys in (LabelKeys(allow_missing=True), LabelKeys(energy="REF_energy", forces="REF_forces",
                                                          allow_missing=True)):
        fast = _fast_record(comment, lines, keys)
        assert fast is not None, comment
        assert fast == _ase_record(comment, lines, keys), comment


@pytest.mark.parametrize("comment", ASE_COMMENTS)
def test_frames_outside_the_subset_go_to_ase(comment, tmp_path):
    lines = _atom_lines(_properties(comment))
    assert parse_frame(comment, lines) is None
    keys = LabelKeys(allow_missing=True)
    f = tmp_path / "a.xyz"
    f.write_text("\n".join(["3", comment, *lines, "3", FAST_COMMENTS[0], *_atom_lines(_properties(FAST_COMMENTS[0]))])
                 + "\n")
    (r,) = frame_ranges(f, 10)
    got = read_range(r, keys)
    want = [atoms_to_structure(a, str(f), k, keys) for k, a in enumerate(ase.io.read(f, ":"))]
    assert [encode(s) for s in got] == [encode(s) for s in want]


def test_atom_lines_not_as_announced_go_to_ase():
    comment = "Properties=species:S:1:pos:R:3 energy=-1"
    assert parse_frame(comment, ["Si 0 0 0", "Si 1 1 1 7", "Si 2 2 2"]) is None  # ASE ignores the extra column
    assert parse_frame(comment, ["Si 0 0 0", "Si 1 1", "Si 2 2 2 3"]) is None  # compensating: never misaligned
    assert parse_frame(comment, ["Si 0 0 0", "Qq 1 1 1", "Si 2 2 2"]) is None  # not an element
    assert parse_frame('Lattice="1 2 3" Properties=species:S:1:pos:R:3', ATOMS3) is None  # ASE: not 9 numbers
    assert parse_frame("Properties=species:S:1:pos:R:3 stress=\"1 2 3 4 5 6\"", ATOMS3) is None


def test_a_bad_frame_is_named_by_ases_diagnosis(tmp_path):
    f = tmp_path / "bad.xyz"
    good = "\n".join(["3", FAST_COMMENTS[0], *_atom_lines(_properties(FAST_COMMENTS[0]))])
    bad = "\n".join(["3", "Properties=species:S:1:pos:R:3 energy=-1", "Si 0 0 0", "Qq 1 1 1", "Si 2 2 2"])
    f.write_text(f"{good}\n{bad}\n{good}\n")
    (r,) = frame_ranges(f, 10)
    with pytest.raises(IngestError, match=r"bad\.xyz: structure 1 \(line 6\): line 9 \(atom 1\): unknown element symbol .Qq."):
        read_range(r, LabelKeys())
    text = f"3\nProperties=species:S:1:pos:R:3 energy=abc\n" + "\n".join(ATOMS3) + "\n"
    f.write_text(text)
    (r,) = frame_ranges(f, 10)
    with pytest.raises(IngestError, match="structure 0: the energy is 'abc', not a number"):
        read_range(r, LabelKeys())


def test_crlf_files_read_as_ase_reads_them(tmp_path):
    src = SHARED / "mlearn" / "Si" / "test.xyz"
    if not src.is_file():
        pytest.skip(f"{src} not found (the shared DFT sets live in ../shared/data)")
    f = tmp_path / "crlf.xyz"
    f.write_bytes(src.read_bytes().replace(b"\n", b"\r\n"))
    keys = LabelKeys()
    got = [s for r in frame_ranges(f, 16) for s in read_range(r, keys)]
    want = [atoms_to_structure(a, str(f), k, keys) for k, a in enumerate(ase.io.read(f, ":"))]
    assert len(got) == len(want) > 0
    assert [encode(s) for s in got] == [encode(s) for s in want]


def test_a_per_atom_energy_column_is_refused_as_through_ase():
    comment = "Properties=species:S:1:pos:R:3:energy:R:1"
    lines = [f"{a} 0.5" for a in ATOMS3]
    for record in (_fast_record, _ase_record):
        with pytest.raises(IngestError, match=r"the energy has shape \(3,\), expected a single number"):
            record(comment, lines, LabelKeys())


def test_the_written_out_tables_are_the_installed_ases():
    """The fast parser spells out ASE's extxyz tables (importing them costs each ingest worker
    ase.io); they must be exactly the installed ASE's."""
    from ase.calculators.calculator import all_properties
    from ase.io import extxyz

    from lamm_ds.ingest import fast_extxyz as fast

    assert fast._MATRIX_KEYS == set(extxyz.SPECIAL_3_3_KEYS)
    assert fast._RAW_KEYS == set(extxyz.UNPROCESSED_KEYS)
    assert fast._ASE_NAMES == dict(extxyz.REV_PROPERTY_NAME_MAP)
    assert fast._CALC_COLUMNS == set(all_properties)
    assert fast._CALC_INFO == set(extxyz.per_config_properties)


def test_an_extxyz_ingest_imports_neither_ase_io_nor_scipy(tmp_path):
    """What an ingest process (and each spawned worker) imports to read plain extxyz frames and count
    edges: not ase.io nor scipy (via ase.constraints), which took longer to import than all the rest
    (~0.6 s per process). ASE stays the reference for odd frames, imported when one comes."""
    import subprocess
    import sys

    frames = [Atoms("Si2", positions=[[0, 0, 0], [1.4, 1.4, 1.4]], cell=np.eye(3) * 5.43, pbc=True) for _ in range(3)]
    for k, a in enumerate(frames):
        a.calc = SinglePointCalculator(a, energy=-10.0 - k, forces=np.zeros((2, 3)))
    ase.io.write(tmp_path / "si.xyz", frames)
    code = ("import sys; from lamm_ds.cli import main; "
            f"assert main(['ingest', {str(tmp_path / 'si.xyz')!r}, '--name', 'si', '--out', "
            f"{str(tmp_path / 'ds')!r}, '--quiet']) in (0, None); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy' or m.startswith('ase.io')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
