"""What the experiment is made of: its datasets (the demo sets and 3BPA, or a generated corpus; the
nested subsets and test sets of every fine-tuning target; prepared once) and its runs (pre-training
per variant and seed, scratch and fine-tuning per target, size and seed) with their commands and
dependencies."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from lamm_ds.experiments.pretrain_finetune.config import (REPO_ROOT, ExperimentConfig, ExperimentError,
                                                          FinetuneTarget, PretrainVariant, _config_path, _path)


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class ExperimentData:
    """Where the prepared data lies (:func:`planned_data`: the paths; :func:`prepare_data`: made)."""

    demo_dir: Optional[Path]            # None with a corpus
    bpa_dir: Optional[Path]
    acac: dict[int, Path]               # the subsets of the target named "acac" (see `subsets`)
    subsets_file: Path                  # the record of the chosen frames
    subsets: dict[str, dict[int, Path]] = field(default_factory=dict)  # target -> size -> dataset directory
    tests: dict[str, list[dict]] = field(default_factory=dict)  # target -> [{name, path}]; default its test_files
    corpus_dir: Optional[Path] = None
    corpus: dict[str, Path] = field(default_factory=dict)       # subset -> dataset directory (once made)

    def __post_init__(self) -> None:
        if self.acac:
            self.subsets.setdefault("acac", self.acac)


def nested_subsets(n_frames: int, sizes: list[int], seed: int, holdout: int = 0) -> dict[int, list[int]]:
    """Nested random subsets: the first n of one seeded permutation, so a smaller set lies in a larger;
    the permutation's last ``holdout`` frames are in none (see :func:`holdout_frames`)."""
    if max(sizes) + holdout > n_frames:
        raise ExperimentError(f"asked for {max(sizes)} training structures (+{holdout} held out), the file has "
                              f"{n_frames}")
    order = np.random.default_rng(seed).permutation(n_frames)
    return {n: sorted(int(k) for k in order[:n]) for n in sorted(sizes)}


def holdout_frames(n_frames: int, seed: int, holdout: int) -> list[int]:
    """The frames :func:`nested_subsets` keeps out of every subset (same permutation, its tail)."""
    order = np.random.default_rng(seed).permutation(n_frames)
    return sorted(int(k) for k in order[n_frames - holdout:]) if holdout else []


def acac_subsets(n_frames: int, sizes: list[int], seed: int) -> dict[int, list[int]]:
    """The acac-only form's name for :func:`nested_subsets` without a hold-out."""
    return nested_subsets(n_frames, sizes, seed)


def _test_paths(t: FinetuneTarget, shared: Path, data_dir: Path) -> list[dict]:
    """A target's test sets: files under shared_data, or written under the data directory (hold-out,
    test files without the training file's frames)."""
    own = data_dir / f"{t.name}_tests"
    names = t.test_set_names
    files = [own / f"{names[0]}.xyz"] if t.holdout else []
    files += [own / f"{n}.xyz" if t.tests_exclude_train else shared / f
              for n, f in zip(names[len(files):], t.test_files)]
    return [{"name": n, "path": p} for n, p in zip(names, files)]


def planned_data(cfg: ExperimentConfig) -> ExperimentData:
    """The paths :func:`prepare_data` fills, without making anything (for planning)."""
    data_dir, shared = _path(cfg.data_dir), _path(cfg.shared_data)
    corpus_dir = None
    if cfg.corpus is not None:
        corpus_dir = _path(cfg.corpus.dir) if cfg.corpus.dir else data_dir / "corpus"
        demo_dir = bpa_dir = None
    else:
        demo_dir, bpa_dir = (_path(cfg.demo_dir) if cfg.demo_dir else data_dir / "demo"), data_dir / "3bpa"
    subsets = {t.name: {n: data_dir / f"{t.name}_n{n}" for n in sorted(t.sizes)} for t in cfg.fine_targets}
    tests = {t.name: _test_paths(t, shared, data_dir) for t in cfg.fine_targets}
    record = data_dir / ("targets.json" if cfg.named_targets else "subsets.json")
    return ExperimentData(demo_dir, bpa_dir, subsets.get("acac", {}) if not cfg.named_targets else {}, record,
                          subsets, tests, corpus_dir)


def _write_xyz(path: Path, frames: list) -> None:
    import ase.io

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".xyz.tmp")
    ase.io.write(tmp, frames, format="extxyz")
    os.replace(tmp, path)


def _frame_key(atoms) -> bytes:
    return np.asarray(atoms.numbers).tobytes() + np.round(atoms.positions, 6).tobytes()


def _prepare_tests(t: FinetuneTarget, frames: list, entries: list[dict], shared: Path, seed: int) -> dict:
    """Write the hold-out and the filtered test files of a target; returns what was written."""
    import ase.io

    written = {}
    if t.holdout:
        idx = holdout_frames(len(frames), seed, t.holdout)
        _write_xyz(entries[0]["path"], [frames[k] for k in idx])
        written[entries[0]["name"]] = {"holdout_frames": idx}
    if t.tests_exclude_train:
        train = {_frame_key(a) for a in frames}
        for e, f in zip(entries[1 if t.holdout else 0:], t.test_files):
            test = ase.io.read(shared / f, ":")
            kept = [a for a in test if _frame_key(a) not in train]
            if not kept:
                raise ExperimentError(f"{shared / f}: every frame also occurs in {t.train_file}; no test set left")
            _write_xyz(e["path"], kept)
            written[e["name"]] = {"source": str(shared / f), "frames": len(kept), "excluded": len(test) - len(kept)}
    return written


def _prepare_target(cfg: ExperimentConfig, t: FinetuneTarget, data: ExperimentData, previous: Optional[dict]) -> dict:
    """Nested subsets of one target ingested as datasets (redone when the chosen frames changed) and
    its test sets; returns the record of the chosen frames."""
    import ase.io

    from lamm_ds.ingest import IngestOptions, ingest
    from lamm_ds.shards import is_dataset_dir

    shared, data_dir = _path(cfg.shared_data), _path(cfg.data_dir)
    src = shared / t.train_file
    frames = ase.io.read(src, ":")
    subsets = nested_subsets(len(frames), t.sizes, cfg.subset_seed, t.holdout)
    record = {"source": str(src), "frames": len(frames), "seed": cfg.subset_seed,
              "subsets": {str(n): idx for n, idx in subsets.items()}}
    for n, idx in subsets.items():
        out = data.subsets[t.name][n]
        stale = previous is None or previous.get("subsets", {}).get(str(n)) != idx \
            or previous.get("source") != str(src)
        if stale or not is_dataset_dir(out):
            xyz = data_dir / f"{t.name}_n{n}.xyz"
            _write_xyz(xyz, [frames[k] for k in idx])
            ingest([str(xyz)], out, IngestOptions(name=t.name, level_of_theory=t.level_of_theory, workers=1,
                                                  progress=False, force=out.exists()))
    tests = _prepare_tests(t, frames, data.tests[t.name], shared, cfg.subset_seed)
    if tests:
        record["tests"] = tests
    return record


def _pretraining_sources(cfg: ExperimentConfig, data: ExperimentData, progress: bool) -> None:
    """The pre-training data: a generated corpus, else the demo sets and 3BPA."""
    if cfg.corpus is not None:
        from lamm_ds.corpus import make_corpus

        c = cfg.corpus
        data.corpus = {k: Path(v) for k, v in make_corpus(data.corpus_dir, scale=c.scale, seed=c.seed,
                                                          workers=c.workers, progress=progress).items()}
        return
    from lamm_ds.demo import make_demo
    from lamm_ds.ingest import IngestOptions, ingest
    from lamm_ds.shards import is_dataset_dir

    make_demo(data.demo_dir)
    if not is_dataset_dir(data.bpa_dir):
        ingest([str(_path(cfg.shared_data) / "3bpa" / "train_300K.xyz")], data.bpa_dir,
               IngestOptions(name="3bpa", level_of_theory="DFT (3BPA benchmark, see its README)", workers=1,
                             progress=False, force=data.bpa_dir.exists()))


def _check_sources(cfg: ExperimentConfig) -> None:
    shared = _path(cfg.shared_data)
    files = [] if cfg.corpus is not None else ["3bpa/train_300K.xyz"]
    files += [f for t in cfg.fine_targets for f in (t.train_file, *t.test_files)]
    for f in files:
        if not (shared / f).is_file():
            raise ExperimentError(f"{shared / f}: missing (shared_data={cfg.shared_data!r} must hold it)")


def _check_probes(cfg: ExperimentConfig) -> None:
    for probe in cfg.probe_sets:
        path = probe["path"]
        p = _path(cfg.data_dir) / path[len("@data/"):] if path.startswith("@data/") else _path(cfg.shared_data) / path
        if not p.exists():
            raise ExperimentError(f"probe set {probe.get('name')!r}: {p} missing (with a corpus, 3BPA is not "
                                  "ingested: set probe_sets to files under shared_data, or [])")


def prepare_data(cfg: ExperimentConfig, progress: bool = False) -> ExperimentData:
    """The pre-training data and every target's subsets and test sets as lamm-ds datasets/files
    (made once; atomic, so reusable)."""
    _check_sources(cfg)
    data = planned_data(cfg)
    _path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    _pretraining_sources(cfg, data, progress)
    previous = json.loads(data.subsets_file.read_text()) if data.subsets_file.is_file() else None
    if cfg.named_targets:
        old = (previous or {}).get("targets", {})
        record = {"targets": {t.name: _prepare_target(cfg, t, data, old.get(t.name)) for t in cfg.fine_targets}}
    else:
        record = _prepare_target(cfg, cfg.fine_targets[0], data, previous)
    tmp = data.subsets_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, data.subsets_file)
    _check_probes(cfg)
    return data


# --------------------------------------------------------------------------------------------------
# the runs


@dataclass
class RunSpec:
    name: str
    stage: str                      # "pretrain" | "finetune" | "scratch"
    variant: str                    # pre-training variant ("scratch" for scratch runs)
    size: Optional[int]             # training structures of the target (None for pre-training)
    run_dir: Path
    argv: list[str]                 # without the launcher's port
    slots: int
    depends: list[str] = field(default_factory=list)
    seed: Optional[int] = None      # fine-tuning seed override (None: the config's seed)
    pretrain_seed: Optional[int] = None  # the pre-training seed of the run or of its model
    target: Optional[str] = None    # the fine-tuning target (None for pre-training)


def pretrain_name(variant: str, seed: Optional[int]) -> str:
    return f"pretrain_{variant}" + ("" if seed is None else f"_s{seed}")


def run_name(cfg: ExperimentConfig, variant: str, pseed: Optional[int], target: str, size: int,
             fseed: Optional[int]) -> str:
    """``scratch_[<target>_]n<N>[_f<f>]``, ``finetune_<variant>[_s<s>]_[<target>_]n<N>[_f<f>]``."""
    head = "scratch" if variant == "scratch" else f"finetune_{variant}" + ("" if pseed is None else f"_s{pseed}")
    where = f"{target}_n{size}" if cfg.named_targets else f"n{size}"
    return f"{head}_{where}" + ("" if fseed is None else f"_f{fseed}")


def _pretrain_datasets(cfg: ExperimentConfig, data: ExperimentData, variant: PretrainVariant) -> list[dict]:
    """The pre-training config's dataset list with this experiment's paths, minus dropped sets."""
    from lamm_ds.engine.config import load_config

    base = load_config([str(_config_path(cfg.pretrain_config))], [_anchor(data), *cfg.pretrain_overrides])
    names = [d.name for d in base.data.datasets]
    unknown = set(variant.drop_datasets) - set(names)
    if unknown:
        raise ExperimentError(f"variant {variant.name!r} drops {sorted(unknown)}, not in the pre-training "
                              f"datasets {names}")
    if len(variant.drop_datasets) >= len(names):
        raise ExperimentError(f"variant {variant.name!r} drops every pre-training dataset {names}")
    out = []
    for d in base.data.datasets:
        if d.name in variant.drop_datasets:
            continue
        path = str(data.bpa_dir) if d.name == "3bpa" and data.bpa_dir is not None else d.path
        if data.corpus:
            if d.name not in data.corpus and not Path(d.path).exists():
                raise ExperimentError(f"pre-training dataset {d.name!r} ({d.path}) is not among the corpus "
                                      f"subsets {sorted(data.corpus)}")
            path = str(data.corpus.get(d.name, d.path))
        out.append({"name": d.name, "path": path})
    return out


def _anchor(data: ExperimentData) -> str:
    """The pre-training config's path anchor: the corpus, else the demo data."""
    return f"data.demo_dir={data.demo_dir}" if data.corpus_dir is None else f"data.corpus_dir={data.corpus_dir}"


def _seed_overrides(seed: Optional[int], denoise: bool = False) -> list[str]:
    if seed is None:
        return []
    return [f"seed={seed}", f"denoise.seed={seed}"] if denoise else [f"seed={seed}"]


def _check_overrides(config: str, overrides: list[str], what: str) -> None:
    """A typo in a variant's or target's overrides fails the plan, not a run an hour later."""
    from lamm_ds.engine.config import ConfigError, load_config

    try:
        load_config([str(_config_path(config))], overrides)
    except ConfigError as exc:
        raise ExperimentError(f"{what}: {exc}") from None


def _pretrain_runs(cfg: ExperimentConfig, data: ExperimentData, script: str) -> list[RunSpec]:
    out = _path(cfg.out_dir)
    runs = []
    for v in cfg.variants:
        datasets = json.dumps(_pretrain_datasets(cfg, data, v))
        _check_overrides(cfg.pretrain_config, [_anchor(data), *cfg.pretrain_overrides, *v.overrides],
                         f"variant {v.name!r} overrides")
        _check_overrides(cfg.finetune_config, [*cfg.finetune_overrides, *v.finetune_overrides],
                         f"variant {v.name!r} finetune_overrides")
        for s in cfg.seeds_of(v):
            run_dir = out / pretrain_name(v.name, s)
            argv = [script, "--config", str(_config_path(cfg.pretrain_config)), "--run-dir", str(run_dir), "--quiet",
                    _anchor(data), f"data.datasets={datasets}", *cfg.pretrain_overrides, *v.overrides,
                    *_seed_overrides(s, denoise=True)]
            runs.append(RunSpec(run_dir.name, "pretrain", v.name, None, run_dir, argv, min(cfg.ranks, cfg.parallel),
                                pretrain_seed=s))
    return runs


def _finetune_head(cfg: ExperimentConfig) -> str:
    """The fine-tuning config's first dataset name (a target of another name renames it)."""
    from lamm_ds.engine.config import load_config

    ds = load_config([str(_config_path(cfg.finetune_config))], cfg.finetune_overrides).data.datasets
    return ds[0].name if ds else ""


def _target_overrides(cfg: ExperimentConfig, data: ExperimentData, t: FinetuneTarget, n: int, head: str) -> list[str]:
    """Overrides shared by a target's scratch and fine-tune runs at size ``n`` (before seeds/variant)."""
    tests = data.tests.get(t.name) or _test_paths(t, _path(cfg.shared_data), _path(cfg.data_dir))
    evals = [{"name": e["name"], "path": str(e["path"]), "head": t.name} for e in tests]
    rename = [] if t.name == head else [f"data.datasets.0.name={t.name}"]
    return [f"eval_datasets={json.dumps(evals)}", f"data.datasets.0.path={data.subsets[t.name][n]}", *rename,
            *cfg.finetune_overrides, *t.overrides]


def plan_runs(cfg: ExperimentConfig, data: ExperimentData) -> list[RunSpec]:
    """Pre-training, scratch and fine-tuning runs with their commands, in a useful start order: the
    main pre-training (first seed), the scratch runs and its fine-tunes, then the other pre-trainings
    and their fine-tunes (with ``targets``: each pre-training then its fine-tunes), then the acac-only
    form's seed controls."""
    out = _path(cfg.out_dir)
    pre_script, ft_script = str(REPO_ROOT / "launch" / "pretrain.py"), str(REPO_ROOT / "launch" / "finetune.py")
    pretrains = _pretrain_runs(cfg, data, pre_script)
    head = _finetune_head(cfg)
    # options first: the launch scripts take every argument after the first override as one
    ft_config = ["--config", str(_config_path(cfg.finetune_config)), "--quiet"]
    scratch, main_ft, other_ft = [], [], []
    for t in cfg.fine_targets:
        _check_overrides(cfg.finetune_config, [*cfg.finetune_overrides, *t.overrides], f"target {t.name!r} overrides")
        for n in sorted(t.sizes):
            common = _target_overrides(cfg, data, t, n, head)
            for f in cfg.finetune_seed_list:
                run_dir = out / run_name(cfg, "scratch", None, t.name, n, f)
                scratch.append(RunSpec(run_dir.name, "scratch", "scratch", n, run_dir,
                                       [pre_script, *ft_config, "--run-dir", str(run_dir), *common,
                                        *_seed_overrides(f)], 1, seed=f, target=t.name))
                for k, p in enumerate(pretrains):
                    v = next(x for x in cfg.variants if x.name == p.variant)
                    if not t.fine_tunes_variant(v.name == cfg.main, n):
                        continue
                    run_dir = out / run_name(cfg, v.name, p.pretrain_seed, t.name, n, f)
                    argv = [ft_script, "--init", str(p.run_dir / "model.safetensors"), *ft_config, "--run-dir",
                            str(run_dir), *common, *v.finetune_overrides, *_seed_overrides(f)]
                    (main_ft if k == 0 else other_ft).append(
                        RunSpec(run_dir.name, "finetune", v.name, n, run_dir, argv, 1, [p.name], f, p.pretrain_seed,
                                t.name))
    if cfg.named_targets:  # each pre-training followed by its fine-tunes: an interrupted run has whole variants
        rest = [r for p in pretrains[1:] for r in (p, *(x for x in other_ft if x.depends == [p.name]))]
    else:  # the acac-only form's order (kept: its plans are unchanged)
        rest = [*pretrains[1:], *other_ft]
    return [pretrains[0], *scratch, *main_ft, *rest, *_seed_controls(cfg, scratch, main_ft)]


def _seed_controls(cfg: ExperimentConfig, scratch: list[RunSpec], main_ft: list[RunSpec]) -> list[RunSpec]:
    """The acac-only form's ``extra_seeds``: scratch and main fine-tune again at ``seed_sizes``."""
    out = []
    for n in sorted(cfg.sizes):
        if n not in cfg.seed_sizes:
            continue
        for seed in cfg.extra_seeds:
            for spec in (next(s for s in scratch if s.size == n), next(s for s in main_ft if s.size == n)):
                run_dir = spec.run_dir.parent / f"{spec.name}_seed{seed}"
                argv = [str(run_dir) if a == str(spec.run_dir) else a for a in spec.argv]
                out.append(RunSpec(run_dir.name, spec.stage, spec.variant, n, run_dir, [*argv, f"seed={seed}"], 1,
                                   list(spec.depends), seed, spec.pretrain_seed, spec.target))
    return out


def plan_counts(runs: list[RunSpec]) -> dict:
    """How many runs in all and of each stage."""
    stages = {k: sum(r.stage == k for r in runs) for k in ("pretrain", "finetune", "scratch")}
    return {"runs": len(runs), **stages}
