"""Typed run configuration (dataclasses, merged with YAML files and dotted overrides by OmegaConf).

An unknown or misspelt key anywhere is an error naming it; values are type-checked on merge, and
each section's own validation (``__post_init__``) runs when the config is materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lamm_ds.denoise import DenoiseConfig
from lamm_ds.loss import LossConfig
from lamm_ds.model.equiformer_v2 import EquiformerV2Config
from lamm_ds.model.painn import PaiNNConfig
from lamm_ds.scheduler.plan import STRATEGIES

MODEL_KINDS = ("painn", "equiformer_v2")


@dataclass
class DatasetConfig:
    name: str = ""
    path: str = ""
    head: Optional[str] = None  # evaluation only: the energy head to use (default: `name`, else the first)
    references: str = "fit"     # per-element reference energies (E0s) of a new head: "fit" (least squares on
                                # the set), "average" (the set's mean energy per atom for every element),
                                # "zero", or "isolated:<file>" (single-atom structures' energies)
    reference_energies: dict[str, float] = field(default_factory=dict)  # element symbol -> eV, overrides the above
    samples: int = 0                # train on this many of its structures (0: all), chosen by `selection`
    selection: str = "random"       # "random" (seeded) or "fps": farthest-point sampling in the initial model's
                                    # feature space (per-structure mean of the backbone's invariant features)
    share: Optional[float] = None   # a fixed fraction of the draws (e.g. replay); null: temperature sampling
    loss_weight: float = 1.0        # multiplies its samples' errors in every loss term (denominators unchanged)

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"dataset {self.name!r}: samples must be >= 0, got {self.samples}")
        if self.selection not in ("random", "fps"):
            raise ValueError(f"dataset {self.name!r}: selection must be 'random' or 'fps', got {self.selection!r}")
        if self.share is not None and not 0 < self.share < 1:
            raise ValueError(f"dataset {self.name!r}: share must be in (0, 1) or null, got {self.share}")
        if not (self.loss_weight > 0 and math.isfinite(self.loss_weight)):
            raise ValueError(f"dataset {self.name!r}: loss_weight must be a finite number > 0, got {self.loss_weight}")
        if self.references not in ("fit", "average", "zero") and not self.references.startswith("isolated:"):
            raise ValueError(f"dataset {self.name!r}: references must be 'fit', 'average', 'zero' or "
                             "'isolated:<file>', "
                             f"got {self.references!r}")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    temperature: float = 2.0            # p_k ∝ n_k^(1/T)
    epoch_length: Optional[int] = None  # draws per epoch; default: total size of all datasets
    batch_size: int = 16                # graphs per optimiser step (all ranks together)
    num_workers: int = 0                # DataLoader worker processes
    stats_samples: int = 5000           # structures per dataset used to fit references/normalisation
    demo_dir: Optional[str] = None      # generate the embedded demo data here on first use
    corpus_dir: Optional[str] = None    # only an anchor for paths (${data.corpus_dir}/<subset>); generates nothing


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"            # "cosine" (to min_lr_ratio * lr) or "constant"
    min_lr_ratio: float = 0.05
    grad_clip: float = 10.0             # max global gradient norm; 0 disables
    ema_decay: float = 0.0              # exponential moving average of the weights (e.g. 0.999), exported as the
                                        # model; 0: off (engine/ema.py)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise ValueError(f"optim.ema_decay must be 0 (off) or in (0, 1), e.g. 0.999, got {self.ema_decay}")


@dataclass
class CheckpointConfig:
    every: int = 50                     # steps between checkpoints (0: only at the end)
    keep_last: int = 3                  # older checkpoints are deleted once a newer one is complete


@dataclass
class FinetuneConfig:
    init: Optional[str] = None          # exported model file or DeepSpeed checkpoint directory
    freeze_backbone: bool = False       # train the energy heads (and force head) only
    freeze_embeddings: bool = False     # keep the input side fixed: element embeddings, radial/edge-degree tables
    freeze_layers: int = 0              # keep the first k message-passing layers fixed
    backbone_lr_ratio: float = 1.0      # backbone LR = ratio * optim.lr (heads use optim.lr)
    layer_lr_decay: float = 1.0         # layer-wise LR decay: depth d of L+1 gets ratio * decay^(L+1-d) (1: off)
    head_init_from: Optional[str] = "auto"  # new heads copy this pre-trained head; "auto": the head whose
                                            # training elements are closest to the new set's; null: random
    new_elements: str = "similar"       # embedding rows of elements the backbone never saw: "similar" (mean of
                                        # the nearest trained elements in the periodic table) or "random"
    forces: Optional[str] = None        # null: keep the pre-trained model's force mode (warns if direct);
                                        # "conservative" (F = -dE/dx, drops a direct head) or "direct"
    replay: list[str] = field(default_factory=list)  # "DATASET_DIR[:N]": pre-training data mixed in, into the
                                                     # pre-trained head of the dataset's name (N: a subset)
    replay_share: float = 0.05          # fraction of the draws the replay sets get together (measured: docs/results.md)
    replay_selection: str = "random"    # how the N replayed structures are chosen: "random" or "fps"
    replay_weight: float = 1.0          # loss weight of the replayed samples (their datasets' loss_weight)

    def __post_init__(self) -> None:
        if not 0 < self.replay_share < 1:
            raise ValueError(f"finetune.replay_share must be in (0, 1), got {self.replay_share}")
        if self.replay_selection not in ("random", "fps"):
            raise ValueError(f"finetune.replay_selection must be 'random' or 'fps', got {self.replay_selection!r}")
        if not (self.replay_weight > 0 and math.isfinite(self.replay_weight)):
            raise ValueError(f"finetune.replay_weight must be a finite number > 0, got {self.replay_weight}")
        if self.forces not in (None, "direct", "conservative"):
            raise ValueError(f"finetune.forces must be null, 'direct' or 'conservative', got {self.forces!r}")
        if self.new_elements not in ("similar", "random"):
            raise ValueError(f"finetune.new_elements must be 'similar' or 'random', got {self.new_elements!r}")
        if self.freeze_layers < 0:
            raise ValueError(f"finetune.freeze_layers must be >= 0, got {self.freeze_layers}")
        if not 0 < self.layer_lr_decay <= 1:
            raise ValueError(f"finetune.layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")
        if self.backbone_lr_ratio < 0:
            raise ValueError(f"finetune.backbone_lr_ratio must be >= 0, got {self.backbone_lr_ratio}")


@dataclass
class FaultConfig:
    nan_abort_after: int = 5            # consecutive non-finite steps (skipped on every rank) before aborting
    collective_timeout_s: int = 600     # a rank that stops answering makes the others fail after this
    inject_nan_steps: list[int] = field(default_factory=list)  # testing the fault path only


SCHEDULE_STRATEGIES = STRATEGIES  # the scheduler's list: one place to add a strategy


@dataclass
class ScheduleConfig:
    """How each step's draws are split over the ranks (docs/load_balancing.md)."""

    strategy: str = "fixed"             # "fixed" (d % world), "atoms" (LPT on atoms), "balanced", "budget",
                                        # "max_atoms" (greedy atom-budget packing, batches dealt in turn)
    window_steps: int = 32              # balanced/budget/max_atoms: steps planned together from one window of draws
    max_atoms_per_rank: Optional[int] = None  # memory caps (balanced/budget/max_atoms); None = unlimited
    max_edges_per_rank: Optional[int] = None  # in stored edges (the datasets' manifest cutoff)
    cost_model: str = "auto"            # "auto" (<run-dir>/cost_model.json, else built-in), "builtin:NAME", or a
                                        # JSON file from `lamm-ds calibrate`
    coefficients: list[float] = field(default_factory=list)  # [atoms, edges, graphs, const] seconds; overrides
    plan_ranks: Optional[int] = None    # plan for this many ranks (a multiple of the world size); default: world
    composition_preserving: bool = False  # balanced only: steps keep the stream's mix (stratified dealing)
                                          # instead of grouping similar-sized draws

    def __post_init__(self) -> None:
        if self.strategy not in SCHEDULE_STRATEGIES:
            raise ValueError(f"schedule.strategy must be one of {SCHEDULE_STRATEGIES}, got {self.strategy!r}")
        if self.composition_preserving and self.strategy != "balanced":
            raise ValueError("schedule.composition_preserving applies to strategy 'balanced' only, got "
                             f"strategy={self.strategy!r}")
        if self.window_steps < 1:
            raise ValueError(f"schedule.window_steps must be >= 1, got {self.window_steps}")
        for name in ("max_atoms_per_rank", "max_edges_per_rank", "plan_ranks"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"schedule.{name} must be >= 1 or null, got {v}")
        if self.coefficients and (len(self.coefficients) != 4 or any(c < 0 for c in self.coefficients)):
            raise ValueError("schedule.coefficients must be 4 non-negative numbers [atoms, edges, graphs, const], "
                             f"got {self.coefficients}")


@dataclass
class RunConfig:
    seed: int = 0
    max_steps: int = 200
    log_every: int = 10
    denoise_unlabelled: bool = True     # train unlabelled structures through denoising labelling
    model: PaiNNConfig = field(default_factory=PaiNNConfig)
    model_kind: str = "painn"           # "painn" (section `model`) or "equiformer_v2" (section `equiformer_v2`)
    equiformer_v2: EquiformerV2Config = field(default_factory=EquiformerV2Config)
    loss: LossConfig = field(default_factory=LossConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_datasets: list[DatasetConfig] = field(default_factory=list)
    eval_every: int = 0                 # also evaluate every N steps (and before step 0): eval_curve.jsonl
    eval_max_structures: int = 0        # structures per set in those evaluations (evenly spaced; 0: all)
    deepspeed_config: str = "ds_configs/cpu_demo.json"  # relative paths: from the repository root
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    compile: bool = False               # torch.compile the model (PaiNN, direct forces, ZeRO 0-2; docs/engine.md)
    keep_host_memory: bool = True       # CPU ranks: malloc reuses freed memory instead of page-faulting it in anew
                                        # (EquiformerV2's large cells 1.3-1.8x faster; resident memory stays at its peak)

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {self.model_kind!r}")
        if self.eval_every < 0 or self.eval_max_structures < 0:
            raise ValueError(f"eval_every and eval_max_structures must be >= 0, got {self.eval_every} and "
                             f"{self.eval_max_structures}")
        if self.eval_every and not self.eval_datasets:
            raise ValueError(f"eval_every={self.eval_every} needs eval_datasets to evaluate on")


def model_config(cfg: "RunConfig"):
    """The config section of the selected model kind (``cfg.model`` or ``cfg.equiformer_v2``)."""
    return cfg.equiformer_v2 if cfg.model_kind == "equiformer_v2" else cfg.model


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def load_config(files: list[str | Path] = (), overrides: list[str] = (), schema: Any = RunConfig):
    """Schema defaults <- YAML files in order <- ``key=value`` dotted overrides, then validated."""
    where = ""
    try:
        cfg = OmegaConf.structured(schema)
        for f in files:
            where = f" (in {f})"
            if not Path(f).is_file():
                raise ConfigError(f"config file not found: {f}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(f))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"command-line overrides must look like key=value, got {bad}")
        for item in overrides:
            where = f" (in the command-line override {item!r})"
            key, value = item.split("=", 1)
            # from_dotlist cannot address list items ("data.datasets.0.path"); update can.
            OmegaConf.update(cfg, key.strip(), yaml.safe_load(value) if value else None, merge=True)
        where = ""
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except (OmegaConfBaseException, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(f"invalid config{where}: {exc}".splitlines()[0] + _key_hint(exc)) from exc
    except ValueError as exc:  # a section's own validation (__post_init__)
        raise ConfigError(f"invalid config value{where}: {exc}") from exc


def _key_hint(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    return f" [key: {key}]" if key else ""


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def record_list_defaults() -> dict[str, dict]:
    """Dotted path -> the default fields of each record of that list (for resume comparisons)."""
    item = yaml.safe_load(to_yaml(DatasetConfig()))
    return {"data.datasets": item, "eval_datasets": item}


def config_defaults() -> tuple[dict, dict[str, dict]]:
    """(the default config as a tree, :func:`record_list_defaults`): what a resume compares missing
    keys against (rundir.check_resume_config)."""
    return yaml.safe_load(to_yaml(RunConfig())), record_list_defaults()
