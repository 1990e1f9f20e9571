"""Where a training step's time goes: every aten call of one step of our PaiNN or EquiformerV2, timed.

One training step (forward, energy + forces loss, backward into the parameters; double backward for
conservative forces; no optimiser) on a real batch, after warm-up steps, run twice:

1. under ``torch.profiler`` (self CPU time per op, as ``key_averages`` reports it);
2. under a ``TorchDispatchMode`` that times each aten call with ``perf_counter`` and counts the
   subnormal floats (below ``finfo.tiny``, e.g. ~1.2e-38 in fp32) in its floating inputs. x86
   arithmetic on subnormals is 20-40x slower: an op that is slow *and* reads subnormals is the
   first thing to look at. (This is how the Gaussian-tail subnormals of issue 18 were found; the
   profiler's own per-op times were distorted on these machines, so both are reported.)

Batches: ``molecules`` = ``--molecules`` acac molecules (../shared/data/acac, else ASE g2 molecules),
``periodic`` = ``--cells`` rattled 3x3x3 fcc cells (PaiNN) or 2x2x2 (EquiformerV2).

    .venv/bin/python bench/profile_step.py --model painn --forces conservative --system periodic
    .venv/bin/python bench/profile_step.py --model eqv2-31m --system molecules --molecules 4

The last stdout line is one JSON object: step seconds, the top ops by time (op, input shapes,
calls, ms, share of the step), and the ops that read subnormals (with how many). Also written to
``bench/results/profile_<model>_<system>_<forces>.json``.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch

from _common import RESULTS, machine, write_result


#: ops whose input values are not computed with (overwritten, aliased): their subnormals cost nothing
_NO_ARITHMETIC = {"fill_", "zero_", "bernoulli_", "uniform_", "normal_", "detach", "alias", "view",
                  "_unsafe_view", "t", "transpose", "expand", "as_strided", "slice", "select", "split",
                  "split_with_sizes", "unsqueeze", "squeeze", "permute"}


def _subnormals(t: torch.Tensor) -> int:
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


def dispatch_profile(step) -> tuple[float, dict]:
    """Seconds of one ``step()`` and per (op, input shapes): [calls, seconds, subnormal inputs]."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stats: dict = collections.defaultdict(lambda: [0, 0.0, 0])

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            # counted outside the timed call; not for ops that only overwrite or alias their input
            sub = 0 if func.__name__.split(".")[0] in _NO_ARITHMETIC else sum(_subnormals(a) for a in tensors)
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            dt = time.perf_counter() - t0
            key = (str(func).replace(".default", ""), tuple(tuple(a.shape) for a in tensors))
            row = stats[key]
            row[0] += 1
            row[1] += dt
            row[2] += sub
            return out

    t0 = time.perf_counter()
    with Timer():
        step()
    return time.perf_counter() - t0, stats


def profiler_table(step, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def painn_step(args):
    import model_throughput as mt
    from lamm_ds.model.heads import fit_dataset_stats

    structures = mt.acac_structures(args.molecules) if args.system == "molecules" else mt.periodic_structures(0)
    batch = mt.make_batch(structures, 5.0, 50)
    model = mt.build_ours(128, 4, 20, 5.0, 50, args.forces, fit_dataset_stats(structures, 100)).train()
    return lambda: mt.train_step(model, batch), batch.num_atoms, batch.num_edges


def eqv2_step(args):
    import eqv2_throughput as eb
    from lamm_ds.model.equiformer_v2 import EquiformerV2Config, EquiformerV2Potential
    from lamm_ds.model.heads import DatasetStats

    cfg = EquiformerV2Config.preset("31M", forces=args.forces)
    structures = eb.make_structures(args.molecules, 0) if args.system == "molecules" else eb.make_structures(0, args.cells)
    batch = eb.make_batch(structures, cfg.cutoff, cfg.max_neighbors)
    torch.manual_seed(0)
    model = EquiformerV2Potential(cfg, ["bench"], {"bench": DatasetStats.identity(cfg.max_z)}).train()
    return lambda: eb.train_step(model, batch), batch.num_atoms, batch.num_edges


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["painn", "eqv2-31m"], default="painn")
    p.add_argument("--system", choices=["molecules", "periodic"], default="molecules")
    p.add_argument("--forces", choices=["direct", "conservative"], default="direct")
    p.add_argument("--molecules", type=int, default=32)
    p.add_argument("--cells", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    step, atoms, edges = (painn_step if args.model == "painn" else eqv2_step)(args)
    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    step()
    plain_s = time.perf_counter() - t0
    print(profiler_table(step, args.top), file=sys.stderr)
    dispatch_s, stats = dispatch_profile(step)

    by_time = sorted(stats.items(), key=lambda kv: -kv[1][1])
    timed_total = sum(v[1] for v in stats.values())
    top = [{"op": op, "shapes": [list(s) for s in shapes], "calls": n, "ms": round(sec * 1e3, 2),
            "share": round(sec / timed_total, 4)} for (op, shapes), (n, sec, _) in by_time[:args.top]]
    per_op = collections.defaultdict(float)
    for (op, _), (_, sec, _) in stats.items():
        per_op[op] += sec
    subnormal = [{"op": op, "shapes": [list(s) for s in shapes], "calls": n, "ms": round(sec * 1e3, 2),
                  "subnormal_inputs": sub} for (op, shapes), (n, sec, sub) in by_time if sub]
    for row in top[:15]:
        print(f"{row['ms']:9.1f} ms {row['share']:6.1%} {row['calls']:5d}x {row['op']} {row['shapes']}", file=sys.stderr)
    result = {
        "step_s": round(plain_s, 4), "step_s_under_dispatch_timer": round(dispatch_s, 4),
        "model": args.model, "system": args.system, "forces": args.forces, "atoms": atoms, "edges": edges,
        "ops_by_time": {op: round(sec * 1e3, 2) for op, sec in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]},
        "top_calls": top, "ops_reading_subnormals": subnormal[:args.top],
        "subnormal_inputs_total": sum(v[2] for v in stats.values()), "machine": machine(),
    }
    write_result(result, RESULTS / f"profile_{args.model}_{args.system}_{args.forces}.json")
    return result


if __name__ == "__main__":
    main()
