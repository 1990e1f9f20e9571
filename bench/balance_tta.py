"""Time to accuracy of the batch schedulers at 64 virtual ranks: LaMM-S trained on the benchmark
mixture with each strategy to equal samples, validation curves combined with the replay's measured
step times.

Training (the engine itself): ``launch/pretrain.py --config configs/balance_lamm_s.yaml`` + the
mixture's datasets (bench/_mixture.py), one run per (strategy, seed), only ``schedule.*`` and the
seeds differing. ``schedule.plan_ranks=P`` (default 64) plans every step for P ranks while 1 (or
``--processes``) real processes run it: a real rank runs its P/world plan slots concatenated, and
the loss's global normalisation makes the step's gradient the exact global mean, so each step's
composition and gradient are those of a P-rank run (tests/test_scheduler.py checks this at P = 2).
The global batch is ``P x --per-rank`` draws. Every ``--eval-every`` steps (a multiple of
``--window-steps``) the run evaluates the held-out structures of every labelled set of the mixture
(``eval_datasets``, engine's ``eval_curve.jsonl``). At those points every strategy has consumed
exactly the same draws of the stream (whole windows; budget/max_atoms vary the draws per step, not
per window), so the curves compare error against equal samples seen.

Validation error = the mean over the held-out sets of their force MAE (eV/Å; energy-only sets left
out), and likewise energy MAE per atom; per strategy the mean over seeds at each point.
Target = ``fixed``'s final validation force error (mean over seeds). Per strategy:
  samples_to_target  first point where its mean curve reaches the target, interpolated linearly in
                     samples between evaluation points (None: not reached)
  wall_to_target_s   samples_to_target / batch x the replay's measured mean step time of that strategy
                     at P ranks x per-rank (bench/results/balance_replay.json, model painn: run
                     bench/balance_replay.py first)
  <s>_vs_fixed_time_to_accuracy = fixed's wall time for all its steps / <s>'s wall_to_target_s

Finished runs (same command, summary present) are reused, so an interrupted driver continues.

    .venv/bin/python bench/balance_tta.py --quick        # smoke test (tiny: 4 virtual ranks, 4 steps, 1 seed)
    .venv/bin/python bench/balance_tta.py                # 5 strategies x 3 seeds x 320 steps (see docs)
    .venv/bin/python bench/balance_tta.py --reanalyse bench/results/balance_tta.json   # new replay, no training

``--reanalyse`` recomputes a finished result's time-to-accuracy from its stored mean curves with the
step times of the current replay result (e.g. one that timed strategies the first one did not);
``<s>_vs_fixed_throughput`` is the replay's step-time ratio that figure rests on.

The last stdout line is one JSON object, ratios first, also written to bench/results/balance_tta.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _common import REPO, RESULTS, LAUNCHER_ENV, machine, write_result
from _mixture import MIXTURES, build_mixture
from _models import CONFIG

sys.path.insert(0, str(REPO))

from lamm_ds.experiments.pretrain_finetune.run import _finished  # noqa: E402

STRATEGIES = ("fixed", "balanced", "balanced_cp", "budget", "max_atoms")
RUN_RECORD = "tta_run.json"


@dataclass
class Run:
    name: str
    strategy: str
    seed: int
    run_dir: Path
    argv: list[str]                      # after the launcher (python or deepspeed ...)
    processes: int = 1
    state: dict = field(default_factory=dict)


def schedule_overrides(label: str) -> list[str]:
    if label == "balanced_cp":
        return ["schedule.strategy=balanced", "schedule.composition_preserving=true"]
    return [f"schedule.strategy={label}"]


def plan_runs(args, overlay: Path, cost_model: str | None) -> list[Run]:
    batch = args.plan_ranks * args.per_rank
    runs = []
    for seed in args.seeds:
        for s in args.strategies:
            name = f"{s}_seed{seed}"
            run_dir = Path(args.out_dir) / name
            over = [f"seed={seed}", f"denoise.seed={seed}", f"data.batch_size={batch}",
                    f"schedule.plan_ranks={args.plan_ranks}", f"schedule.window_steps={args.window_steps}",
                    *schedule_overrides(s), f"eval_every={args.eval_every}",
                    f"eval_max_structures={args.eval_max_structures}", f"log_every={args.eval_every}",
                    *([f"schedule.cost_model={cost_model}"] if cost_model else []), *args.overrides]
            argv = [str(REPO / "launch" / "pretrain.py"), "--config", str(CONFIG), "--config", str(overlay),
                    "--run-dir", str(run_dir), "--quiet", "--max-steps", str(args.steps), *over]
            runs.append(Run(name, s, seed, run_dir, argv, args.processes))
    return runs


# ------------------------------------------------------------------------------------ execution
def finished(run: Run) -> bool:
    return _finished(run, RUN_RECORD)  # the experiment driver's reuse rule, with this bench's record


def child_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    return env


def launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    from lamm_ds.engine.distributed import free_port

    exe = Path(sys.executable).parent / "deepspeed"
    found = str(exe) if exe.exists() else shutil.which("deepspeed")
    if found is None:
        raise SystemExit("the `deepspeed` launcher is not on PATH nor beside this Python")
    return [found, "--num_gpus", str(processes), "--master_port", str(free_port())]


def execute(runs: list[Run], parallel: int, threads: int) -> None:
    """Run what is not finished, at most ``parallel`` processes busy; failures recorded per run."""
    pending = []
    for r in runs:
        if finished(r):
            r.state = {"state": "done", "reused": True, **json.loads((r.run_dir / RUN_RECORD).read_text())}
        else:
            pending.append(r)
    print(f"{len(runs)} runs: {len(runs) - len(pending)} reused, {len(pending)} to run", file=sys.stderr, flush=True)
    running: list[tuple[Run, subprocess.Popen, object, float]] = []
    free = parallel
    try:
        while pending or running:
            for r in list(pending):
                if r.processes > free and running:
                    break
                if r.run_dir.exists():
                    shutil.rmtree(r.run_dir)
                r.run_dir.mkdir(parents=True)
                cmd = launcher(r.processes) + r.argv
                fh = open(r.run_dir / "log.txt", "w")
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=child_env(threads), start_new_session=True)
                running.append((r, proc, fh, time.perf_counter()))
                free -= r.processes
                pending.remove(r)
                print(f"[{time.strftime('%H:%M:%S')}] started {r.name}", file=sys.stderr, flush=True)
            time.sleep(0.5)
            for item in list(running):
                r, proc, fh, t0 = item
                rc = proc.poll()
                if rc is None:
                    continue
                fh.close()
                running.remove(item)
                free += r.processes
                wall = time.perf_counter() - t0
                if rc == 0 and (r.run_dir / "summary.json").is_file():
                    rec = {"argv": r.argv, "wall_s": wall, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
                    (r.run_dir / RUN_RECORD).write_text(json.dumps(rec))
                    r.state = {"state": "done", "reused": False, **rec}
                    print(f"[{time.strftime('%H:%M:%S')}] finished {r.name} in {wall:.0f} s", file=sys.stderr, flush=True)
                else:
                    tail = (r.run_dir / "log.txt").read_text(errors="replace").splitlines()[-12:]
                    r.state = {"state": "failed", "rc": rc, "wall_s": wall, "log": str(r.run_dir / "log.txt"),
                               "tail": tail}
                    print(f"FAILED {r.name} (exit {rc}); log: {r.run_dir / 'log.txt'}", file=sys.stderr, flush=True)
    except BaseException:
        for r, proc, fh, _ in running:  # never leave training processes behind
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for r, proc, fh, _ in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            fh.close()
        raise


# ------------------------------------------------------------------------------------ analysis
def curve_of(run_dir: Path) -> dict:
    """{step: (mean force MAE over sets with forces, mean energy MAE/atom over sets with energies)}."""
    from lamm_ds.engine.evaluate import read_curve

    out = {}
    for point in read_curve(run_dir / "eval_curve.jsonl"):
        sets = [v for k, v in point.items() if k != "step" and isinstance(v, dict)]
        f = [v["forces_mae"] for v in sets if v.get("force_labelled")]
        e = [v["energy_mae_per_atom"] for v in sets if v.get("energy_labelled")]
        out[int(point["step"])] = (float(np.mean(f)) if f else float("nan"), float(np.mean(e)) if e else float("nan"))
    return out


def samples_to_reach(samples: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """Samples at which the curve first reaches ``target``, linear between evaluation points."""
    for j, v in enumerate(values):
        if v <= target:
            if j == 0:
                return float(samples[0])
            s0, s1, v0 = samples[j - 1], samples[j], values[j - 1]
            return float(s0 + (s1 - s0) * (v0 - target) / (v0 - v))
    return None


def replay_step_times(path: Path, key: str) -> tuple[dict, str | None]:
    if not path.is_file():
        return {}, f"{path} not found: run bench/balance_replay.py --model painn first"
    sec = json.loads(path.read_text()).get("models", {}).get("painn")
    if not sec or key not in sec.get("configs", {}):
        return {}, f"{path} has no painn measurement at {key}: run bench/balance_replay.py with those ranks/per-rank"
    return {s: v["step_s_mean"] for s, v in sec["configs"][key]["strategies"].items()}, None


def time_to_accuracy(mean_curve: dict, samples: np.ndarray, batch: int, step_s: dict) -> dict:
    """The ratios and per-strategy reach against ``fixed``'s final errors (see the module docstring)."""
    result: dict = {}
    if "fixed" not in mean_curve or not len(samples):
        return result
    target = mean_curve["fixed"]["force_mae"][-1]
    e_target = mean_curve["fixed"]["energy_mae_per_atom"][-1]
    fixed_wall = (samples[-1] / batch) * step_s["fixed"] if "fixed" in step_s else None
    reach = {}
    for s, c in mean_curve.items():
        n = samples_to_reach(samples, np.array(c["force_mae"]), target)
        ne = samples_to_reach(samples, np.array(c["energy_mae_per_atom"]), e_target)
        wall = None if n is None or s not in step_s else n / batch * step_s[s]
        reach[s] = {"samples_to_target": n, "samples_to_energy_target": ne, "wall_to_target_s": wall,
                    "step_s_replay": step_s.get(s)}
        if s != "fixed":
            result[f"{s}_vs_fixed_time_to_accuracy"] = round(fixed_wall / wall, 3) if wall and fixed_wall else None
            result[f"{s}_vs_fixed_throughput"] = (round(step_s["fixed"] / step_s[s], 3)
                                                   if "fixed" in step_s and s in step_s else None)
    for s, c in mean_curve.items():
        if s != "fixed":
            result[f"{s}_vs_fixed_final_force_mae_ratio"] = round(c["force_mae"][-1] / target, 4)
            result[f"{s}_vs_fixed_final_energy_mae_ratio"] = round(c["energy_mae_per_atom"][-1] / e_target, 4)
            n = reach[s]["samples_to_target"]
            result[f"{s}_vs_fixed_samples_to_target_ratio"] = None if n is None else round(n / samples[-1], 4)
    result.update({"target_force_mae": target, "target_energy_mae_per_atom": e_target,
                   "fixed_wall_s_at_replay_step_time": fixed_wall, "reach": reach})
    return result


def reanalyse(result_path: Path, replay: Path, out: Path) -> dict:
    """A finished result's curves against the replay's current step times (no training): for a replay
    measured after the runs, e.g. with strategies the first replay did not time."""
    old = json.loads(result_path.read_text())
    setup = old["setup"]
    batch = setup["plan_ranks"] * setup["per_rank"]
    key = f"r{setup['plan_ranks']}_m{setup['per_rank']}"
    step_s, note = replay_step_times(replay, key)
    res = time_to_accuracy(old["curves"], np.array(old["samples"], dtype=np.float64), batch, step_s)
    kept = {k: v for k, v in old.items() if k not in res and not k.endswith(("_ratio", "_accuracy", "_throughput"))}
    result = {**{k: v for k, v in res.items() if k.endswith(("_ratio", "_accuracy", "_throughput"))},
              **{k: v for k, v in res.items() if not k.endswith(("_ratio", "_accuracy", "_throughput"))},
              **kept, "replay_note": note, "replay_key": key, "replay_step_s": step_s,
              "reanalysed": {"from": str(result_path), "replay": str(replay), "replay_machine":
                             (json.loads(replay.read_text()).get("machine") if replay.is_file() else None)}}
    write_result(result, out)
    return result


def analyse(args, runs: list[Run], replay: Path) -> dict:
    batch = args.plan_ranks * args.per_rank
    curves = {}
    for r in runs:
        if r.state.get("state") == "done":
            curves.setdefault(r.strategy, {})[r.seed] = curve_of(r.run_dir)
    steps = sorted(set.intersection(*(set(c) for by in curves.values() for c in by.values()))) if curves else []
    samples = np.array(steps, dtype=np.float64) * batch  # at window boundaries: exactly, for every strategy
    mean_curve, per_seed_final = {}, {}
    for s, by in curves.items():
        f = np.array([[by[seed][t][0] for t in steps] for seed in sorted(by)])
        e = np.array([[by[seed][t][1] for t in steps] for seed in sorted(by)])
        mean_curve[s] = {"force_mae": f.mean(0).tolist(), "energy_mae_per_atom": e.mean(0).tolist(),
                         "force_mae_min": f.min(0).tolist(), "force_mae_max": f.max(0).tolist(),
                         "seeds": sorted(by)}
        per_seed_final[s] = {"force_mae": f[:, -1].tolist(), "energy_mae_per_atom": e[:, -1].tolist()}
    key = f"r{args.plan_ranks}_m{args.per_rank}"
    step_s, note = replay_step_times(replay, key)
    result = time_to_accuracy(mean_curve, samples, batch, step_s)
    result.update({"replay_note": note, "replay_key": key, "replay_step_s": step_s,
                   "eval_steps": steps, "samples": samples.tolist(), "curves": mean_curve,
                   "final_per_seed": per_seed_final})
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixture", choices=MIXTURES, default="auto", help="see bench/_mixture.py")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--plan-ranks", type=int, default=64, help="virtual ranks each step is planned for")
    ap.add_argument("--per-rank", type=int, default=2, help="samples per virtual rank (batch = plan_ranks x per_rank)")
    ap.add_argument("--steps", type=int, default=320)
    ap.add_argument("--window-steps", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=32, help="a multiple of --window-steps")
    ap.add_argument("--eval-max-structures", type=int, default=0, help="per held-out set (0: all)")
    ap.add_argument("--processes", type=int, default=1, help="real ranks per run (1 or 2 here)")
    ap.add_argument("--parallel", type=int, default=2, help="processes busy at a time")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    ap.add_argument("--cost-model", default="replay",
                    help="replay (the replay's calibration file, else auto), auto, builtin:NAME or a file")
    ap.add_argument("--replay", default=None, help="replay result (default bench/results/balance_replay.json)")
    ap.add_argument("--out-dir", default=str(REPO / "runs" / "balance_tta"))
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/balance_tta.json)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 4 virtual ranks x 2, 4 steps, windows of 2, 1 seed, 5 held-out structures per set")
    ap.add_argument("--reanalyse", metavar="RESULT_JSON",
                    help="no training: recompute a finished result's time-to-accuracy with the replay's current step times")
    ap.add_argument("overrides", nargs="*", help="run-config overrides for every run")
    args = ap.parse_args(argv)
    if args.reanalyse:
        replay = Path(args.replay) if args.replay else RESULTS / "balance_replay.json"
        for path, what in ((Path(args.reanalyse), "--reanalyse result"), (replay, "replay result")):
            if not path.is_file():
                ap.error(f"{what} {path}: no such file")
        try:
            reanalyse(Path(args.reanalyse), replay, Path(args.out) if args.out else RESULTS / "balance_tta.json")
        except (ValueError, KeyError) as exc:  # not JSON, or not a balance_tta / balance_replay result
            ap.error(f"{args.reanalyse} with {replay}: not a finished time-to-accuracy result and a replay "
                     f"result ({type(exc).__name__}: {exc})")
        return 0
    if args.quick:
        args.plan_ranks, args.per_rank, args.steps, args.window_steps, args.eval_every = 4, 2, 4, 2, 2
        args.seeds, args.eval_max_structures = args.seeds[:1], 5
        args.overrides = ["data.stats_samples=50", "optim.warmup_steps=1", *args.overrides]
        args.out_dir = str(Path(args.out_dir).with_name(Path(args.out_dir).name + "_quick"))
    if args.eval_every % args.window_steps or args.steps % args.eval_every:
        ap.error("--eval-every must be a multiple of --window-steps and divide --steps (equal samples at every point)")
    if args.plan_ranks % args.processes:
        ap.error("--plan-ranks must be a multiple of --processes")
    t0 = time.perf_counter()
    replay = Path(args.replay) if args.replay else RESULTS / ("balance_replay_quick.json" if args.quick
                                                              else "balance_replay.json")
    out = Path(args.out) if args.out else RESULTS / ("balance_tta_quick.json" if args.quick else "balance_tta.json")
    mixture = build_mixture(args.mixture)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay = out_dir / "mixture.yaml"
    if not overlay.is_file() or overlay.read_text() != mixture.config_yaml():
        overlay.write_text(mixture.config_yaml())
    cost = args.cost_model
    if cost == "replay":
        cal = None
        if replay.is_file():
            cal = (json.loads(replay.read_text()).get("models", {}).get("painn") or {}).get("calibration")
        cost = cal["file"] if cal and Path(cal["file"]).is_file() else None
    elif cost == "auto":
        cost = None
    runs = plan_runs(args, overlay, cost)
    execute(runs, args.parallel, args.threads)
    res = analyse(args, runs, replay)
    failed = {r.name: r.state for r in runs if r.state.get("state") != "done"}
    result = {**{k: v for k, v in res.items() if k.endswith(("_ratio", "_accuracy", "_throughput"))},
              **{k: v for k, v in res.items() if not k.endswith(("_ratio", "_accuracy", "_throughput"))},
              "runs": {r.name: {"strategy": r.strategy, "seed": r.seed, "run_dir": str(r.run_dir),
                                "wall_s": r.state.get("wall_s"), "reused": r.state.get("reused"),
                                "state": r.state.get("state")} for r in runs},
              "failed": failed,
              "setup": {"mixture": mixture.name, "mixture_sizes": mixture.sizes, "strategies": args.strategies,
                        "seeds": args.seeds, "plan_ranks": args.plan_ranks, "per_rank": args.per_rank,
                        "batch_size": args.plan_ranks * args.per_rank, "steps": args.steps,
                        "window_steps": args.window_steps, "eval_every": args.eval_every,
                        "eval_max_structures": args.eval_max_structures, "processes": args.processes,
                        "cost_model": cost or "auto", "config": str(CONFIG.relative_to(REPO)),
                        "overrides": args.overrides, "replay": str(replay)},
              "cpu_s_runs": round(sum((r.state.get("wall_s") or 0) * r.processes * args.threads for r in runs), 1),
              "machine": machine(threads=args.threads), "wall_s": round(time.perf_counter() - t0, 1)}
    write_result(result, out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
