"""The experiment's typed config (:class:`ExperimentConfig` with its :class:`PretrainVariant`\\ s,
:class:`FinetuneTarget`\\ s and optional :class:`CorpusConfig`): loading, a main-only copy, its YAML;
path helpers and :class:`ExperimentError`.

Two forms: the acac-only one (``sizes``, ``test_files``, ... at the top level; one pre-training per
variant; run names ``scratch_n50``, ``finetune_main_n50``) and the general one (``targets``,
``pretrain_seeds``, ``finetune_seeds``; run names carry the target and the seeds). The first is
read as a single target named ``acac`` (:attr:`ExperimentConfig.fine_targets`).
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[3]


class ExperimentError(RuntimeError):
    """A run of the experiment failed, or its inputs are missing; the message names which."""


def _distinct(values: list, what: str, positive: bool = False) -> None:
    if len(set(values)) != len(values) or (positive and any(v < 1 for v in values)):
        raise ValueError(f"{what} must be distinct{' positive' if positive else ''} integers, got {values}")


@dataclass
class PretrainVariant:
    """A pre-training run: ``overrides`` (dotted keys of the pre-training config) and datasets left out;
    ``finetune_overrides`` go to every fine-tune of it; ``seeds``: its pre-training seeds (default: the
    experiment's ``pretrain_seeds``), e.g. ``[0]`` for a knob only worth one seed."""

    name: str = ""
    description: str = ""
    overrides: list[str] = field(default_factory=list)
    drop_datasets: list[str] = field(default_factory=list)
    finetune_overrides: list[str] = field(default_factory=list)
    seeds: Optional[list[int]] = None

    def __post_init__(self) -> None:
        if self.seeds is not None:
            if not self.seeds:
                raise ValueError(f"variant {self.name!r}: seeds must be null (the experiment's) or non-empty")
            _distinct(self.seeds, f"variant {self.name!r} seeds")


@dataclass
class FinetuneTarget:
    """A fine-tuning task: nested random subsets of ``train_file`` (``sizes`` structures, under
    ``shared_data``), trained into a head named ``name`` and scored on the test sets: the files
    ``test_files`` (named ``3bpa/test.xyz`` -> ``3bpa_test``) and, with ``holdout`` > 0, that many
    frames of ``train_file`` that no subset holds (``<name>_holdout``, listed first)."""

    name: str = ""
    train_file: str = ""
    sizes: list[int] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    holdout: int = 0
    tests_exclude_train: bool = False     # leave test-file frames that also occur in train_file out
    curve_sets: list[str] = field(default_factory=list)  # learning curves on these (default: every test set)
    target_set: str = ""                  # steps to reach scratch's final force error (default: first curve set)
    ablation_sizes: Optional[list[int]] = None  # sizes the variants after the main one fine-tune (default: all)
    level_of_theory: str = ""             # recorded in the ingested subsets
    overrides: list[str] = field(default_factory=list)  # added to this target's fine-tune and scratch runs

    def __post_init__(self) -> None:
        if not self.name or "." in self.name or "/" in self.name:
            raise ValueError(f"a target needs a name without '.' or '/' (it names a head), got {self.name!r}")
        if not self.train_file:
            raise ValueError(f"target {self.name!r}: train_file is required")
        if not self.sizes:
            raise ValueError(f"target {self.name!r}: sizes is empty")
        _distinct(self.sizes, f"target {self.name!r} sizes", positive=True)
        if self.holdout < 0:
            raise ValueError(f"target {self.name!r}: holdout must be >= 0, got {self.holdout}")
        tests = self.test_set_names
        if not tests or len(set(tests)) != len(tests):
            raise ValueError(f"target {self.name!r}: needs distinct test sets (test_files or holdout), got {tests}")
        self.curve_sets = self.curve_sets or tests
        self.target_set = self.target_set or self.curve_sets[0]
        if not set(self.curve_sets) <= set(tests):
            raise ValueError(f"target {self.name!r}: curve_sets {self.curve_sets} must be among its test sets {tests}")
        if self.target_set not in self.curve_sets:
            raise ValueError(f"target {self.name!r}: target_set {self.target_set!r} must be one of curve_sets "
                             f"{self.curve_sets}")
        if self.ablation_sizes is not None and not set(self.ablation_sizes) <= set(self.sizes):
            raise ValueError(f"target {self.name!r}: ablation_sizes {self.ablation_sizes} must be among sizes "
                             f"{self.sizes}")

    @property
    def test_set_names(self) -> list[str]:
        """``[<name>_holdout] + test_files`` as set names (``acac/test_MD_300K.xyz`` -> ``acac_test_MD_300K``)."""
        held = [f"{self.name}_holdout"] if self.holdout else []
        return held + [f.removesuffix(".xyz").replace("/", "_") for f in self.test_files]

    def fine_tunes_variant(self, first: bool, size: int) -> bool:
        """Whether a variant (the main one: ``first``) is fine-tuned at ``size``."""
        return first or self.ablation_sizes is None or size in self.ablation_sizes


@dataclass
class CorpusConfig:
    """Pre-training data generated by ``lamm_ds.corpus.make_corpus`` (instead of the demo sets and 3BPA)."""

    scale: str = "small"
    seed: int = 0
    workers: int = 1
    dir: Optional[str] = None             # default <data_dir>/corpus

    def __post_init__(self) -> None:
        if not self.scale or self.workers < 1:
            raise ValueError(f"corpus needs a scale and workers >= 1, got {self.scale!r} and {self.workers}")


def _default(f: Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


# The acac-only form's keys: with `targets` set they must keep these defaults.
_LEGACY_TARGET_KEYS = ("sizes", "ablation_sizes", "test_files", "curve_sets", "target_set", "extra_seeds",
                       "seed_sizes")
ACAC_LEVEL_OF_THEORY = "PBE+D3/def2-SVP (ORCA)"


@dataclass
class ExperimentConfig:
    name: str = "pretrain_finetune"             # published results: bench/results/<name>.json, docs/img/<name>_*.png
    out_dir: str = "runs/pretrain_finetune"     # one sub-directory per run, plus results/plots/report
    data_dir: str = "data/pretrain_finetune"    # ingested datasets (reused when present)
    demo_dir: Optional[str] = None              # existing demo data; default <data_dir>/demo (generated)
    shared_data: str = "../shared/data"         # holds 3bpa/ and acac/
    corpus: Optional[CorpusConfig] = None       # set: pre-train on a generated corpus (no demo data, no 3BPA)
    pretrain_config: str = "configs/experiments/pretrain_finetune/pretrain.yaml"
    finetune_config: str = "configs/experiments/pretrain_finetune/finetune.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)  # applied to every pre-training run
    finetune_overrides: list[str] = field(default_factory=list)  # to every fine-tune and scratch run
    ranks: int = 2                              # DeepSpeed ranks per pre-training run
    parallel: int = 2                           # process slots: a pre-training takes `ranks`, a fine-tune 1
    threads_per_process: int = 1                # OMP_NUM_THREADS of every rank / fine-tune process
    sizes: list[int] = field(default_factory=lambda: [50, 100, 500])  # acac training structures
    subset_seed: int = 0                        # the nested subsets (and hold-outs) of every target
    ablation_sizes: list[int] = field(default_factory=lambda: [50, 100, 500])  # sizes fine-tuned per ablation
    variants: list[PretrainVariant] = field(default_factory=lambda: [PretrainVariant(name="main")])
    only_variants: list[str] = field(default_factory=list)  # run only these variants (the main one among them)
    test_files: list[str] = field(default_factory=lambda: ["acac/test_MD_300K.xyz", "acac/test_MD_600K.xyz"])
    curve_sets: list[str] = field(default_factory=lambda: ["acac_test_MD_300K", "acac_test_MD_600K"])
    target_set: str = "acac_test_MD_300K"       # for "steps to reach the scratch model's final force error"
    targets: list[FinetuneTarget] = field(default_factory=list)  # the general form (replaces the acac keys)
    pretrain_seeds: list[int] = field(default_factory=list)  # each variant pre-trained once per seed
    finetune_seeds: list[int] = field(default_factory=list)  # each fine-tune and scratch run once per seed
    # Pre-trained models are also evaluated on these (dataset directory, or file under shared_data)
    # with the given head: how well pre-training fitted the data closest to the target chemistry.
    probe_sets: list[dict] = field(default_factory=lambda: [
        {"name": "3bpa_train_300K", "path": "@data/3bpa", "head": "3bpa"},
        {"name": "3bpa_train_mixedT", "path": "3bpa/train_mixedT.xyz", "head": "3bpa"}])
    extra_seeds: list[int] = field(default_factory=list)  # seed controls: scratch + main fine-tune again
    seed_sizes: list[int] = field(default_factory=list)   # ... at these sizes, with `seed=S`

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if not names or not all(names) or len(set(names)) != len(names):
            raise ValueError(f"variants need unique, non-empty names (the first is the main one), got {names}")
        if "scratch" in names:
            raise ValueError("'scratch' is reserved for the from-scratch runs; rename that variant")
        self._check_general_form()
        if not self.sizes or any(n < 1 for n in self.sizes) or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"sizes must be distinct positive integers, got {self.sizes}")
        if not set(self.ablation_sizes) <= set(self.sizes):
            raise ValueError(f"ablation_sizes {self.ablation_sizes} must be among sizes {self.sizes}")
        if not set(self.seed_sizes) <= set(self.sizes) or (self.extra_seeds and not self.seed_sizes):
            raise ValueError(f"seed_sizes {self.seed_sizes} must be among sizes {self.sizes} (and given with "
                             f"extra_seeds {self.extra_seeds})")
        if self.ranks < 1 or self.parallel < 1 or self.threads_per_process < 1:
            raise ValueError("ranks, parallel and threads_per_process must be >= 1")
        tests = self.test_set_names
        if not set(self.curve_sets) <= set(tests):
            raise ValueError(f"curve_sets {self.curve_sets} must be among the test sets {tests} (from test_files)")
        if self.target_set not in self.curve_sets:
            raise ValueError(f"target_set {self.target_set!r} must be one of curve_sets {self.curve_sets}")
        if self.only_variants:
            if not set(self.only_variants) <= set(names) or self.main not in self.only_variants:
                raise ValueError(f"only_variants {self.only_variants} must be among the variants {names} and "
                                 f"hold the main one, {self.main!r}")
            self.variants = [v for v in self.variants if v.name in self.only_variants]

    def _check_general_form(self) -> None:
        _distinct(self.pretrain_seeds, "pretrain_seeds")
        _distinct(self.finetune_seeds, "finetune_seeds")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"targets need unique names, got {names}")
        if self.targets:
            changed = [f.name for f in fields(self) if f.name in _LEGACY_TARGET_KEYS
                       and getattr(self, f.name) != _default(f)]
            if changed:
                raise ValueError(f"{changed} belong to the acac-only form; with `targets` give sizes, test "
                                 "files and sets per target (and finetune_seeds for seeds)")
        if self.extra_seeds and (self.pretrain_seeds or self.finetune_seeds):
            raise ValueError("extra_seeds (seed controls of the acac-only form) cannot be combined with "
                             "pretrain_seeds/finetune_seeds; use finetune_seeds")

    @property
    def test_set_names(self) -> list[str]:
        """``acac/test_MD_300K.xyz`` -> ``acac_test_MD_300K``."""
        return [f.removesuffix(".xyz").replace("/", "_") for f in self.test_files]

    @property
    def main(self) -> str:
        return self.variants[0].name

    @property
    def named_targets(self) -> bool:
        """The general form: run names carry the target (and data records are per target)."""
        return bool(self.targets)

    @property
    def fine_targets(self) -> list[FinetuneTarget]:
        """``targets``, or the acac-only form's single target ``acac``."""
        if self.targets:
            return self.targets
        return [FinetuneTarget(name="acac", train_file="acac/train_300K.xyz", sizes=list(self.sizes),
                               test_files=list(self.test_files), curve_sets=list(self.curve_sets),
                               target_set=self.target_set, ablation_sizes=list(self.ablation_sizes),
                               level_of_theory=ACAC_LEVEL_OF_THEORY)]

    def seeds_of(self, variant: PretrainVariant) -> list[Optional[int]]:
        """Pre-training seeds of a variant (``[None]``: once, with the pre-training config's seed)."""
        seeds = self.pretrain_seeds if variant.seeds is None else variant.seeds
        return list(seeds) or [None]

    @property
    def finetune_seed_list(self) -> list[Optional[int]]:
        """Fine-tuning seeds (``[None]``: once, with the fine-tuning config's seed)."""
        return list(self.finetune_seeds) or [None]


def load_experiment_config(files: list[str] = (), overrides: list[str] = ()) -> ExperimentConfig:
    from lamm_ds.engine.config import load_config

    return load_config(files, overrides, schema=ExperimentConfig)


def _path(p: str | Path) -> Path:
    q = Path(p)
    return q if q.is_absolute() else (Path.cwd() / q)


def _config_path(p: str) -> Path:
    """A config file: as given (from the working directory), else from the repository root."""
    q = _path(p)
    return q if q.exists() else REPO_ROOT / p


def _main_only(cfg: ExperimentConfig) -> ExperimentConfig:
    import copy

    c = copy.deepcopy(cfg)
    c.variants = c.variants[:1]
    return c


def _experiment_yaml(cfg: ExperimentConfig) -> str:
    from lamm_ds.engine.config import to_yaml

    return to_yaml(cfg)
