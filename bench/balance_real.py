"""Measured 2-rank DeepSpeed training on this machine: fixed-count split vs atoms-only vs balanced.

Each run is ``torchrun --standalone --nproc_per_node 2 launch/pretrain.py`` with configs/demo.yaml
(LaMM-S demo PaiNN on the demo mixture: periodic EMT metal cells of 8-45 atoms, energy-only cells,
unlabelled molecules of 2-14 atoms), ZeRO stage 0, fp32, gloo, one thread per rank,
``log_every=1``, only ``schedule.strategy`` differing. Strategies alternate run by run (``--rounds``
times each, per batch size), so machine drift hits all of them alike.

Per run, after ``--warmup`` steps, from metrics.jsonl (the engine's own telemetry):
  step_s           mean over steps of the slowest rank's step time (t0 = batch in hand, to after
                   optimizer.step; data loading is outside it)
  samples_per_s    samples / sum of step times
  allreduce_frac   mean over ranks and steps of the time inside DeepSpeed's gradient all-reduce,
                   over the step time (waiting for the slower rank + the transfer itself)
  sync_wait_frac   1 - busy/step over both ranks: all time outside computation (the counts
                   all-reduce, the finite-loss all-gather after forward, the gradient all-reduce)
  busy_imbalance   mean over steps of max/mean per-rank busy (compute) time
  predicted_imbalance  the same from the cost model's prediction
  pred_busy_corr   correlation over steps of the predicted and the measured busy-time difference
                   between the two ranks (how much of the measured imbalance the cost model sees)

    .venv/bin/python bench/balance_real.py                    # ~6 minutes on 2 cores
    .venv/bin/python bench/balance_real.py --steps 60 --rounds 1 --batch-sizes 4   # ~1.5 minutes

The last stdout line is one JSON object, ratios first (``A/B`` = samples/s of A over B), also
written to ``bench/results/balance_real.json``. The machine has 2 cores shared with other work:
numbers are noisy; the per-run values are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, RESULTS, child_env, machine, rotated, write_result

STRATEGIES = ("fixed", "atoms", "balanced")


def run_once(strategy: str, batch_size: int, steps: int, run_dir: Path, demo_dir: Path, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "pretrain.py"), "--run-dir", str(run_dir), "--quiet", "--max-steps", str(steps),
           "--config", str(REPO / "configs" / "demo.yaml"), f"data.demo_dir={demo_dir}",
           f"data.batch_size={batch_size}", "log_every=1", "checkpoint.every=0", "eval_datasets=[]",
           f"schedule.strategy={strategy}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{strategy} run failed:\n{proc.stderr[-3000:]}")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(records: list[dict], warmup: int) -> dict:
    recs = [r for r in records if r["step"] >= warmup]
    t = np.array([r["step_time_max"] for r in recs])
    samples = np.array([r["samples_per_s"] * r["step_time_max"] for r in recs])
    step_r = np.array([[r["rank0/step_time"], r["rank1/step_time"]] for r in recs])
    busy_r = np.array([[r["rank0/busy_s"], r["rank1/busy_s"]] for r in recs])
    pred_r = np.array([[r["rank0/predicted_s"], r["rank1/predicted_s"]] for r in recs])
    dp, db = pred_r[:, 0] - pred_r[:, 1], busy_r[:, 0] - busy_r[:, 1]
    corr = float(np.corrcoef(dp, db)[0, 1]) if dp.std() > 0 and db.std() > 0 else float("nan")
    return {"steps": len(recs), "step_s": float(t.mean()),
            "pred_busy_corr": corr, "busy_minus_predicted_s": float((busy_r - pred_r).mean()),
            "rank_busy_diff_std_s": float(db.std()), "rank_pred_diff_std_s": float(dp.std()), "samples_per_s": float(samples.sum() / t.sum()),
            "step_s_median": float(np.median(t)), "samples_per_s_median": float(samples.mean() / np.median(t)),
            "samples_per_step": float(samples.mean()),
            "allreduce_frac": float(np.mean([r["allreduce_wait_frac"] for r in recs])),
            "sync_wait_frac": float(1 - busy_r.sum() / step_r.sum()),
            "busy_imbalance": float(np.mean([r["busy_imbalance"] for r in recs])),
            "predicted_imbalance": float(np.mean([r["predicted_imbalance"] for r in recs]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8], help="global; 2 ranks")
    ap.add_argument("--demo-dir", default=str(REPO / "data" / "demo"))
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    from lamm_ds.demo import make_demo

    make_demo(args.demo_dir)
    runs = {bs: {s: [] for s in STRATEGIES} for bs in args.batch_sizes}
    with tempfile.TemporaryDirectory(prefix="lamm_balance_real_") as tmp:
        n = 0
        for rnd in range(args.rounds):
            for bs in args.batch_sizes:
                order = rotated(STRATEGIES, rnd)
                for s in order:
                    n += 1
                    recs = run_once(s, bs, args.steps, Path(tmp) / f"run{n}", Path(args.demo_dir), args.overrides)
                    summ = summarize(recs, args.warmup)
                    runs[bs][s].append(summ)
                    print(f"batch {bs} ({bs // 2}/rank) {s:>8}: {summ['step_s'] * 1000:.1f} ms/step, "
                          f"{summ['samples_per_s']:.1f} samples/s, all-reduce {summ['allreduce_frac'] * 100:.1f}% "
                          f"of the step, all sync waits {summ['sync_wait_frac'] * 100:.1f}%, busy imbalance "
                          f"{summ['busy_imbalance']:.3f} (predicted {summ['predicted_imbalance']:.3f})",
                          file=sys.stderr, flush=True)
    ratios, per_bs = {}, {}
    for bs, by in runs.items():
        agg = {s: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for s, rs in by.items()}
        per_bs[str(bs)] = {"mean": agg, "runs": by}
        ratios[f"balanced/fixed@batch{bs}"] = round(agg["balanced"]["samples_per_s"] / agg["fixed"]["samples_per_s"], 3)
        ratios[f"balanced/atoms@batch{bs}"] = round(agg["balanced"]["samples_per_s"] / agg["atoms"]["samples_per_s"], 3)
        ratios[f"atoms/fixed@batch{bs}"] = round(agg["atoms"]["samples_per_s"] / agg["fixed"]["samples_per_s"], 3)
    for bs in runs:  # robust to descheduling spikes (but also blind to the slow steps balancing removes)
        agg = per_bs[str(bs)]["mean"]
        ratios[f"median-step balanced/fixed@batch{bs}"] = round(agg["balanced"]["samples_per_s_median"]
                                                                / agg["fixed"]["samples_per_s_median"], 3)
        ratios[f"median-step balanced/atoms@batch{bs}"] = round(agg["balanced"]["samples_per_s_median"]
                                                                / agg["atoms"]["samples_per_s_median"], 3)
    spread = {f"{s}@batch{bs}": [round(r["samples_per_s"], 1) for r in per_bs[str(bs)]["runs"][s]]
              for bs in runs for s in STRATEGIES}
    waits = {f"{s}@batch{bs}": {"allreduce_frac": round(per_bs[str(bs)]["mean"][s]["allreduce_frac"], 4),
                                "sync_wait_frac": round(per_bs[str(bs)]["mean"][s]["sync_wait_frac"], 4)}
             for bs in runs for s in STRATEGIES}
    imb = {f"{s}@batch{bs}": {"busy": round(per_bs[str(bs)]["mean"][s]["busy_imbalance"], 3),
                              "predicted": round(per_bs[str(bs)]["mean"][s]["predicted_imbalance"], 3)}
           for bs in runs for s in STRATEGIES}
    out = {"ratios": ratios, "wait_fractions": waits, "imbalance": imb, "samples_per_s_per_run": spread, "per_batch_size": per_bs,
           "setup": {"ranks": 2, "launcher": "torchrun", "config": "configs/demo.yaml", "steps": args.steps,
                     "warmup": args.warmup, "rounds": args.rounds, "overrides": args.overrides},
           "machine": machine(threads=1),  # one thread per rank
           "wall_s": round(time.perf_counter() - t_start, 1)}
    write_result(out, RESULTS / "balance_real.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
