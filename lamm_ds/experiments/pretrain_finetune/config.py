"""The experiment's typed config (:class:`ExperimentConfig`, :class:`PretrainVariant`): loading, a
main-only copy, its YAML; path helpers and :class:`ExperimentError`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[3]


class ExperimentError(RuntimeError):
    """A run of the experiment failed, or its inputs are missing; the message names which."""


@dataclass
class PretrainVariant:
    """A pre-training run: ``overrides`` (dotted keys of the pre-training config) and datasets left out."""

    name: str = ""
    description: str = ""
    overrides: list[str] = field(default_factory=list)
    drop_datasets: list[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    out_dir: str = "runs/pretrain_finetune"     # one sub-directory per run, plus results/plots/report
    data_dir: str = "data/pretrain_finetune"    # ingested datasets (reused when present)
    demo_dir: Optional[str] = None              # existing demo data; default <data_dir>/demo (generated)
    shared_data: str = "../shared/data"         # holds 3bpa/ and acac/
    pretrain_config: str = "configs/experiments/pretrain_finetune/pretrain.yaml"
    finetune_config: str = "configs/experiments/pretrain_finetune/finetune.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)  # applied to every pre-training run
    finetune_overrides: list[str] = field(default_factory=list)  # to every fine-tune and scratch run
    ranks: int = 2                              # DeepSpeed ranks per pre-training run
    parallel: int = 2                           # process slots: a pre-training takes `ranks`, a fine-tune 1
    threads_per_process: int = 1                # OMP_NUM_THREADS of every rank / fine-tune process
    sizes: list[int] = field(default_factory=lambda: [50, 100, 500])  # acac training structures
    subset_seed: int = 0
    ablation_sizes: list[int] = field(default_factory=lambda: [50, 100, 500])  # sizes fine-tuned per ablation
    variants: list[PretrainVariant] = field(default_factory=lambda: [PretrainVariant(name="main")])
    test_files: list[str] = field(default_factory=lambda: ["acac/test_MD_300K.xyz", "acac/test_MD_600K.xyz"])
    curve_sets: list[str] = field(default_factory=lambda: ["acac_test_MD_300K", "acac_test_MD_600K"])
    target_set: str = "acac_test_MD_300K"       # for "steps to reach the scratch model's final force error"
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

    @property
    def test_set_names(self) -> list[str]:
        """``acac/test_MD_300K.xyz`` -> ``acac_test_MD_300K``."""
        return [f.removesuffix(".xyz").replace("/", "_") for f in self.test_files]

    @property
    def main(self) -> str:
        return self.variants[0].name


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
