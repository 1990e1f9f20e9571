"""``lamm-ds make-corpus``: generate every subset in parts, resumably, then ingest each through the
normal ingest path into ``<out>/<subset>``.

Layout: ``<out>/build.json`` (scale and seed, fixed at the first call), ``<out>/raw/<subset>/part-NNNNN.xyz``
with ``.rejects.jsonl`` and ``.json`` beside it (the ``.json`` is written last: a part without it is
redone), ``<out>/<subset>/`` a lamm-ds dataset holding also ``corpus.json`` (recipe, level of theory,
counts, rejects by reason, elements) and ``rejected.jsonl``; ``<out>/corpus.json`` once every subset
is done. A subset directory appears only complete (built beside it, then renamed), so a killed
build resumes with the parts it finished and never takes half-written data for a finished subset.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import multiprocessing as mp
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lamm_ds.corpus import deps
from lamm_ds.corpus.molecules import Rejected
from lamm_ds.corpus.recipes import (SCALES, SMILES_BLOCKS, SUBSETS, T1X_GEOMETRIES_PER_MOLECULE, T1X_MAX_HEAVY,
                                    SubsetRecipe, attempt_rng)

PART_SIZE = 32
MAX_REJECT_RATE = 0.25
MIN_ATTEMPTS_FOR_RATE = 64  # the reject rate is judged once this many attempts of a subset are done
CORPUS_RECORD = "corpus.json"


class CorpusError(RuntimeError):
    """The build cannot go on: bad arguments, a directory holding another corpus, too many rejects."""


@dataclass
class Part:
    index: int
    first: int            # attempt index of its first item
    items: list           # one input per attempt (SMILES, fragment SMILES, or None)


# --------------------------------------------------------------------------------------------------
# inputs


def _moses_smiles() -> list[str]:
    with gzip.open(deps.moses_train_file(), "rt") as fh:
        header = fh.readline().strip()
        if header != "SMILES":
            raise CorpusError(f"{deps.moses_train_file()}: expected a SMILES column, found header {header!r}")
        return [line.strip() for line in fh]


def _fragments(parents: list[str], needed: int) -> list[str]:
    """Unique small molecules cut from ``parents`` in order, until ``needed``."""
    from lamm_ds.corpus.molecules import small_fragments

    seen: dict[str, None] = {}
    for smiles in parents:
        try:
            for frag in small_fragments(smiles, T1X_MAX_HEAVY):
                seen.setdefault(frag, None)
        except Rejected:
            continue
        if len(seen) >= needed:
            break
    if len(seen) < needed:
        raise CorpusError(f"only {len(seen)} distinct small fragments in the t1x_xtb block, {needed} needed")
    return list(seen)[:needed]


def attempt_inputs(recipes: list[SubsetRecipe], attempts: dict[str, int], seed: int) -> dict[str, list]:
    """One input per attempt and subset: SMILES from the subset's block of a seeded permutation of
    the MOSES SMILES, fragments of that block's molecules, or ``None``."""
    out: dict[str, list] = {}
    smiles, order = None, None
    for r in recipes:
        n = attempts[r.name]
        if r.inputs == "none":
            out[r.name] = [None] * n
            continue
        if smiles is None:
            smiles = _moses_smiles()
            order = np.random.default_rng(seed).permutation(len(smiles))
        lo, hi = SMILES_BLOCKS[r.name]
        block = (smiles[k] for k in order[lo:min(hi, len(smiles))])
        if r.inputs == "smiles":
            out[r.name] = [s for s, _ in zip(block, range(n))]
        else:
            unique = -(-n // T1X_GEOMETRIES_PER_MOLECULE)
            frags = _fragments(list(block) if n > 10_000 else [s for s, _ in zip(block, range(20 * unique))],
                               unique)
            out[r.name] = [frags[k // T1X_GEOMETRIES_PER_MOLECULE] for k in range(n)]
        if len(out[r.name]) < n:
            raise CorpusError(f"{r.name}: {n} attempts asked, its SMILES block holds {len(out[r.name])}")
    return out


# --------------------------------------------------------------------------------------------------
# the work of one part (in a worker process)


def _worker_init() -> None:
    # One thread per worker: parallelism comes from processes, and labels do not depend on thread count.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    _quiet_rdkit()


def _quiet_rdkit() -> None:
    """RDKit's own messages off: its failures are counted and written to rejected.jsonl instead."""
    import importlib.util

    if importlib.util.find_spec("rdkit") is not None:
        from rdkit import RDLogger

        RDLogger.DisableLog("rdApp.*")


class _RunPart:
    def __init__(self, subset: str, seed: int) -> None:
        self.subset, self.seed = subset, seed

    def __call__(self, part: Part):
        recipe = SUBSETS[self.subset]
        made, rejects = [], []
        for k, item in enumerate(part.items):
            index = part.first + k
            try:
                atoms = recipe.attempt(item, attempt_rng(self.seed, self.subset, index))
            except Rejected as exc:
                rejects.append({"attempt": index, "input": item, "reason": exc.reason, "detail": exc.detail})
                continue
            except Exception as exc:  # a library error we did not foresee: counted under its type, kept visible
                rejects.append({"attempt": index, "input": item, "reason": f"unexpected {type(exc).__name__}",
                                "detail": str(exc)[:300]})
                continue
            atoms.info["corpus_attempt"] = index
            made.append(atoms)
        return part.index, made, rejects


# --------------------------------------------------------------------------------------------------
# files


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _part_paths(raw: Path, index: int) -> tuple[Path, Path, Path]:
    stem = raw / f"part-{index:05d}"
    return stem.with_suffix(".xyz"), stem.with_suffix(".rejects.jsonl"), stem.with_suffix(".json")


def _write_part(raw: Path, index: int, attempts: int, made: list, rejects: list) -> dict:
    import ase.io

    xyz, rej, meta = _part_paths(raw, index)
    if made:
        tmp = xyz.with_name(f".{xyz.name}.tmp")
        ase.io.write(tmp, made, format="extxyz")
        os.replace(tmp, xyz)
    _atomic_write(rej, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    elements: dict[str, int] = {}
    for atoms in made:
        for el in set(atoms.get_chemical_symbols()):
            elements[el] = elements.get(el, 0) + 1
    record = {"attempts": attempts, "accepted": len(made), "rejected": len(rejects), "elements": elements,
              "rejects_by_reason": _count(r["reason"] for r in rejects)}
    _atomic_write(meta, json.dumps(record, sort_keys=True))  # last: marks the part done
    return record


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _sum_parts(records: list[dict]) -> dict:
    total = {"attempts": 0, "accepted": 0, "rejected": 0, "elements": {}, "rejects_by_reason": {}}
    for r in records:
        for k in ("attempts", "accepted", "rejected"):
            total[k] += r[k]
        for key in ("elements", "rejects_by_reason"):
            for name, n in r[key].items():
                total[key][name] = total[key].get(name, 0) + n
    total["elements"] = dict(sorted(total["elements"].items()))
    total["rejects_by_reason"] = dict(sorted(total["rejects_by_reason"].items(), key=lambda kv: -kv[1]))
    return total


def _check_reject_rate(name: str, total: dict, limit: float, final: bool = False) -> None:
    """Stop when too many attempts were rejected: during the build once enough attempts are done
    (a failing recipe stops early), and on the whole subset at the end."""
    early = total["attempts"] < MIN_ATTEMPTS_FOR_RATE and not final
    if early or total["rejected"] <= limit * total["attempts"]:
        return
    reasons = ", ".join(f"{r}: {n}" for r, n in total["rejects_by_reason"].items())
    worst = next(iter(total["rejects_by_reason"]))
    raise CorpusError(f"{name}: {total['rejected']} of {total['attempts']} attempts rejected "
                      f"({total['rejected'] / total['attempts']:.0%} > {limit:.0%}), mostly {worst!r} "
                      f"({reasons}); see the part files' .rejects.jsonl under the raw/{name}/ folder")


@contextmanager
def _locked(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CorpusError(f"{out}: another make-corpus is building here (it holds .build.lock)") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_build_record(out: Path, scale: str, seed: int) -> None:
    record = out / "build.json"
    want = {"scale": scale, "seed": seed, "part_size": PART_SIZE}
    if record.is_file():
        have = json.loads(record.read_text())
        if have != want:
            raise CorpusError(f"{out} holds a corpus built with {have}; asked for {want}: pass another --out "
                              "or delete it")
    else:
        _atomic_write(record, json.dumps(want, sort_keys=True))


# --------------------------------------------------------------------------------------------------
# one subset


@contextmanager
def _part_runner(workers: int):
    """An ordered map over parts: ``workers`` spawned processes of one thread each, or this process
    when ``workers`` is 0 (debugging and tests; labels then use this process's thread settings)."""
    if workers == 0:
        _quiet_rdkit()
        yield map
        return
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        yield pool.imap


def _subset_done(path: Path) -> bool:
    from lamm_ds.shards import is_dataset_dir

    return is_dataset_dir(path) and (path / CORPUS_RECORD).is_file()


def build_subset(out: Path, recipe: SubsetRecipe, items: list, seed: int, scale: str, workers: int,
                 progress: bool, max_reject_rate: float = MAX_REJECT_RATE) -> Path:
    """Generate the missing parts of one subset, then ingest all parts into ``out/<name>``."""
    final = out / recipe.name
    if _subset_done(final):
        return final
    raw = out / "raw" / recipe.name
    raw.mkdir(parents=True, exist_ok=True)
    parts = [Part(k, lo, items[lo:lo + PART_SIZE]) for k, lo in enumerate(range(0, len(items), PART_SIZE))]
    records: dict[int, dict] = {}
    todo = []
    for p in parts:
        meta = _part_paths(raw, p.index)[2]
        if meta.is_file():
            records[p.index] = json.loads(meta.read_text())
        else:
            todo.append(p)
    bar = tqdm(total=len(items), initial=sum(r["attempts"] for r in records.values()), unit=" attempts",
               desc=f"corpus {recipe.name}", disable=not progress, file=sys.stderr)
    if todo:
        _check_reject_rate(recipe.name, _sum_parts(list(records.values())), max_reject_rate)
        with _part_runner(workers) as run:
            for index, made, rejects in run(_RunPart(recipe.name, seed), todo):
                records[index] = _write_part(raw, index, len(parts[index].items), made, rejects)
                bar.update(len(parts[index].items))
                _check_reject_rate(recipe.name, _sum_parts(list(records.values())), max_reject_rate)
    bar.close()
    total = _sum_parts([records[p.index] for p in parts])
    _check_reject_rate(recipe.name, total, max_reject_rate, final=True)
    return _ingest_subset(out, recipe, parts, total, seed, scale)


def _ingest_subset(out: Path, recipe: SubsetRecipe, parts: list[Part], total: dict, seed: int, scale: str) -> Path:
    from lamm_ds.ingest import IngestOptions, LabelKeys, ingest

    raw = out / "raw" / recipe.name
    inputs = [str(_part_paths(raw, p.index)[0]) for p in parts if _part_paths(raw, p.index)[0].is_file()]
    if not inputs:
        raise CorpusError(f"{recipe.name}: every attempt was rejected ({total['rejects_by_reason']})")
    staging = out / ".staging" / recipe.name
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    report = ingest(inputs, staging, IngestOptions(
        name=recipe.name, level_of_theory=recipe.level_of_theory, progress=False,
        keys=LabelKeys(unlabelled=recipe.labels == "none")))
    with open(staging / "rejected.jsonl", "w") as fh:
        for p in parts:
            fh.write(_part_paths(raw, p.index)[1].read_text())
    record = {"subset": recipe.name, "recipe": recipe.recipe, "level_of_theory": recipe.level_of_theory,
              "labels": recipe.labels, "scale": scale, "seed": seed, **total,
              "ingested": report.written, "dropped_at_ingest": report.dropped_by_reason,
              "label_counts": report.label_counts}
    _atomic_write(staging / CORPUS_RECORD, json.dumps(record, indent=1, sort_keys=True))
    final = out / recipe.name
    if final.exists():  # an unfinished earlier copy (no corpus.json): replaced whole
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


# --------------------------------------------------------------------------------------------------
# the whole corpus


def coverage_table(records: dict[str, dict]) -> str:
    """Element x subset table of structure counts (Markdown)."""
    from ase.data import atomic_numbers

    names = list(records)
    elements = sorted({e for r in records.values() for e in r["elements"]}, key=atomic_numbers.get)
    lines = ["| element | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for e in elements:
        lines.append(f"| {e} | " + " | ".join(str(records[n]["elements"].get(e, "")) for n in names) + " |")
    return "\n".join(lines)


def make_corpus(out: str | os.PathLike, scale: str = "tiny", seed: int = 0, workers: int = 1,
                progress: bool = False, subsets: list[str] | None = None,
                max_reject_rate: float = MAX_REJECT_RATE) -> dict[str, Path]:
    """Build (or finish building) the LaMM-mini corpus under ``out``; returns subset -> dataset dir."""
    if workers < 0:
        raise CorpusError(f"workers must be >= 0 (0: in this process), got {workers}")
    if scale not in SCALES:
        raise CorpusError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    names = list(subsets) if subsets else list(SUBSETS)
    unknown = [n for n in names if n not in SUBSETS]
    if unknown:
        raise CorpusError(f"unknown subsets {unknown}; known: {list(SUBSETS)}")
    recipes = [SUBSETS[n] for n in names]
    deps.require(*sorted({m for r in recipes for m in r.needs}))
    out = Path(out)
    with _locked(out):
        _check_build_record(out, scale, seed)
        pending = [r for r in recipes if not _subset_done(out / r.name)]
        items = attempt_inputs(pending, SCALES[scale], seed) if pending else {}
        paths = {}
        for r in recipes:
            paths[r.name] = build_subset(out, r, items.get(r.name, []), seed, scale, workers, progress,
                                         max_reject_rate)
        records = {n: json.loads((p / CORPUS_RECORD).read_text()) for n, p in paths.items()}
        if set(names) == set(SUBSETS):
            summary = {"scale": scale, "seed": seed, "subsets": {n: {k: r[k] for k in (
                "level_of_theory", "labels", "attempts", "accepted", "rejected", "ingested")}
                for n, r in records.items()}, "coverage_markdown": coverage_table(records)}
            _atomic_write(out / CORPUS_RECORD, json.dumps(summary, indent=1, sort_keys=True))
        shutil.rmtree(out / ".staging", ignore_errors=True)
        return paths
