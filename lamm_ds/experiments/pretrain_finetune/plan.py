"""What the experiment is made of: its datasets (demo, 3BPA, nested acac subsets; prepared once) and
its runs (pre-training, scratch, fine-tuning, seed controls) with their commands and dependencies."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from lamm_ds.experiments.pretrain_finetune.config import (REPO_ROOT, ExperimentConfig, ExperimentError,
                                                          PretrainVariant, _config_path, _path)


# --------------------------------------------------------------------------------------------------
# data


@dataclass
class ExperimentData:
    demo_dir: Path
    bpa_dir: Path
    acac: dict[int, Path]
    subsets_file: Path


def acac_subsets(n_frames: int, sizes: list[int], seed: int) -> dict[int, list[int]]:
    """Nested random subsets: the first n of one seeded permutation, so a smaller set lies in a larger."""
    if max(sizes) > n_frames:
        raise ExperimentError(f"asked for {max(sizes)} acac training structures, the file has {n_frames}")
    order = np.random.default_rng(seed).permutation(n_frames)
    return {n: sorted(int(k) for k in order[:n]) for n in sorted(sizes)}


def prepare_data(cfg: ExperimentConfig) -> ExperimentData:
    """Demo data, 3BPA and the acac subsets as lamm-ds datasets (made once; atomic, so reusable)."""
    import ase.io

    from lamm_ds.demo import make_demo
    from lamm_ds.ingest import IngestOptions, ingest
    from lamm_ds.shards import is_dataset_dir

    shared = _path(cfg.shared_data)
    bpa_src, acac_src = shared / "3bpa" / "train_300K.xyz", shared / "acac" / "train_300K.xyz"
    for src in (bpa_src, acac_src, *(shared / f for f in cfg.test_files)):
        if not src.is_file():
            raise ExperimentError(f"{src}: missing (shared_data={cfg.shared_data!r} must hold 3bpa/ and acac/)")
    data_dir = _path(cfg.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    demo_dir = _path(cfg.demo_dir) if cfg.demo_dir else data_dir / "demo"
    make_demo(demo_dir)

    def ingest_once(inputs: list[str], out: Path, name: str, level: str) -> Path:
        if not is_dataset_dir(out):
            ingest(inputs, out, IngestOptions(name=name, level_of_theory=level, workers=1, progress=False,
                                              force=out.exists()))
        return out

    bpa_dir = ingest_once([str(bpa_src)], data_dir / "3bpa", "3bpa", "DFT (3BPA benchmark, see its README)")
    frames = ase.io.read(acac_src, ":")
    subsets = acac_subsets(len(frames), cfg.sizes, cfg.subset_seed)
    record = {"source": str(acac_src), "frames": len(frames), "seed": cfg.subset_seed,
              "subsets": {str(n): idx for n, idx in subsets.items()}}
    subsets_file = data_dir / "subsets.json"
    previous = json.loads(subsets_file.read_text()) if subsets_file.is_file() else None
    acac = {}
    for n, idx in subsets.items():
        out = data_dir / f"acac_n{n}"
        stale = previous is None or previous.get("subsets", {}).get(str(n)) != idx \
            or previous.get("source") != str(acac_src)
        if stale or not is_dataset_dir(out):
            xyz = data_dir / f"acac_n{n}.xyz"
            tmp = xyz.with_suffix(".xyz.tmp")
            ase.io.write(tmp, [frames[k] for k in idx], format="extxyz")
            os.replace(tmp, xyz)
            ingest([str(xyz)], out, IngestOptions(name="acac", level_of_theory="PBE+D3/def2-SVP (ORCA)",
                                                  workers=1, progress=False, force=out.exists()))
        acac[n] = out
    tmp = subsets_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, subsets_file)
    return ExperimentData(demo_dir, bpa_dir, acac, subsets_file)


# --------------------------------------------------------------------------------------------------
# the runs


@dataclass
class RunSpec:
    name: str
    stage: str                      # "pretrain" | "finetune" | "scratch"
    variant: str                    # pre-training variant ("scratch" for scratch runs)
    size: Optional[int]             # acac training structures (None for pre-training)
    run_dir: Path
    argv: list[str]                 # without the launcher's port
    slots: int
    depends: list[str] = field(default_factory=list)
    seed: Optional[int] = None      # set for the extra-seed controls (the configs' seed otherwise)


def _pretrain_datasets(cfg: ExperimentConfig, data: ExperimentData, variant: PretrainVariant) -> list[dict]:
    """The pre-training config's dataset list with this experiment's paths, minus dropped sets."""
    from lamm_ds.engine.config import load_config

    base = load_config([str(_config_path(cfg.pretrain_config))], [f"data.demo_dir={data.demo_dir}",
                                                           *cfg.pretrain_overrides])
    names = [d.name for d in base.data.datasets]
    unknown = set(variant.drop_datasets) - set(names)
    if unknown:
        raise ExperimentError(f"variant {variant.name!r} drops {sorted(unknown)}, not in the pre-training "
                              f"datasets {names}")
    out = []
    for d in base.data.datasets:
        if d.name in variant.drop_datasets:
            continue
        path = str(data.bpa_dir) if d.name == "3bpa" else d.path
        out.append({"name": d.name, "path": path})
    return out


def plan_runs(cfg: ExperimentConfig, data: ExperimentData) -> list[RunSpec]:
    """Pre-training, scratch and fine-tuning runs with their commands, in a useful start order."""
    out = _path(cfg.out_dir)
    variants = cfg.variants
    pre_script, ft_script = str(REPO_ROOT / "launch" / "pretrain.py"), str(REPO_ROOT / "launch" / "finetune.py")
    pretrains, scratch, main_ft, ablation_ft, seeds = [], [], [], [], []
    for v in variants:
        run_dir = out / f"pretrain_{v.name}"
        datasets = json.dumps(_pretrain_datasets(cfg, data, v))
        argv = [pre_script, "--config", str(_config_path(cfg.pretrain_config)), "--run-dir", str(run_dir), "--quiet",
                f"data.demo_dir={data.demo_dir}", f"data.datasets={datasets}", *cfg.pretrain_overrides,
                *v.overrides]
        pretrains.append(RunSpec(run_dir.name, "pretrain", v.name, None, run_dir, argv, min(cfg.ranks,
                                                                                          cfg.parallel)))
    shared = _path(cfg.shared_data)
    tests = [{"name": name, "path": str(shared / f), "head": "acac"}
             for name, f in zip(cfg.test_set_names, cfg.test_files)]
    ft_config = ["--config", str(_config_path(cfg.finetune_config)), "--quiet"]
    for n in sorted(cfg.sizes):
        # options first: the launch scripts take every argument after the first override as one
        ft_overrides = [f"eval_datasets={json.dumps(tests)}", f"data.datasets.0.path={data.acac[n]}",
                        *cfg.finetune_overrides]
        run_dir = out / f"scratch_n{n}"
        scratch.append(RunSpec(run_dir.name, "scratch", "scratch", n, run_dir,
                               [pre_script, *ft_config, "--run-dir", str(run_dir), *ft_overrides], 1))
        for k, v in enumerate(variants):
            if k > 0 and n not in cfg.ablation_sizes:
                continue
            run_dir = out / f"finetune_{v.name}_n{n}"
            model = out / f"pretrain_{v.name}" / "model.safetensors"
            spec = RunSpec(run_dir.name, "finetune", v.name, n, run_dir,
                           [ft_script, "--init", str(model), *ft_config, "--run-dir", str(run_dir),
                            *ft_overrides], 1, depends=[f"pretrain_{v.name}"])
            (main_ft if k == 0 else ablation_ft).append(spec)
        if n in cfg.seed_sizes:
            for seed in cfg.extra_seeds:
                for spec in (scratch[-1], main_ft[-1]):
                    run_dir = out / f"{spec.name}_seed{seed}"
                    argv = [str(run_dir) if a == str(spec.run_dir) else a for a in spec.argv]
                    seeds.append(RunSpec(run_dir.name, spec.stage, spec.variant, n, run_dir,
                                         [*argv, f"seed={seed}"], 1, list(spec.depends), seed))
    # Main pre-training first, then its fine-tunes and the scratch runs, then the ablations.
    return [pretrains[0], *scratch, *main_ft, *pretrains[1:], *ablation_ft, *seeds]

