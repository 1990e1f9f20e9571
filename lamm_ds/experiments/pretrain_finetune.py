"""The end-to-end LaMM experiment: pre-train on a joint mixture, then fine-tune vs train from scratch.

One call of :func:`run_experiment` (``bench/pretrain_finetune.py``) does, from a clean checkout:

1. data: the embedded demo sets (generated), 3BPA ingested from ``<shared_data>/3bpa``, and nested
   random subsets of ``<shared_data>/acac/train_300K.xyz`` (e.g. 50 ⊂ 100 ⊂ 500 structures), each
   ingested as its own dataset (``subsets.json`` records the chosen frame indices);
2. pre-training of every variant (the main one and the ablations) under the DeepSpeed launcher on
   ``ranks`` processes (``launch/pretrain.py``);
3. for every subset size: training from scratch (``launch/pretrain.py``) and fine-tuning each
   pre-trained model (``launch/finetune.py``) with one shared config, i.e. the same steps, batch,
   optimiser and evaluation, several processes at once;
4. collection: final errors on the full test sets, learning curves (``eval_curve.jsonl``), the steps
   each fine-tune needs to reach the scratch model's final force error, plots and a Markdown report.

Every run is an ordinary engine run with its own directory (config, ``metrics.jsonl``, TensorBoard
``tb/``, ``summary.json``, ``model.safetensors``, ``log.txt``); a run whose directory already holds
a finished result for the same command is not repeated, so an interrupted experiment resumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger("lamm_ds")
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_RECORD = "experiment_run.json"
# Launcher variables of an enclosing process group must not leak into the runs we start.
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


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


def _launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    exe = Path(sys.executable).parent / "deepspeed"
    found = str(exe) if exe.exists() else shutil.which("deepspeed")
    if found is None:
        raise ExperimentError("the `deepspeed` launcher is not on PATH nor beside this Python")
    return [found, "--num_gpus", str(ranks)]


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


def _finished(spec: RunSpec) -> bool:
    record = spec.run_dir / RUN_RECORD
    if not (record.is_file() and (spec.run_dir / "summary.json").is_file()):
        return False
    try:
        return json.loads(record.read_text()).get("argv") == spec.argv
    except json.JSONDecodeError:
        return False


def _child_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


@dataclass
class _Running:
    spec: RunSpec
    proc: subprocess.Popen
    log_file: object
    start: float


def execute(runs: list[RunSpec], cfg: ExperimentConfig, progress: bool = True) -> dict[str, dict]:
    """Run every spec (dependencies first, at most ``cfg.parallel`` slots busy); returns per-run status.

    Finished runs (same command, summary present) are kept; unfinished run directories are cleared
    and started again. A failed run's dependants are skipped, the others go on; the failures are
    raised together at the end, naming each run and its log.
    """
    status: dict[str, dict] = {}
    pending = []
    for spec in runs:
        if _finished(spec):
            rec = json.loads((spec.run_dir / RUN_RECORD).read_text())
            status[spec.name] = {"state": "done", "wall_s": rec.get("wall_s"), "reused": True}
        else:
            pending.append(spec)
    running: list[_Running] = []
    free = cfg.parallel

    def say(msg: str) -> None:
        if progress:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    try:
        while pending or running:
            for spec in list(pending):
                deps = [status.get(d, {}).get("state") for d in spec.depends]
                if any(s in ("failed", "skipped") for s in deps):
                    status[spec.name] = {"state": "skipped", "why": f"depends on failed {spec.depends}"}
                    pending.remove(spec)
                    continue
                if all(s == "done" for s in deps) and spec.slots <= free:
                    if spec.run_dir.exists():
                        shutil.rmtree(spec.run_dir)
                    spec.run_dir.mkdir(parents=True)
                    argv = [*_launcher(spec.slots)]
                    if spec.slots > 1:
                        from lamm_ds.engine.ds_engine import free_port

                        argv += ["--master_port", str(free_port())]
                    fh = open(spec.run_dir / "log.txt", "w")
                    fh.write("$ " + " ".join(argv + spec.argv) + "\n")
                    fh.flush()
                    proc = subprocess.Popen(argv + spec.argv, cwd=str(REPO_ROOT), stdout=fh, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=_child_env(cfg.threads_per_process),
                                            start_new_session=True)
                    running.append(_Running(spec, proc, fh, time.perf_counter()))
                    free -= spec.slots
                    pending.remove(spec)
                    say(f"started {spec.name} ({spec.slots} process{'es' if spec.slots > 1 else ''})")
            if not running:
                if pending:  # nothing can start: only possible with an unknown dependency
                    raise ExperimentError(f"runs {[s.name for s in pending]} wait on unknown runs")
                break
            time.sleep(0.5)
            for r in list(running):
                rc = r.proc.poll()
                if rc is None:
                    continue
                r.log_file.close()
                wall = time.perf_counter() - r.start
                running.remove(r)
                free += r.spec.slots
                if rc == 0 and (r.spec.run_dir / "summary.json").is_file():
                    (r.spec.run_dir / RUN_RECORD).write_text(json.dumps(
                        {"argv": r.spec.argv, "wall_s": wall, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))
                    status[r.spec.name] = {"state": "done", "wall_s": wall, "reused": False}
                    say(f"finished {r.spec.name} in {wall:.0f} s")
                else:
                    tail = (r.spec.run_dir / "log.txt").read_text(errors="replace").splitlines()[-15:]
                    status[r.spec.name] = {"state": "failed", "rc": rc, "wall_s": wall,
                                           "log": str(r.spec.run_dir / "log.txt"), "tail": tail}
                    say(f"FAILED {r.spec.name} (exit {rc}); log: {r.spec.run_dir / 'log.txt'}")
    except BaseException:
        for r in running:  # never leave ranks behind
            try:
                os.killpg(r.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for r in running:
            try:
                r.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(r.proc.pid, signal.SIGKILL)
            r.log_file.close()
        raise
    return status


# --------------------------------------------------------------------------------------------------
# results


def _curve(run_dir: Path, sets: list[str]) -> dict:
    from lamm_ds.engine.evaluate import read_curve

    path = run_dir / "eval_curve.jsonl"
    if not path.is_file():
        return {}
    points = read_curve(path)
    curve = {"steps": [p["step"] for p in points]}
    for name in sets:
        if all(name in p for p in points):
            curve[name] = {k: [p[name][k] for p in points] for k in ("forces_mae", "energy_mae_per_atom")}
    return curve


def probe_pretrained(cfg: ExperimentConfig, run_dir: Path) -> dict:
    """Errors of a pre-trained model on ``cfg.probe_sets`` (cached in ``probe.json`` beside the model)."""
    from lamm_ds.engine.evaluate import evaluate, load_structures
    from lamm_ds.engine.export import load_model

    model_file = run_dir / "model.safetensors"
    cache = run_dir / "probe.json"
    stamp = {"model_mtime_ns": model_file.stat().st_mtime_ns, "sets": cfg.probe_sets}
    if cache.is_file():
        old = json.loads(cache.read_text())
        if old.get("stamp") == stamp:
            return old["results"]
    model = load_model(model_file)
    results = {}
    for probe in cfg.probe_sets:
        path = probe["path"]
        path = _path(cfg.data_dir) / path[len("@data/"):] if path.startswith("@data/") else _path(cfg.shared_data) / path
        if probe["head"] not in model.dataset_names:
            continue  # e.g. a variant pre-trained without that dataset
        _, structures = load_structures(path)
        results[probe["name"]] = evaluate(model, structures, head=probe["head"], batch_size=32)
    cache.write_text(json.dumps({"stamp": stamp, "results": results}))
    return results


def steps_to_reach(steps: list[int], values: list[float], target: float) -> Optional[int]:
    """First evaluated step whose value is at or below ``target`` (None: never reached)."""
    for s, v in zip(steps, values):
        if v <= target:
            return int(s)
    return None


def collect(cfg: ExperimentConfig, runs: list[RunSpec], status: dict[str, dict]) -> dict:
    """Final errors, curves, steps-to-reach and timings of every finished run."""
    sets = cfg.curve_sets
    res: dict = {"sizes": sorted(cfg.sizes), "variants": [asdict(v) for v in cfg.variants],
                 "target_set": cfg.target_set, "pretrain": {}, "runs": {}, "status": status}
    for spec in runs:
        if status.get(spec.name, {}).get("state") != "done":
            continue
        summary = json.loads((spec.run_dir / "summary.json").read_text())
        entry = {"stage": spec.stage, "variant": spec.variant, "size": spec.size, "seed": spec.seed,
                 "wall_s": status[spec.name].get("wall_s"), "steps": summary["steps"],
                 "world_size": summary["world_size"], "final": summary.get("evaluation", {}),
                 "run_dir": str(spec.run_dir)}
        hist = summary.get("history") or []
        if hist:
            entry["first_loss"], entry["last_loss"] = hist[0]["loss"], hist[-1]["loss"]
            entry["last_record"] = {k: v for k, v in hist[-1].items() if k.startswith("dataset/")
                                    or k in ("loss", "imbalance", "predicted_imbalance", "busy_imbalance")}
        if spec.stage == "pretrain":
            entry["probe"] = probe_pretrained(cfg, spec.run_dir)
            for key in ("imbalance", "busy_imbalance", "predicted_imbalance"):
                vals = [h[key] for h in hist if h.get(key) is not None]
                entry[f"mean_{key}"] = float(np.mean(vals)) if vals else None
            res["pretrain"][spec.variant] = entry
        else:
            entry["curve"] = _curve(spec.run_dir, sets)
            res["runs"][spec.name] = entry
    # Steps each run needs to reach the scratch model's final force error (same size, same curve set).
    reach: dict = {}
    for name, r in res["runs"].items():
        suffix = "" if r["seed"] is None else f"_seed{r['seed']}"
        scratch = res["runs"].get(f"scratch_n{r['size']}{suffix}")  # same size and seed
        if not scratch or cfg.target_set not in scratch.get("curve", {}) or cfg.target_set not in r.get("curve", {}):
            continue
        target = scratch["curve"][cfg.target_set]["forces_mae"][-1]
        s = steps_to_reach(r["curve"]["steps"], r["curve"][cfg.target_set]["forces_mae"], target)
        r["steps_to_scratch_final"] = s
        r["scratch_final_forces_mae"] = target
        if r["seed"] is None:
            reach.setdefault(r["variant"], {})[str(r["size"])] = s
    res["steps_to_scratch_final"] = reach
    return res


def headline(res: dict, main: str) -> dict:
    """Ratios first (pre-trained / scratch errors on the full test sets; step speed-ups), then the rest."""
    ratios, speed, absolute = {}, {}, {}
    for n in res["sizes"]:
        scratch, pre = res["runs"].get(f"scratch_n{n}"), res["runs"].get(f"finetune_{main}_n{n}")
        if not scratch or not pre:
            continue
        for set_name in scratch["final"]:
            short = set_name.replace("acac_test_MD_", "")
            for metric, key in (("forces_mae", "force_mae"), ("energy_mae_per_atom", "energy_mae")):
                a, b = pre["final"][set_name][metric], scratch["final"][set_name][metric]
                ratios[f"{key}_ratio_{short}_n{n}"] = round(a / b, 4) if b else None
                absolute[f"{key}_{short}_n{n}_pretrained_meV"] = round(1000 * a, 3)
                absolute[f"{key}_{short}_n{n}_scratch_meV"] = round(1000 * b, 3)
        s = pre.get("steps_to_scratch_final")
        total = scratch["steps"]
        # s == 0: the pre-trained model starts below scratch's final error (no finite speed-up)
        speed[f"steps_speedup_n{n}"] = round(total / s, 3) if s else None
        absolute[f"steps_to_scratch_final_n{n}"] = s
    return {**ratios, **speed, **absolute}


def _label(variant: str, cfg_variants: list[dict]) -> str:
    for v in cfg_variants:
        if v["name"] == variant and v.get("description"):
            return f"{variant}: {v['description']}"
    return variant


def plot_curves(res: dict, out_dir: Path, main: str) -> list[Path]:
    """Learning curves against fine-tuning steps: force and energy MAE of scratch vs the main
    pre-trained model (extra seeds as thin lines), and the force MAE of every pre-training variant."""
    seeds = sorted({r["seed"] for r in res["runs"].values() if r.get("seed") is not None})
    variants = [v["name"] for v in res["variants"]]
    figures = [("forces_mae", "force MAE (meV/Å)", "learning_curves_forces.png", ["scratch", main], seeds),
               ("energy_mae_per_atom", "energy MAE (meV/atom)", "learning_curves_energy.png", ["scratch", main], seeds)]
    if len(variants) > 1:
        figures.append(("forces_mae", "force MAE (meV/Å)", "ablation_curves_forces.png", ["scratch", *variants], []))
    return [p for p in (_curve_figure(res, out_dir / f, m, label, names, s) for m, label, f, names, s in figures)
            if p is not None]


def _curve_figure(res: dict, path: Path, metric: str, label: str, names: list[str], seeds: list[int]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = res["sizes"]
    sets = next((list(k for k in r["curve"] if k != "steps") for r in res["runs"].values() if r.get("curve")), [])
    if not sets:
        return None
    main = names[1] if len(names) > 1 else None
    fig, axes = plt.subplots(len(sets), len(sizes), figsize=(4.2 * len(sizes), 3.4 * len(sets)), squeeze=False,
                             sharey="row")
    for row, set_name in enumerate(sets):
        for col, n in enumerate(sizes):
            ax = axes[row][col]
            for k, name in enumerate(names):
                base = f"scratch_n{n}" if name == "scratch" else f"finetune_{name}_n{n}"
                color = "black" if name == "scratch" else f"C{k - 1}"
                for seed in [None, *seeds]:
                    r = res["runs"].get(base if seed is None else f"{base}_seed{seed}")
                    if not r or set_name not in r.get("curve", {}):
                        continue
                    y = 1000 * np.asarray(r["curve"][set_name][metric])
                    if seed is not None:  # seed controls: thin, unlabelled
                        ax.plot(r["curve"]["steps"], y, color=color, lw=0.7, alpha=0.5)
                        continue
                    ax.plot(r["curve"]["steps"], y, color=color, lw=2 if name in ("scratch", main) else 1.2,
                            ls="-" if name in ("scratch", main) else "--",
                            label="scratch" if name == "scratch" else f"pre-trained ({_label(name, res['variants'])})")
                    if name == "scratch" and metric == "forces_mae":
                        ax.axhline(y[-1], color="black", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_title(f"{set_name}, {n} training structures", fontsize=9)
            ax.set_xlabel("fine-tuning steps")
            if col == 0:
                ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if seeds:
        labels = [*labels, f"thin lines: fine-tuning seeds {', '.join(map(str, seeds))}"]
        handles = [*handles, plt.Line2D([], [], color="0.4", lw=0.7)]
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    rows = (len(labels) + 2) // 3
    fig.tight_layout(rect=(0, 0.03 + 0.035 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: Optional[float], scale: float = 1000.0, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{scale * x:.{digits}f}"


def report_markdown(res: dict, main: str) -> str:
    """Tables of the measured results (the reading is written by people, in docs/results.md)."""
    sets = []
    for r in res["runs"].values():
        sets = list(r["final"])
        if sets:
            break
    short = {k: k.replace("acac_test_MD_", "") for k in sets}
    runs = res["runs"]

    def run(variant: str, n: int, seed=None):
        base = f"scratch_n{n}" if variant == "scratch" else f"finetune_{variant}_n{n}"
        return runs.get(base if seed is None else f"{base}_seed{seed}")

    def reach(r) -> str:
        s = r.get("steps_to_scratch_final")
        return "not reached" if s is None else str(s)

    def who(v: str) -> str:
        return "scratch" if v == "scratch" else f"pre-trained: {v}"

    def error_cells(r) -> list[str]:
        return [_fmt(r["final"][k]["forces_mae"], digits=1) for k in sets] + \
               [_fmt(r["final"][k]["energy_mae_per_atom"]) for k in sets]

    lines = [f"### Pre-trained ({main}) vs scratch", "",
             "Force-component MAE (meV/Å) and energy MAE (meV/atom) on the full test sets after the last "
             "step; *steps* = first evaluated step (every `eval_every`) at which the run's force MAE on "
             f"{res['target_set']} is at or below the scratch run's final one (scratch: where it first gets there).",
             "", "| N | " + " | ".join(f"F MAE {short[k]}: scratch → pre-trained (ratio)" for k in sets) + " | " +
             " | ".join(f"E MAE {short[k]}: scratch → pre-trained (ratio)" for k in sets) +
             " | steps: scratch / pre-trained | speed-up |",
             "|---|" + "---|" * (2 * len(sets) + 2)]
    for n in res["sizes"]:
        a, b = run("scratch", n), run(main, n)
        if not a or not b:
            continue
        cells = []
        for metric, digits in (("forces_mae", 1), ("energy_mae_per_atom", 2)):
            for k in sets:
                x, y = a["final"][k][metric], b["final"][k][metric]
                cells.append(f"{_fmt(x, digits=digits)} → {_fmt(y, digits=digits)} ({y / x:.2f})")
        sa, sb = a.get("steps_to_scratch_final"), b.get("steps_to_scratch_final")
        speed = "—" if not sb or not sa else f"{sa / sb:.2f}×"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {reach(a)} / {reach(b)} | {speed} |")
    variants = [v["name"] for v in res["variants"]]
    if len(variants) > 1:
        lines += ["", "### Ablations (pre-training variants, same fine-tuning)", "",
                  "| N | pre-training | " + " | ".join(f"F MAE {short[k]}" for k in sets) + " | " +
                  " | ".join(f"E MAE {short[k]}" for k in sets) + f" | steps to scratch's final |",
                  "|---|---|" + "---|" * (2 * len(sets) + 1)]
        for n in res["sizes"]:
            if not any(run(w, n) for w in variants[1:]):
                continue
            for v in ["scratch", *variants]:
                r = run(v, n)
                if not r:
                    continue
                cells = error_cells(r)
                label = "none (scratch)" if v == "scratch" else f"{v}: {_label(v, res['variants']).split(': ', 1)[-1]}"
                lines.append(f"| {n} | {label} | " + " | ".join(cells) + f" | {reach(r)} |")
    seeded = sorted({(r["size"], r["seed"]) for r in runs.values() if r.get("seed") is not None})
    if seeded:
        lines += ["", "### Seed controls (fine-tuning seed: data order; scratch: also the initial weights)", "",
                  "| N | run | seed | " + " | ".join(f"F MAE {short[k]}" for k in sets) + " | " +
                  " | ".join(f"E MAE {short[k]}" for k in sets) + " |", "|---|---|---|" + "---|" * (2 * len(sets))]
        for n in sorted({n for n, _ in seeded}):
            for v in ("scratch", main):
                for seed in [None, *sorted(s for m, s in seeded if m == n)]:
                    r = run(v, n, seed)
                    if r:
                        lines.append(f"| {n} | {who(v)} | {'config' if seed is None else seed} | "
                                     + " | ".join(error_cells(r)) + " |")
        lines += ["", "Over the seeds (config seed and the extra ones): mean (min–max); *steps* against the "
                      "scratch run of the same seed.", "",
                  "| N | run | seeds | " + " | ".join(f"F MAE {short[k]}" for k in sets) + " | " +
                  " | ".join(f"E MAE {short[k]}" for k in sets) + " | steps to scratch's final |",
                  "|---|---|---|" + "---|" * (2 * len(sets) + 1)]
        for n in sorted({n for n, _ in seeded}):
            for v in ("scratch", main):
                group = [r for r in (run(v, n, seed) for seed in [None, *sorted(x for m, x in seeded if m == n)]) if r]
                cells = []
                for metric, digits in (("forces_mae", 1), ("energy_mae_per_atom", 2)):
                    for k in sets:
                        xs = [r["final"][k][metric] for r in group]
                        cells.append(f"{_fmt(float(np.mean(xs)), digits=digits)} ({_fmt(min(xs), digits=digits)}–"
                                     f"{_fmt(max(xs), digits=digits)})")
                steps = ", ".join(reach(r) for r in group)
                lines.append(f"| {n} | {who(v)} | {len(group)} | "
                             + " | ".join(cells) + f" | {steps} |")
    lines += ["", "### All final errors", "",
              "Energy MAE/RMSE per atom (meV/atom), force-component MAE/RMSE (meV/Å), after the last step.", "",
              "| N | run | test set | E MAE | E RMSE | F MAE | F RMSE | steps to scratch's final F MAE |",
              "|---|---|---|---|---|---|---|---|"]
    for n in res["sizes"]:
        for v in ["scratch", *variants]:
            r = run(v, n)
            if not r:
                continue
            for set_name, m in r["final"].items():
                lines.append(f"| {n} | {who(v)} | {set_name} | "
                             f"{_fmt(m['energy_mae_per_atom'])} | {_fmt(m['energy_rmse_per_atom'])} | "
                             f"{_fmt(m['forces_mae'], digits=1)} | {_fmt(m['forces_rmse'], digits=1)} | "
                             f"{reach(r) if set_name == res['target_set'] else '—'} |")
    lines += ["", "### Pre-training runs", "",
              "| variant | description | steps | ranks | wall (s) | first → last loss | demo_metals_test F MAE (meV/Å) "
              "| step-time imbalance (max/mean, mean over logged steps) |",
              "|---|---|---|---|---|---|---|---|"]
    for v in res["variants"]:
        p = res["pretrain"].get(v["name"])
        if not p:
            continue
        metals = p["final"].get("demo_metals_test", {}).get("forces_mae")
        lines.append(f"| {v['name']} | {v.get('description', '')} | {p['steps']} | {p['world_size']} | "
                     f"{p['wall_s']:.0f} | {p.get('first_loss', math.nan):.3f} → {p.get('last_loss', math.nan):.3f} | "
                     f"{_fmt(metals, digits=1)} | {_fmt(p.get('mean_imbalance'), scale=1.0, digits=3)} |")
    probes = sorted({k for p in res["pretrain"].values() for k in p.get("probe", {})})
    if probes:
        lines += ["", "### Pre-trained models on the probe sets, and what their fine-tunes reached", "",
                  "Force MAE (meV/Å) / energy MAE (meV/atom) of each pre-trained model (its own head) on "
                  f"the probe sets; then the {res['target_set']} force MAE of its fine-tune at each N.", "",
                  "| variant | " + " | ".join(probes) + " | " + " | ".join(f"fine-tune F MAE, N={n}" for n in res["sizes"])
                  + " |", "|---|" + "---|" * (len(probes) + len(res["sizes"]))]
        for v in res["variants"]:
            p = res["pretrain"].get(v["name"])
            if not p:
                continue
            cells = [f"{_fmt(p['probe'][k]['forces_mae'], digits=1)} / {_fmt(p['probe'][k]['energy_mae_per_atom'])}"
                     if k in p.get("probe", {}) else "—" for k in probes]
            for n in res["sizes"]:
                r = run(v["name"], n)
                cells.append(_fmt(r["final"][res["target_set"]]["forces_mae"], digits=1) if r else "—")
            lines.append(f"| {v['name']} | " + " | ".join(cells) + " |")
    walls = [r["wall_s"] for r in runs.values() if r.get("wall_s")]
    if walls:
        lines += ["", f"Fine-tune/scratch runs: {len(walls)}, {min(walls):.0f}–{max(walls):.0f} s each "
                      "(one process each, run side by side)."]
    if res.get("clean_total_wall_s"):
        lines.append(f"Whole experiment from a clean start (data, every run, collection): "
                     f"{res['clean_total_wall_s'] / 60:.1f} min wall.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------


def run_experiment(cfg: ExperimentConfig, include_ablations: bool = True, progress: bool = True,
                   publish: Optional[tuple[Path, Path]] = None) -> dict:
    """Data, runs, collection, plots and report; returns the results (also ``<out_dir>/results.json``).

    ``publish=(results_json, plot_dir)`` also copies the results and plots there (bench/results, docs).
    """
    t0 = time.perf_counter()
    if not include_ablations:
        cfg = _main_only(cfg)
    out = _path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(_experiment_yaml(cfg))
    data = prepare_data(cfg)
    runs = plan_runs(cfg, data)
    status = execute(runs, cfg, progress)
    res = collect(cfg, runs, status)
    res["total_wall_s"] = time.perf_counter() - t0
    # The wall time of an invocation that ran every run itself (nothing reused) is the cost of the
    # whole experiment from clean; later invocations that only reuse runs keep reporting it.
    clean = out / "clean_run_wall.json"
    if status and not any(v.get("reused") for v in status.values()) and \
            all(v["state"] == "done" for v in status.values()):
        clean.write_text(json.dumps({"wall_s": res["total_wall_s"], "runs": len(status),
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    if clean.is_file():
        res["clean_total_wall_s"] = json.loads(clean.read_text())["wall_s"]
    res["subsets_file"] = str(data.subsets_file)
    res["headline"] = headline(res, cfg.main)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    plots = plot_curves(res, out, cfg.main)
    (out / "report.md").write_text(report_markdown(res, cfg.main))
    failed = {k: v for k, v in status.items() if v["state"] != "done"}
    if failed:
        details = "; ".join(f"{k}: {v['state']}" + (f" (exit {v['rc']}, log {v['log']})" if "log" in v else "")
                            for k, v in failed.items())
        raise ExperimentError(f"{len(failed)} run(s) did not finish: {details}")
    if publish is not None:
        results_json, plot_dir = publish
        results_json.parent.mkdir(parents=True, exist_ok=True)
        plot_dir.mkdir(parents=True, exist_ok=True)
        for p in plots:
            shutil.copyfile(p, plot_dir / f"pretrain_finetune_{p.name}")
        shutil.copyfile(out / "report.md", results_json.with_suffix(".md"))
    return res


def _main_only(cfg: ExperimentConfig) -> ExperimentConfig:
    import copy

    c = copy.deepcopy(cfg)
    c.variants = c.variants[:1]
    return c


def _experiment_yaml(cfg: ExperimentConfig) -> str:
    from lamm_ds.engine.config import to_yaml

    return to_yaml(cfg)
