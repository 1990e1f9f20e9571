"""``lamm-ds make-corpus`` (lamm_ds/corpus): the tiny scale end to end, the chemistry it claims
(MMFF94s minima, GFN2/GFN1-xTB labels that a direct tblite call reproduces), counted rejects,
kill-and-resume giving the same bytes, and the error when the extra is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from run_helpers import BIN, REPO, child_env

for _module, _install in (("rdkit", "pip install -e '.[corpus]'"), ("tblite", "pip install -e '.[corpus]'"),
                          ("moses", "pip install --no-deps molsets")):  # moses itself is never imported
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed (the corpus extra): {_install}", allow_module_level=True)

from lamm_ds.corpus import SCALES, SUBSETS, CorpusError, MissingExtraError, make_corpus  # noqa: E402
from lamm_ds.corpus import molecules  # noqa: E402
from lamm_ds.corpus.build import CORPUS_RECORD  # noqa: E402
from lamm_ds.shards import LmdbDataset, read_manifest  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "tiny", scale="tiny", workers=2)


def _record(path: Path) -> dict:
    return json.loads((path / CORPUS_RECORD).read_text())


def _structures(path: Path):
    ds = LmdbDataset(path)
    try:
        return [ds[i] for i in range(len(ds))]
    finally:
        ds.close()


def test_tiny_corpus_has_every_subset_with_its_labels(tiny):
    assert list(tiny) == list(SUBSETS)
    summary = json.loads((next(iter(tiny.values())).parent / CORPUS_RECORD).read_text())
    assert "| element |" in summary["coverage_markdown"]
    for name, path in tiny.items():
        r = _record(path)
        recipe = SUBSETS[name]
        assert r["attempts"] == SCALES["tiny"][name]
        assert r["accepted"] + r["rejected"] == r["attempts"]
        assert r["ingested"] == r["accepted"] >= 0.75 * r["attempts"], (name, r["rejects_by_reason"])
        assert r["level_of_theory"] == recipe.level_of_theory == read_manifest(path)["level_of_theory"]
        assert sum(r["rejects_by_reason"].values()) == r["rejected"]
        assert len((path / "rejected.jsonl").read_text().splitlines()) == r["rejected"]
        lc, n = r["label_counts"], r["ingested"]
        expected = {"none": {"unlabelled": n, "energy": 0, "forces": 0},
                    "energy": {"energy": n, "forces": 0, "unlabelled": 0},
                    "energy+forces": {"energy": n, "forces": n, "unlabelled": 0}}[recipe.labels]
        assert {k: lc[k] for k in expected} == expected, name
    assert _record(tiny["bulk_gfn1"])["label_counts"]["stress"] == _record(tiny["bulk_gfn1"])["ingested"]
    # the unlabelled (PubChem3D-like) set is the largest, as in the paper
    sizes = {n: _record(p)["ingested"] for n, p in tiny.items()}
    assert max(sizes, key=sizes.get) == "pubchem3d_mmff"


def test_elements_follow_each_recipe(tiny):
    from lamm_ds.corpus.bulk import BULK_ELEMENTS, ROCKSALT_ANIONS, ROCKSALT_CATIONS
    from lamm_ds.corpus.surfaces import EMT_METALS

    def elements(name):
        return set(read_manifest(tiny[name])["elements"])

    from ase.data import chemical_symbols

    def symbols(name):
        return {chemical_symbols[z] for z in elements(name)}

    organic = set(molecules.PUBCHEM3D_ELEMENTS)
    assert {"H", "C", "N", "O"} <= symbols("pubchem3d_mmff") <= organic
    assert symbols("qmugs_xtb") <= organic and symbols("t1x_xtb") <= organic
    assert symbols("oc20_emt") <= set(EMT_METALS) | {"H", "C", "N", "O"}
    allowed = set(BULK_ELEMENTS) | set(ROCKSALT_CATIONS) | {a for v in ROCKSALT_ANIONS.values() for a in v}
    assert symbols("bulk_gfn1") <= allowed and len(symbols("bulk_gfn1")) >= 5
    heavy = [int((s.numbers > 1).sum()) for s in _structures(tiny["t1x_xtb"])]
    assert max(heavy) <= 9


def test_unlabelled_conformers_are_mmff94s_minima(tiny):
    structures = _structures(tiny["pubchem3d_mmff"])
    worst = []
    for s in structures:
        mol = molecules.embed(s.info["smiles"], np.random.default_rng(0))  # same atom order, another conformer
        assert [a.GetAtomicNum() for a in mol.GetAtoms()] == s.numbers.tolist()
        embedded = mol.GetConformer().GetPositions().copy()
        worst.append(np.abs(molecules.mmff_gradient(mol, s.positions)).max())
        if len(worst) == 1:  # the check can fail: the freshly embedded conformer is no minimum
            assert np.abs(molecules.mmff_gradient(mol, embedded)).max() > 1.0
    assert max(worst) < molecules.MMFF_MAX_GRAD, max(worst)


@pytest.mark.parametrize("name,method,count", [("qmugs_xtb", "GFN2-xTB", 2), ("t1x_xtb", "GFN2-xTB", 2),
                                               ("bulk_gfn1", "GFN1-xTB", 2)])
def test_xtb_labels_reproduce_a_direct_tblite_call(tiny, name, method, count):
    from ase import Atoms
    from tblite.ase import TBLite

    for s in _structures(tiny[name])[:count]:
        atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        atoms.calc = TBLite(method=method, accuracy=1.0, max_iterations=250, verbosity=0, charge=0,
                            multiplicity=1 + int(s.numbers.sum()) % 2,
                            electronic_temperature=1000.0 if s.pbc.any() else 300.0)
        assert atoms.get_potential_energy() == pytest.approx(s.energy, abs=1e-5)
        np.testing.assert_allclose(atoms.get_forces(), s.forces, atol=1e-5)
        if s.stress is not None:
            np.testing.assert_allclose(atoms.get_stress(voigt=False), s.stress, atol=1e-6)


def test_emt_labels_reproduce_ase(tiny):
    from ase import Atoms
    from ase.calculators.emt import EMT

    s = _structures(tiny["oc20_emt"])[0]
    assert s.fixed is not None and s.fixed.any() and not s.fixed.all()
    atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
    atoms.calc = EMT()
    assert atoms.get_potential_energy() == pytest.approx(s.energy, abs=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), s.forces, atol=1e-6)
    assert np.abs(s.forces[s.fixed]).max() > 0.01  # fixed atoms keep their physical forces


def test_bad_molecules_are_rejected_with_a_reason():
    rng = np.random.default_rng(0)
    for smiles, reason in [("C1CC", "smiles_unparsable"), ("C[N+](C)(C)C", "charged_molecule")]:
        with pytest.raises(molecules.Rejected) as err:
            molecules.mmff_conformer(smiles, rng)
        assert err.value.reason == reason
    swapped = {molecules.swap_elements("CCN(CC)CCCl", np.random.default_rng(k), 1.0) for k in range(20)}
    assert {"Si", "P", "I"} <= {el for smi in swapped for el in ("Si", "P", "I") if el in smi}


def test_kill_and_resume_gives_the_same_bytes(tiny, tmp_path):
    """A build killed after its first part resumes from the finished parts; the result, built with
    another worker count, equals the uninterrupted build record for record."""
    out = tmp_path / "tiny"
    subsets = ["pubchem3d_mmff", "qmugs_xtb"]
    cmd = [str(BIN / "lamm-ds"), "make-corpus", "--out", str(out), "--scale", "tiny", "--workers", "1",
           "--quiet", "--subsets", *subsets]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    first = out / "raw" / "pubchem3d_mmff" / "part-00000.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    assert not (out / "qmugs_xtb").exists() and not (out / "pubchem3d_mmff" / CORPUS_RECORD).exists()
    # resumed in this process with 2 workers; the killed run's finished part is kept as it was
    kept = first.read_bytes()
    paths = make_corpus(out, scale="tiny", workers=2, subsets=subsets)
    assert first.read_bytes() == kept
    # Records name their source file, whose path holds the build directory: compared with the
    # source cut to its file name, every other byte must agree; the part files agree whole.
    for name in subsets:
        resumed, reference = _raw_records(paths[name]), _raw_records(tiny[name])
        assert len(resumed) == len(reference) > 0
        assert _without_directory(resumed) == _without_directory(reference)
        parts = sorted((tiny[name].parent / "raw" / name).glob("part-*"))
        assert parts
        for part in parts:
            assert (out / "raw" / name / part.name).read_bytes() == part.read_bytes(), part.name


def _raw_records(path: Path) -> list[bytes]:
    ds = LmdbDataset(path)
    try:
        return [ds.raw(i) for i in range(len(ds))]
    finally:
        ds.close()


def _without_directory(records: list[bytes]) -> list:
    from lamm_ds.structure import decode, encode

    out = []
    for r in records:
        s = decode(r)
        s.source = Path(s.source).name
        out.append(encode(s))
    return out


def test_a_directory_holds_one_scale_and_seed(tiny):
    out = next(iter(tiny.values())).parent
    with pytest.raises(CorpusError, match="built with"):
        make_corpus(out, scale="small")
    with pytest.raises(CorpusError, match="unknown subsets"):
        make_corpus(out, scale="tiny", subsets=["qm9"])


def test_too_many_rejects_stop_the_build(tmp_path, monkeypatch):
    import dataclasses

    from lamm_ds.corpus import recipes

    def always_rejected(_, rng):
        raise molecules.Rejected("calculator_failed", "made to fail")

    monkeypatch.setitem(recipes.SUBSETS, "oc20_emt", dataclasses.replace(SUBSETS["oc20_emt"],
                                                                         attempt=always_rejected))
    with pytest.raises(CorpusError, match=r"oc20_emt: 16 of 16 attempts rejected .*'calculator_failed'"):
        make_corpus(tmp_path / "c", scale="tiny", workers=0, subsets=["oc20_emt"])
    assert not (tmp_path / "c" / "oc20_emt").exists()
    rejects = (tmp_path / "c" / "raw" / "oc20_emt" / "part-00000.rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 16 and json.loads(rejects[0])["reason"] == "calculator_failed"


def test_missing_extra_names_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    from lamm_ds.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tblite" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"tblite .*corpus.*pip install -e \"\.\[corpus\]\""):
        make_corpus(tmp_path / "c", scale="tiny")
    assert main(["make-corpus", "--out", str(tmp_path / "c"), "--scale", "tiny", "--quiet"]) == 2
    assert "tblite" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_make_demo_does_not_need_the_extra():
    code = ("import sys, lamm_ds.cli, lamm_ds.demo, lamm_ds.engine.ds_engine; "
            "sys.exit(any(m in sys.modules for m in ('rdkit', 'tblite', 'moses')))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env()).returncode == 0
