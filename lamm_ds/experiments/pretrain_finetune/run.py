"""Executing the runs: launcher commands, reuse of finished runs, at most ``parallel`` slots busy,
failures reported and their dependants skipped, children killed on interrupt; and
:func:`run_experiment`, the whole experiment (data, runs, collection, plots, report) in one call."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lamm_ds.engine.launcher_env import LAUNCHER_ENV
from lamm_ds.experiments.pretrain_finetune.config import (REPO_ROOT, ExperimentConfig, ExperimentError,
                                                          _experiment_yaml, _main_only, _path)
from lamm_ds.experiments.pretrain_finetune.plan import RunSpec, plan_runs, prepare_data
from lamm_ds.experiments.pretrain_finetune.plots import plot_curves
from lamm_ds.experiments.pretrain_finetune.report import collect, headline, report_markdown

RUN_RECORD = "experiment_run.json"
# Launcher variables of an enclosing process group must not leak into the runs we start.


def _launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    exe = Path(sys.executable).parent / "deepspeed"
    found = str(exe) if exe.exists() else shutil.which("deepspeed")
    if found is None:
        raise ExperimentError("the `deepspeed` launcher is not on PATH nor beside this Python")
    return [found, "--num_gpus", str(ranks)]


def _finished(spec: RunSpec, record_name: str = RUN_RECORD) -> bool:
    """A run with its summary and a record of the same command (``spec`` needs ``run_dir`` and ``argv``)."""
    record = spec.run_dir / record_name
    if not (record.is_file() and (spec.run_dir / "summary.json").is_file()):
        return False
    try:
        return json.loads(record.read_text()).get("argv") == spec.argv
    except json.JSONDecodeError:
        return False


def _child_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
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
                        from lamm_ds.engine.distributed import free_port

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


def run_experiment(cfg: ExperimentConfig, include_ablations: bool = True, progress: bool = True,
                   publish: Optional[tuple[Path, Path]] = None) -> dict:
    """Data, runs, collection, plots and report; returns the results (also ``<out_dir>/results.json``).

    ``publish=(results_json, plot_dir)`` also copies the report beside ``results_json`` and the plots
    to ``plot_dir`` as ``<cfg.name>_<plot>.png`` (bench/results, docs/img).
    """
    t0 = time.perf_counter()
    if not include_ablations:
        cfg = _main_only(cfg)
    out = _path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(_experiment_yaml(cfg))
    data = prepare_data(cfg, progress=progress)
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
            shutil.copyfile(p, plot_dir / f"{cfg.name}_{p.name}")
        shutil.copyfile(out / "report.md", results_json.with_suffix(".md"))
    return res
