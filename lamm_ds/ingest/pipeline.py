"""``lamm-ds ingest``: source files -> one lamm-ds dataset directory, atomically."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from lamm_ds.ingest.formats import FormatSpec, ReadContext, check_options, resolve
from lamm_ds.ingest.readers import (IngestError, LabelKeys, expand_inputs, iter_source, missing_labels_error,
                                    unread_label_notes)
from lamm_ds.ingest.xyz_chunks import RANGE_FRAMES, frame_ranges, read_range
from lamm_ds.neighbors import MIN_INTERATOMIC_DISTANCE, TooManyPairsError, neighbor_summary
from lamm_ds.shards.dataset import LmdbDataset
from lamm_ds.shards.format import DROPPED, DatasetWriter, GraphSettings
from lamm_ds.structure import Structure, encode

DEFAULT_MAX_ATOMS = 300
_CHUNK = 64
# a generic reason, so that --skip-invalid's per-reason counts group these; the pair is in the detail
COINCIDENT = f"coincident atoms (closer than {MIN_INTERATOMIC_DISTANCE:g} Å)"


@dataclass
class IngestOptions:
    name: str
    level_of_theory: str = "unknown"
    keys: LabelKeys = field(default_factory=LabelKeys)
    max_atoms: int | None = DEFAULT_MAX_ATOMS
    graph: GraphSettings = field(default_factory=GraphSettings)
    shard_size: int = 100_000
    workers: int = 1
    force: bool = False
    trust_pickle: bool = False
    skip_invalid: bool = False
    progress: bool = True
    verify: bool = True
    format: str = "auto"  # a lamm_ds.ingest.formats name, or auto: sniffed per file
    energy_kind: str | None = None  # which energy a format holding several stores (None: its default)
    split: str | None = None  # Transition1x: which split group (None: train + val + test)


@dataclass
class IngestReport:
    path: str
    read: int
    written: int
    dropped: int
    dropped_by_reason: dict[str, int]
    seconds: float
    manifest: dict
    label_counts: dict[str, int] = field(default_factory=dict)  # energy / forces / stress / unlabelled
    notes: list[str] = field(default_factory=list)  # labels a file seems to hold under keys not read


def _pair_text(s: Structure, edge) -> str:
    """'atoms 3 (H) and 7 (H) are 0.01 Å apart', naming the image for a periodic pair."""
    from ase.data import chemical_symbols

    def atom(k):
        return f"{k} ({chemical_symbols[s.numbers[k]]})"

    d = f"{edge.distance:.3g} Å apart"
    if edge.i == edge.j:
        return f"atom {atom(edge.i)} and its own periodic image {edge.shift} are {d} (a lattice vector that short)"
    image = f" in the periodic image {edge.shift}" if any(edge.shift) else ""
    i, j = sorted((edge.i, edge.j)) if not image else (edge.i, edge.j)
    return f"atoms {atom(i)} and {atom(j)}{image} are {d}"


def _process(chunk: list[Structure], max_atoms: int | None, graph: GraphSettings, skip_invalid: bool):
    """Validate, filter, count edges and encode a chunk (runs in worker processes)."""
    out = []
    for s in chunk:
        where = f"{s.source}: structure {s.source_index}"
        problems = s.problems()
        if s.natoms == 0:
            problems.append("no atoms")
        too_big = not problems and max_atoms is not None and s.natoms > max_atoms
        g, detail = None, ""
        if not problems and not too_big:
            try:  # the edge count the scheduler needs, not the graph itself (no sort per structure)
                g = neighbor_summary(s.positions, s.cell, s.pbc, graph.cutoff, graph.max_neighbors, graph.backend)
            except TooManyPairsError as exc:
                # a generic reason, so the report's per-reason counts group these; numbers go in detail
                problems.append("degenerate periodic cell (too many neighbour pairs)")
                detail = f": {exc}"
        if g is not None:
            # the pairs include every one (and self-image) within the cutoff, so this sees periodic images
            edge = g.shortest
            if edge.distance < MIN_INTERATOMIC_DISTANCE:
                problems.append(COINCIDENT)
                detail = f": {_pair_text(s, edge)}"
                g = None
        if problems and not skip_invalid:
            out.append(("error", f"{where}: {'; '.join(problems)}{detail} (pass --skip-invalid to drop such "
                                 "structures and list them in the report)"))
            return out
        if g is None:
            reason = "; ".join(problems) if problems else f"more than {max_atoms} atoms"
            entry = {"source": s.source, "index": s.source_index, "natoms": s.natoms, "reason": reason}
            if detail:
                entry["detail"] = detail[2:]
            out.append(("drop", entry))
            continue
        out.append(("ok", encode(s), s.numbers, g.num_edges, s.energy is not None, s.forces is not None,
                    s.stress is not None))
    return out


def _chunks(structures: Iterable[Structure], size: int) -> Iterator[list[Structure]]:
    it = iter(structures)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _all_structures(files: list[Path], opts: IngestOptions, counter: list[int],
                    notes: list[str] | None = None, specs: list[FormatSpec] | None = None) -> Iterator[Structure]:
    """Every input structure in order. A source file in which no structure has any label is an
    error (labels under keys we did not look for would otherwise ingest as 100% unlabelled),
    unless --unlabelled or --allow-missing-labels says that is meant. A file with some labels but
    none of one kind, while a key named like that kind exists, adds a note (an energy-only set is
    legitimate; forces under a key we did not read are probably not)."""
    keys = opts.keys
    specs = specs or [resolve(f, opts.format) for f in files]
    ctx = ReadContext(keys=keys, energy_kind=opts.energy_kind, trust_pickle=opts.trust_pickle, split=opts.split,
                      notes=notes if notes is not None else [])

    def finish(source: str | None, kinds: set[str], spec: FormatSpec) -> None:
        _check_labels(source, kinds, spec, opts, notes)

    for f, spec in zip(files, specs):
        source, kinds = None, set()  # one input can hold several files (a fairchem LMDB folder)
        for s in iter_source(f, keys, opts.trust_pickle, spec.name, ctx):
            if s.source != source:
                finish(source, kinds, spec)
                source, kinds = s.source, set()
            kinds |= _label_kinds([s])
            counter[0] += 1
            yield s
        finish(source, kinds, spec)


def _check_labels(source: str | None, kinds: set[str], spec: FormatSpec, opts: IngestOptions,
                  notes: list[str] | None) -> None:
    """After the last structure of ``source``: no label at all is an error unless meant; labels of
    some kinds only add a note when a key named like a missing kind exists (see _all_structures)."""
    keys = opts.keys
    if source is None or spec.unlabelled:
        return
    if not kinds and not (keys.unlabelled or keys.allow_missing):
        raise missing_labels_error(Path(source), keys, opts.trust_pickle)
    if kinds and notes is not None and not keys.unlabelled:
        notes.extend(unread_label_notes(Path(source), kinds, opts.trust_pickle))


def _label_kinds(structures: list[Structure]) -> set[str]:
    return {k for s in structures for k, v in (("energy", s.energy), ("forces", s.forces), ("stress", s.stress))
            if v is not None}


def _tasks(files: list[Path], specs: list[FormatSpec], opts: IngestOptions, counter: list[int],
           notes: list[str]) -> Iterator[tuple]:
    """Work for the pool, in output order: ``("range", FrameRange, is_last)`` for extxyz files the
    workers parse themselves (lamm_ds.ingest.xyz_chunks), ``("chunk", structures)`` for the rest,
    read here."""
    for f, spec in zip(files, specs):
        ranges = frame_ranges(f, RANGE_FRAMES) if opts.workers > 1 and spec.name == "ase" else None
        if ranges is None:
            for chunk in _chunks(_all_structures([f], opts, counter, notes, [spec]), _CHUNK):
                yield ("chunk", chunk)
            continue
        for k, r in enumerate(ranges):
            yield ("range", r, k == len(ranges) - 1)


def _format_record(specs: list[FormatSpec], files: list[Path], opts: IngestOptions) -> tuple[dict, str]:
    """The manifest's ``ingest.formats`` (per format: files, the energy kept and its source unit) and the
    level of theory: ``--level-of-theory`` if given, else the formats' own when they agree."""
    record, levels = {}, set()
    for spec, f in zip(specs, files):
        kind, choice = spec.chosen(opts.energy_kind, opts.keys)
        entry = record.setdefault(spec.name, {"files": 0})
        entry["files"] += 1
        if choice is not None:
            entry["energy"] = {"kind": kind, "source_key": choice.key, "source_unit": choice.unit,
                               "meaning": choice.meaning}
            levels.add(choice.level)
        else:
            levels.add("unknown")
    level = opts.level_of_theory
    if level == "unknown" and len(levels) == 1:
        level = levels.pop()
    return record, level


def ingest(inputs: list[str], out: str | os.PathLike, opts: IngestOptions) -> IngestReport:
    """Read every input structure, drop the over-size ones (reported), write shards + manifest.

    Output appears under ``out`` only when complete: everything is written to a hidden temporary
    directory beside it and renamed at the end. Raises :class:`IngestError` on bad input.
    """
    start = time.perf_counter()
    out = Path(out)
    files = expand_inputs(inputs)
    if not files:
        raise IngestError("no input files given")
    if out.exists() and not opts.force:
        raise IngestError(f"{out} already exists; pass --force to replace it")
    specs = [resolve(f, opts.format) for f in files]  # sniffing and option checks fail before anything is written
    for spec in specs:
        check_options(spec, opts.keys, opts.energy_kind)
    formats, level_of_theory = _format_record(specs, files, opts)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.ingest-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    writer = DatasetWriter(tmp, opts.shard_size)
    read = [0]
    dropped: list[dict] = []
    pool = None
    try:
        notes: list[str] = []
        args = (opts.max_atoms, opts.graph, opts.skip_invalid)
        if opts.workers > 1:
            pool = mp.get_context("spawn").Pool(opts.workers)
            # imap keeps input order -> the same output as one worker
            results = pool.imap(_Worker(*args, opts.keys), _tasks(files, specs, opts, read, notes))
        else:
            chunks = _chunks(_all_structures(files, opts, read, notes, specs), _CHUNK)
            results = ((_process(c, *args), None) for c in chunks)
        spec_of = {str(f): spec for f, spec in zip(files, specs)}  # a worker's range names its file
        kinds: set[str] = set()
        range_read = 0  # not read[0]: the pool's feeder thread counts the other files there
        with tqdm(desc=f"ingest {opts.name}", unit=" structures", disable=not opts.progress,
                  file=sys.stderr) as bar:
            for result, parsed in results:
                if parsed is not None:  # a frame range the worker read: count it, check labels per file
                    source, n, range_kinds, last = parsed
                    range_read += n
                    kinds |= range_kinds
                    if last:
                        _check_labels(source, kinds, spec_of[source], opts, notes)
                        kinds = set()
                for item in result:
                    if item[0] == "error":
                        raise IngestError(item[1])
                    if item[0] == "drop":
                        dropped.append(item[1])
                    else:
                        writer.add(*item[1:])
                bar.update(len(result))
        read[0] += range_read
        if read[0] != writer.count + len(dropped):
            raise RuntimeError(f"ingest lost structures: read {read[0]}, wrote {writer.count}, "
                               f"dropped {len(dropped)}")
        if writer.count == 0:
            raise IngestError(f"every one of the {read[0]} input structures was dropped; nothing to write")
        by_reason: dict[str, int] = {}
        for d in dropped:
            by_reason[d["reason"]] = by_reason.get(d["reason"], 0) + 1
        with open(tmp / DROPPED, "w") as fh:
            for d in dropped:
                fh.write(json.dumps(d, sort_keys=True) + "\n")
        manifest = writer.finalize({
            "name": opts.name,
            "level_of_theory": level_of_theory,
            "sources": [str(f) for f in files],
            "graph": asdict(opts.graph),
            "ingest": {"structures_read": read[0], "max_atoms": opts.max_atoms, "dropped": len(dropped),
                       "dropped_by_reason": by_reason,
                       "label_keys": asdict(opts.keys), "formats": formats,
                       **({"split": opts.split} if opts.split else {}),
                       **({"notes": notes} if notes else {})},
        })
        if opts.verify:
            check = LmdbDataset(tmp)
            if len(check) != writer.count:
                raise RuntimeError(f"{tmp}: wrote {writer.count} records but the dataset reads {len(check)}")
            check.verify(decode=False)  # the bytes were encoded here; the digest proves them
            check.close()
        _replace_dir(tmp, out)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return IngestReport(str(out), read[0], writer.count, len(dropped), by_reason,
                        time.perf_counter() - start, manifest, dict(manifest["label_counts"]), notes)


class _Worker:
    """Picklable callable for the worker pool: (records, None) for a chunk of structures, (records,
    (source, structures read, label kinds, last range of the file)) for a frame range it parses."""

    def __init__(self, max_atoms, graph, skip_invalid, keys: LabelKeys):
        self.args = (max_atoms, graph, skip_invalid)
        self.keys = keys

    def __call__(self, task):
        if task[0] == "chunk":
            return _process(task[1], *self.args), None
        _, r, last = task
        structures = read_range(r, self.keys)
        return _process(structures, *self.args), (r.path, len(structures), _label_kinds(structures), last)


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporary directories left by killed ingests of the same output (their pid is gone)."""
    for leftover in out.parent.glob(f".{out.name}.ingest-*"):
        try:
            pid = int(leftover.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours, or a live process of another user


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
