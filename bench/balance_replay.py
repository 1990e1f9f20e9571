"""Replay of data-parallel training at R virtual ranks: real compute, simulated synchrony.

For each rank count R and micro-batch size m (samples per rank; global batch B = R·m) the real
plans of every strategy (``lamm_ds.scheduler.StepScheduler`` on the benchmark mixture's stream,
the engine's code) are drawn for ``--steps`` steps, and every rank's micro-batch of every step is
*run* on this machine, one after another: forward + universal loss + backward of the model (the
engine's denoising labels for unlabelled graphs made beforehand), timed with
``lamm_ds.engine.schedule.time_micro_batch`` (device-synchronised). What is measured and what is
modelled:

  measured   t[s, r]      seconds of rank r's micro-batch at step s: the minimum (``--estimator
                          median``: the median) over ``--repeats`` timings; strategies alternate
                          within each step and repeat (a rotating order), after ``--warmup``
                          untimed micro-batches, so machine drift hits every strategy alike
  measured   update_s     one AdamW step over the model's parameters (median of 10); the same for
                          every strategy and step
  modelled   allreduce_s  ring all-reduce of the gradients: 2(R-1)/R · G / bandwidth + 2(R-1) · latency,
                          G = trainable parameters × ``--grad-bytes`` (defaults: 25 GB/s, 10 µs per hop:
                          an InfiniBand-class GPU cluster; no overlap with backward)
  step time  max_r t[s, r] + allreduce_s + update_s  (a synchronous step ends at the slowest rank)

Figures per (model, R, m, strategy): samples/s and atoms/s (sums over the measured steps), the
measured imbalance (mean over steps of max/mean rank time), the same from the cost model's
prediction, and predicted-vs-measured per-rank time (R², worst / 95th percentile / mean relative
error) with the cost model the plans used: by default calibrated first on this machine for this
model (``lamm-ds calibrate``'s procedure; written beside the result and reusable with
``--cost-model FILE``).

Strategies: ``fixed`` (DistributedSampler-like: draw d of a step to rank d % R), ``atoms`` (fairchem
1.x: LPT on atom counts per step), ``max_atoms`` (fairchem 2.x / UMA's max-atoms sampler: greedy
atom-budget packing, batches dealt in turn, no balancing), ``balanced``, ``balanced_cp`` (balanced
with ``schedule.composition_preserving``) and ``budget``. Windowed strategies plan ``--window-steps``
steps at a time; measure whole windows (``--steps`` a multiple of it) for unbiased step times, since
balanced puts the heavy draws of a window into a few of its steps. Where a whole window costs too
much compute (EquiformerV2 on a CPU), ``--sample-steps k`` measures a stratified random sample of k
of the ``--steps`` planned steps (one drawn from each of k equal strata, the same steps for every
strategy): unbiased, noisier; ``predicted_samples_per_s_all_planned`` gives the cost model's figure
over every planned step beside the sampled one.

    .venv/bin/python bench/balance_replay.py --quick                     # smoke test, < 1 minute
    .venv/bin/python bench/balance_replay.py --model painn               # 8/16/64 ranks x 1/2 per rank
    .venv/bin/python bench/balance_replay.py --model eqv2-31m --ranks 64 --per-rank 1 2 --steps 4 \\
        --window-steps 4 --repeats 1 --strategies fixed atoms max_atoms balanced

Each model's section is kept in ``bench/results/balance_replay.json`` (``--out``); a run replaces
its model's section and the ratios are recomputed from all sections. The last stdout line is that
JSON object, ratios first: ``balanced_vs_<baseline>_throughput_r<R>_m<m>`` (samples/s; EquiformerV2
keys start with ``eqv2_``), then ``measured_vs_predicted_*`` (per-rank time, pooled over strategies).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import REPO, RESULTS, load_1min, machine, rotated, write_result
from _mixture import MIXTURES, build_mixture
from _models import CONFIG, MODELS, model_overrides

sys.path.insert(0, str(REPO))

STRATEGIES = ("fixed", "atoms", "max_atoms", "balanced", "balanced_cp", "budget")
BASELINES = ("fixed", "atoms", "max_atoms", "budget", "balanced_cp")
PREFIX = {"painn": "", "eqv2-31m": "eqv2_"}


def scheduler_args(label: str) -> tuple[str, bool]:
    """(schedule.strategy, composition_preserving) of a benchmark strategy label."""
    return ("balanced", True) if label == "balanced_cp" else (label, False)


# ------------------------------------------------------------------------------------ setup
def run_config(model: str, mixture, overrides: list[str]):
    from lamm_ds.engine.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        overlay = Path(tmp) / "mixture.yaml"
        overlay.write_text(mixture.config_yaml())
        return load_config([CONFIG, overlay], [*model_overrides(model), "data.stats_samples=500", *overrides])


def resolve_cost(args, cfg, model: str, out: Path, device: str, max_graphs: int, max_atoms: int):
    from lamm_ds.engine.schedule import calibrate
    from lamm_ds.scheduler import CostModel, builtin_cost_model

    spec = args.cost_model
    if spec.startswith("builtin:"):
        return builtin_cost_model(spec.split(":", 1)[1]), None
    if spec != "calibrate":
        return CostModel.load(spec), None
    t0 = time.perf_counter()
    print(f"[{model}] calibrating the cost model: {args.calib_batches} micro-batches x {args.calib_repeats} "
          "repeats ...", file=sys.stderr, flush=True)
    cm, report = calibrate(cfg, batches=args.calib_batches, repeats=args.calib_repeats,
                           max_graphs=max_graphs, seed=1, device=device, progress=False, max_atoms=max_atoms)
    path = out.with_name(f"{out.stem}_cost_{model}.json")
    cm.save(path)
    print(f"[{model}] cost model: {report['summary']} ({time.perf_counter() - t0:.0f} s) -> {path}",
          file=sys.stderr, flush=True)
    return CostModel.load(path), {"file": str(path), **report["fit"]}


def allreduce_seconds(grad_bytes: float, ranks: int, gbps: float, latency_us: float) -> float:
    """Ring all-reduce: reduce-scatter + all-gather, 2(R-1) steps of G/R bytes each."""
    if ranks < 2:
        return 0.0
    return 2 * (ranks - 1) / ranks * grad_bytes / (gbps * 1e9) + 2 * (ranks - 1) * latency_us * 1e-6


def update_seconds(model, cfg, device) -> float:
    """Median seconds of one AdamW step over the model's parameters (gradients present)."""
    import torch

    from lamm_ds.engine.optim import build_optimizer

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt, _ = build_optimizer(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 1e-3)
    times = []
    for _ in range(12):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved)  # the benchmark times gradients, not training: weights as they were
    return float(np.median(times[2:]))


# ------------------------------------------------------------------------------------ measurement
class Batches:
    """Micro-batches of a plan, as the engine makes them (collate, dataset ids, denoising labels)."""

    def __init__(self, graphs, ds_ids, cfg, device):
        self.graphs, self.ds_ids, self.cfg, self.device = graphs, ds_ids, cfg, device

    def of_step(self, plan) -> list:
        import torch

        from lamm_ds.engine.step import prepare_batch
        from lamm_ds.graphs import collate

        out = []
        for r in range(len(plan.predicted)):
            sel = plan.rank == r
            samples = [self.graphs[(int(k), int(i), int(p))]
                       for k, i, p in zip(plan.ks[sel], plan.idx[sel], plan.positions[sel])]
            b = collate(samples)
            b = b.replace(dataset_id=self.ds_ids[b.dataset_id])
            out.append(prepare_batch(b, self.cfg, plan.epoch).to(self.device, torch.float32))
        return out


def step_sample(first: int, steps: int, k: int, seed: int) -> list[int]:
    """The steps to measure: all ``steps`` from ``first`` (k = 0), or a stratified random sample of
    k of them: one step drawn uniformly from each of k equal consecutive strata. Every step has the
    same chance of being picked (1 in steps/k), so the sampled mean step time is unbiased, and the
    strata spread the sample over a window that balanced sorts by cost (heavy steps together)."""
    if k <= 0 or k >= steps:
        return list(range(first, first + steps))
    if steps % k:
        raise ValueError(f"--sample-steps {k} must divide --steps {steps}")
    size = steps // k
    rng = np.random.default_rng(seed)
    return [first + j * size + int(rng.integers(size)) for j in range(k)]


def predicted_all(scheduler, first: int, steps: int, allreduce_s: float, update_s: float) -> float:
    """Predicted samples/s over every planned step (planning costs no compute): what a step sample's
    predicted figure is compared with, to see what sampling alone does to the estimate."""
    plans = [scheduler.plan(s) for s in range(first, first + steps)]
    step_s = sum(float(p.predicted.max()) + allreduce_s + update_s for p in plans)
    return sum(len(p.positions) for p in plans) / step_s


def measure(model, cfg, schedulers: dict, batches: Batches, step_ids: list[int], repeats: int,
            warmup: int, progress_label: str) -> dict:
    """Per strategy: times (steps, ranks, repeats), predicted (steps, ranks), samples/atoms per step."""
    from lamm_ds.engine.schedule import time_micro_batch

    names = list(schedulers)
    R = next(iter(schedulers.values())).ranks
    steps = len(step_ids)
    res = {s: {"t": np.full((steps, R, repeats), np.nan), "pred": np.zeros((steps, R)), "samples": np.zeros(steps),
               "atoms": np.zeros(steps), "edges": np.zeros(steps), "rank_atoms": np.zeros((steps, R)),
               "rank_edges": np.zeros((steps, R)), "rank_graphs": np.zeros((steps, R)),
               "rank_model_edges": np.zeros((steps, R))}
           for s in names}
    t_start = time.perf_counter()
    for j, step in enumerate(step_ids):
        plans = {s: schedulers[s].plan(step) for s in names}
        mb = {s: batches.of_step(plans[s]) for s in names}
        if j == 0:
            for s in names:  # untimed warm-up (allocator, lazy initialisation)
                for b in mb[s][:warmup]:
                    time_micro_batch(model, b, cfg.loss)
        for s in names:
            p = plans[s]
            res[s]["pred"][j] = p.predicted
            res[s]["samples"][j] = len(p.positions)
            res[s]["atoms"][j] = p.natoms.sum()
            res[s]["edges"][j] = p.nedges.sum()
            res[s]["rank_atoms"][j] = np.bincount(p.rank, p.natoms, R)
            res[s]["rank_edges"][j] = np.bincount(p.rank, p.nedges, R)
            res[s]["rank_graphs"][j] = np.bincount(p.rank, minlength=R)
            res[s]["rank_model_edges"][j] = [int(b.num_edges) for b in mb[s]]
        for rep in range(repeats):
            for s in rotated(names, j + rep):
                for r, b in enumerate(mb[s]):
                    res[s]["t"][j, r, rep] = time_micro_batch(model, b, cfg.loss)
        el = time.perf_counter() - t_start
        print(f"{progress_label}: step {j + 1}/{steps} measured ({el:.0f} s, load {load_1min()})",
              file=sys.stderr, flush=True)
    return res


def rank_records(r: dict, t: np.ndarray) -> dict:
    """Every rank's micro-batch of every measured step (steps x ranks lists): measured and predicted
    seconds with the stored counts they were predicted from (and the edges the model really saw), to
    refit or cross-check a cost model."""
    return {"measured_s": np.round(t, 5).tolist(), "predicted_s": np.round(r["pred"], 5).tolist(),
            "atoms": r["rank_atoms"].astype(int).tolist(), "edges": r["rank_edges"].astype(int).tolist(),
            "graphs": r["rank_graphs"].astype(int).tolist(), "model_edges": r["rank_model_edges"].astype(int).tolist()}


def summarize(res: dict, estimator: str, allreduce_s: float, update_s: float, keep_ranks: bool = False) -> dict:
    out = {}
    for s, r in res.items():
        t = np.nanmin(r["t"], axis=2) if estimator == "min" else np.nanmedian(r["t"], axis=2)
        step = t.max(1) + allreduce_s + update_s
        pstep = r["pred"].max(1) + allreduce_s + update_s
        out[s] = {
            "steps": int(len(step)), "samples": int(r["samples"].sum()), "atoms": int(r["atoms"].sum()),
            "step_s_mean": float(step.mean()), "compute_max_s_mean": float(t.max(1).mean()),
            "compute_mean_s_mean": float(t.mean(1).mean()),
            "samples_per_s": float(r["samples"].sum() / step.sum()), "atoms_per_s": float(r["atoms"].sum() / step.sum()),
            "imbalance_measured": float((t.max(1) / t.mean(1)).mean()),
            "imbalance_measured_time_weighted": float(t.max(1).sum() / t.mean(1).sum()),
            "imbalance_predicted": float((r["pred"].max(1) / r["pred"].mean(1)).mean()),
            "predicted_step_s_mean": float(pstep.mean()),
            "predicted_samples_per_s": float(r["samples"].sum() / pstep.sum()),
            "rank_atoms_imbalance": float((r["rank_atoms"].max(1) / r["rank_atoms"].mean(1)).mean()),
            "samples_per_step_min_max": [int(r["samples"].min()), int(r["samples"].max())],
            "repeat_spread": float(np.nanmedian((np.nanmax(r["t"], 2) - np.nanmin(r["t"], 2)) / np.nanmin(r["t"], 2)))
            if r["t"].shape[2] > 1 else None,
            "_t": t, "_pred": r["pred"],
        }
        if keep_ranks:
            out[s]["ranks"] = rank_records(r, t)
    return out


def fit_quality(pred: np.ndarray, meas: np.ndarray) -> dict:
    pred, meas = np.asarray(pred, dtype=np.float64).ravel(), np.asarray(meas, dtype=np.float64).ravel()
    rel = np.abs(pred - meas) / meas
    ss_res = float(np.sum((pred - meas) ** 2))
    ss_tot = float(np.sum((meas - meas.mean()) ** 2)) or 1e-300
    return {"r2": 1 - ss_res / ss_tot, "worst_rel_err": float(rel.max()), "p95_rel_err": float(np.quantile(rel, 0.95)),
            "mean_rel_err": float(rel.mean()), "n": int(len(rel)),
            "measured_over_predicted_median": float(np.median(meas / pred))}


# ------------------------------------------------------------------------------------ one model
def run_model(args, model_name: str, mixture, out: Path) -> dict:
    import torch

    from lamm_ds.engine.data import open_datasets
    from lamm_ds.engine.host_memory import apply_keep_host_memory, host_memory_mode
    from lamm_ds.engine.model_init import build_model
    from lamm_ds.graphs import GraphDataset
    from lamm_ds.mixture import MixtureStream
    from lamm_ds.scheduler import StepScheduler

    t0 = time.perf_counter()
    device = torch.device(args.device)
    cfg = run_config(model_name, mixture, args.overrides)
    apply_keep_host_memory(device, cfg.keep_host_memory)  # the engine's allocator setting (keep_host_memory=false: off)
    datasets = open_datasets(cfg.data.datasets)
    # calibrate over the micro-batches a rank can get here: up to max(per_rank) of the largest structure
    largest = max(int(d.natoms.max()) for d in datasets)
    cost_model, calibration = resolve_cost(args, cfg, model_name, out, args.device, max(4, 3 * max(args.per_rank)),
                                           largest * max(args.per_rank))
    model = build_model(cfg, datasets).to(device).train()
    ds_ids = torch.tensor([model.dataset_index(d.name) for d in datasets])
    graphs = GraphDataset(datasets, model.cfg.cutoff, model.cfg.max_neighbors)
    stream = MixtureStream([len(d) for d in datasets], cfg.data.temperature, args.seed, cfg.data.epoch_length)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grad_bytes = params * args.grad_bytes
    update_s = update_seconds(model, cfg, device)
    batches = Batches(graphs, ds_ids, cfg, device)
    natoms, nedges = [d.natoms for d in datasets], [d.nedges for d in datasets]
    configs, pooled_pred, pooled_meas = {}, [], []
    for R in args.ranks:
        for m in args.per_rank:
            B = R * m
            scheds = {}
            for label in args.strategies:
                strategy, cp = scheduler_args(label)
                scheds[label] = StepScheduler(stream, B, R, strategy, cost_model, natoms, nedges,
                                              window_steps=args.window_steps, composition_preserving=cp)
            ar = allreduce_seconds(grad_bytes, R, args.allreduce_gbps, args.allreduce_latency_us)
            step_ids = step_sample(args.first_step, args.steps, args.sample_steps, args.sample_seed)
            res = measure(model, cfg, scheds, batches, step_ids, args.repeats, args.warmup,
                          f"[{model_name}] R={R} m={m}")
            summ = summarize(res, args.estimator, ar, update_s, args.keep_rank_times)
            for label, v in summ.items():
                v["predicted_samples_per_s_all_planned"] = predicted_all(scheds[label], args.first_step, args.steps,
                                                                         ar, update_s)
            pred = np.concatenate([v.pop("_pred").ravel() for v in summ.values()])
            meas = np.concatenate([v.pop("_t").ravel() for v in summ.values()])
            pooled_pred.append(pred)
            pooled_meas.append(meas)
            key = f"r{R}_m{m}"
            configs[key] = {"ranks": R, "per_rank": m, "batch_size": B, "allreduce_s": ar, "measured_steps": step_ids,
                            "measured_vs_predicted": fit_quality(pred, meas), "strategies": summ}
            base = summ.get("fixed")
            line = ", ".join(f"{s} {v['samples_per_s']:.1f}/s"
                             + (f" ({v['samples_per_s'] / base['samples_per_s']:.2f}x)" if base else "")
                             for s, v in summ.items())
            print(f"[{model_name}] R={R} m={m}: {line}", file=sys.stderr, flush=True)
    return {"model": model_name, "params": params, "grad_bytes": grad_bytes, "update_s": update_s,
            "model_config": model.cfg.to_dict(), "cost_model": cost_model.to_dict()["coefficients"],
            "cost_model_source": cost_model.source, "calibration": calibration,
            "measured_vs_predicted": fit_quality(np.concatenate(pooled_pred), np.concatenate(pooled_meas)),
            "configs": configs,
            "setup": {"mixture": mixture.name, "ranks": args.ranks, "per_rank": args.per_rank, "steps": args.steps,
                      "sample_steps": args.sample_steps, "sample_seed": args.sample_seed,
                      "first_step": args.first_step, "window_steps": args.window_steps, "repeats": args.repeats,
                      "warmup": args.warmup, "estimator": args.estimator, "strategies": args.strategies,
                      "device": args.device, "host_memory": host_memory_mode(), "seed": args.seed,
                      "overrides": args.overrides,
                      "allreduce_model": {"kind": "ring", "gbps": args.allreduce_gbps,
                                          "latency_us": args.allreduce_latency_us, "grad_bytes_per_param": args.grad_bytes,
                                          "overlap_with_backward": False}},
            "machine": machine(), "load_1min_end": load_1min(), "wall_s": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------ result
def ratios(models: dict) -> dict:
    out = {}
    for name, sec in models.items():
        pre = PREFIX.get(name, f"{name}_")
        for key, c in sec["configs"].items():
            st = c["strategies"]
            if "balanced" not in st:
                continue
            for b in BASELINES:
                if b in st:
                    out[f"{pre}balanced_vs_{b}_throughput_{key}"] = round(
                        st["balanced"]["samples_per_s"] / st[b]["samples_per_s"], 3)
    for name, sec in models.items():
        pre = PREFIX.get(name, f"{name}_")
        q = sec["measured_vs_predicted"]
        out[f"{pre}measured_vs_predicted_r2"] = round(q["r2"], 4)
        out[f"{pre}measured_vs_predicted_worst_rel_err"] = round(q["worst_rel_err"], 4)
        out[f"{pre}measured_vs_predicted_p95_rel_err"] = round(q["p95_rel_err"], 4)
        out[f"{pre}measured_vs_predicted_mean_rel_err"] = round(q["mean_rel_err"], 4)
        for key, c in sec["configs"].items():
            st = c["strategies"]
            if "balanced" in st and "fixed" in st:  # does the cost model predict the gain it plans for?
                meas = st["balanced"]["samples_per_s"] / st["fixed"]["samples_per_s"]
                pred = st["balanced"]["predicted_samples_per_s"] / st["fixed"]["predicted_samples_per_s"]
                out[f"{pre}predicted_balanced_vs_fixed_throughput_{key}"] = round(pred, 3)
                if "predicted_samples_per_s_all_planned" in st["balanced"]:  # sampled steps vs all planned
                    out[f"{pre}predicted_balanced_vs_fixed_throughput_all_planned_{key}"] = round(
                        st["balanced"]["predicted_samples_per_s_all_planned"]
                        / st["fixed"]["predicted_samples_per_s_all_planned"], 3)
                out[f"{pre}measured_vs_predicted_speedup_rel_err_{key}"] = round(abs(meas - pred) / pred, 4)
        for key, c in sec["configs"].items():
            for s, v in c["strategies"].items():
                out[f"{pre}imbalance_measured_{s}_{key}"] = round(v["imbalance_measured"], 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, default="painn")
    ap.add_argument("--mixture", choices=MIXTURES, default="auto", help="see bench/_mixture.py")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64], help="virtual rank counts (add 256 if time allows)")
    ap.add_argument("--per-rank", type=int, nargs="+", default=[1, 2], help="samples per rank (batch_size = R x m)")
    ap.add_argument("--steps", type=int, default=32, help="steps planned, and measured unless --sample-steps, per (R, m, strategy)")
    ap.add_argument("--first-step", type=int, default=0)
    ap.add_argument("--sample-steps", type=int, default=0,
                    help="measure a stratified random sample of this many of the --steps planned steps (0: all)")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of --sample-steps' draw (the plans stay --seed's)")
    ap.add_argument("--window-steps", type=int, default=32, help="schedule.window_steps of the windowed strategies")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4, help="untimed micro-batches per strategy before measuring")
    ap.add_argument("--estimator", choices=("min", "median"), default="min")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    ap.add_argument("--cost-model", default="calibrate",
                    help="calibrate (default: on this machine first), builtin:NAME, or a calibration JSON file")
    ap.add_argument("--calib-batches", type=int, default=40)
    ap.add_argument("--calib-repeats", type=int, default=3)
    ap.add_argument("--allreduce-gbps", type=float, default=25.0, help="ring all-reduce bandwidth, GB/s")
    ap.add_argument("--allreduce-latency-us", type=float, default=10.0, help="per ring hop, microseconds")
    ap.add_argument("--grad-bytes", type=float, default=4.0, help="bytes per gradient element (fp32: 4)")
    ap.add_argument("--keep-rank-times", action="store_true",
                    help="store every rank's measured/predicted seconds and stored counts per step in the JSON")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--seed", type=int, default=0, help="mixture stream seed")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/balance_replay.json)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 and 8 ranks, 2 steps, windows of 2")
    ap.add_argument("overrides", nargs="*", help="run-config overrides for the model (e.g. model.hidden=32)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ranks, args.per_rank, args.steps, args.window_steps = [4, 8], [1, 2], 2, 2
        args.repeats, args.warmup, args.calib_batches, args.calib_repeats = 2, 2, 8, 1
    if any(r < 1 for r in args.ranks) or any(m < 1 for m in args.per_rank) or args.steps < 1 or args.repeats < 1:
        ap.error("--ranks, --per-rank, --steps and --repeats must be >= 1")
    if args.sample_steps < 0:
        ap.error("--sample-steps must be >= 0")
    try:  # step_sample's own rule, checked before the model is built
        step_sample(args.first_step, args.steps, args.sample_steps, args.sample_seed)
    except ValueError as exc:
        ap.error(str(exc))
    if args.steps % args.window_steps:
        print(f"note: --steps {args.steps} is not a multiple of --window-steps {args.window_steps}: windowed "
              "strategies are measured on part of a window (unbiased, noisier)", file=sys.stderr)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS / ("balance_replay_quick.json" if args.quick else "balance_replay.json")
    mixture = build_mixture(args.mixture)
    section = run_model(args, args.model, mixture, out)
    models = {}
    if out.is_file():
        try:
            models = json.loads(out.read_text()).get("models", {})
        except json.JSONDecodeError:
            models = {}
    models[args.model] = section
    result = {**ratios(models), "mixture": mixture.record(), "models": models, "machine": machine()}
    write_result(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
