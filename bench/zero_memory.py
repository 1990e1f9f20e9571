"""Per-rank parameter + gradient + optimiser memory of the EquiformerV2 153M preset, ZeRO 0 vs 3, 2 ranks.

Each stage runs as its own 2-process ``torchrun`` job on CPU (gloo). Every rank builds the
``EquiformerV2Config.preset("153M")`` potential (fp32, direct forces), wraps it with
``deepspeed.initialize`` and a ``torch.optim.AdamW`` (lamm-ds's setup), and runs one training
step on one small molecule (so AdamW's moment buffers exist). Then it counts the bytes of every
tensor storage alive in the process (``gc`` walk, each storage once: parameters or their ZeRO
partitions, fp32 master copies, gradients/gradient partitions, AdamW moments, DeepSpeed's flat
buffers), and its resident set size.

    .venv/bin/python bench/zero_memory.py            # ~2-4 minutes on CPU, ~3 GB RAM per rank

"Parameter + optimiser" memory per rank = parameters held by the rank (ZeRO-3: its partition) +
fp32 master copies (ZeRO-3 keeps a separate fp32 partition even in fp32 training) + AdamW moments;
it is read from the engine and optimiser, next to the gradient buffer (ZeRO-3: a persistent
gradient partition; ZeRO-0: freed after the step) and the total of all live tensors.

Runs fp32 and bf16 (``--precision``). Last stdout line: JSON with ``ratio_fp32`` / ``ratio_bf16`` =
stage-3 / stage-0 parameter+optimiser bytes per rank (target <= 0.55), per-precision details
(``ratio_all_live_tensors``, breakdowns, RSS); also written to ``bench/results/zero_memory.json``.
Expected: bf16 0.50 (everything partitioned); fp32 0.67, because DeepSpeed's ZeRO-3 keeps an fp32
master partition next to the (already fp32) parameter partition, so 4P/W against 3P at stage 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import REPO, RESULTS, child_env, machine, write_result

sys.path.insert(0, str(REPO))


def _storage_bytes() -> int:
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            st = obj.untyped_storage()
        except Exception:
            continue
        key = st.data_ptr()
        if key in seen or st.nbytes() == 0:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def worker(stage: int, out: str, preset: str, precision: str) -> None:
    import importlib

    import numpy as np
    import psutil
    import torch
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    from ase.build import molecule

    from lamm_ds.graphs import build_sample, collate
    from lamm_ds.model.equiformer_v2 import EquiformerV2Config, EquiformerV2Potential, count_parameters
    from lamm_ds.structure import Structure

    torch.manual_seed(0)
    cfg = EquiformerV2Config.preset(preset)
    model = EquiformerV2Potential(cfg, ["bench"])
    n_params = count_parameters(model)
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
              "steps_per_print": 10**9, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage}}
    if precision == "bf16":
        ds_cfg["bf16"] = {"enabled": True}
    if stage == 3:  # buckets sized for a ~150M model (the 5e8-element default reduce bucket alone is 2 GB)
        ds_cfg["zero_optimization"].update(reduce_bucket_size=20_000_000, stage3_prefetch_bucket_size=20_000_000,
                                           stage3_param_persistence_threshold=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg, dist_init_required=False)
    a = molecule("CH3COCH3")
    a.rattle(0.05, seed=rank)
    b = collate([build_sample(Structure(a.numbers, a.positions, energy=0.0, forces=np.zeros((len(a), 3))),
                              cfg.cutoff, cfg.max_neighbors)])
    out_ = engine(b)
    loss = out_["energy"].pow(2).mean() + out_["forces"].pow(2).mean()
    engine.backward(loss)
    engine.step()
    del out_, loss
    gc.collect()
    def nbytes(t):
        return t.numel() * t.element_size()

    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    moments = sum(nbytes(v) for st in inner.state.values() for v in st.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    def flat(x):
        return [t for item in x for t in (flat(item) if isinstance(item, (list, tuple)) else [item])]

    master = 0   # fp32 master copies kept by DeepSpeed's optimiser wrappers
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                 "fp32_groups"):
        if hasattr(zero, attr) and zero is not inner:
            master = sum(nbytes(t) for t in flat(getattr(zero, attr)) if isinstance(t, torch.Tensor))
            break
    if stage == 3:
        params = sum(nbytes(p.ds_tensor) for p in engine.module.parameters())
        grads = nbytes(zero.grad_partitions_flat_buffer) if zero.grad_partitions_flat_buffer is not None else 0
    else:
        params = sum(nbytes(p) for p in engine.module.parameters())
        grads = sum(nbytes(p.grad) for p in engine.module.parameters() if p.grad is not None)
    record = {"rank": rank, "stage": stage, "precision": precision, "tensor_bytes": _storage_bytes(),
              "rss_bytes": psutil.Process().memory_info().rss, "params": n_params,
              "param_bytes": params, "master_bytes": master, "moment_bytes": moments, "grad_buffer_bytes": grads,
              "param_optim_bytes": params + master + moments}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def run_stage(stage: int, preset: str, precision: str, tmp: Path) -> list[dict]:
    env = child_env(PYTHONWARNINGS="ignore::FutureWarning")
    out = tmp / f"stage{stage}_{precision}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", "--stage", str(stage), "--preset", preset, "--precision", precision, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--preset", default="153M", choices=["31M", "83M", "153M"])
    p.add_argument("--precision", default="both", choices=["fp32", "bf16", "both"])
    p.add_argument("--result", default=str(RESULTS / "zero_memory.json"))
    args = p.parse_args(argv)
    if args.worker:
        worker(args.stage, args.out, args.preset, args.precision)
        return 0
    import tempfile

    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    result = {"preset": args.preset, "ranks": 2, "device": "cpu (gloo)", "target": "ratio <= 0.55"}
    with tempfile.TemporaryDirectory() as tmp:
        for prec in precisions:
            res = {s: run_stage(s, args.preset, prec, Path(tmp)) for s in (0, 3)}
            live = {s: max(r["tensor_bytes"] for r in recs) for s, recs in res.items()}
            po = {s: max(r["param_optim_bytes"] for r in recs) for s, recs in res.items()}
            result["params"] = res[0][0]["params"]
            result[prec] = {
                "ratio": po[3] / po[0], "ratio_all_live_tensors": live[3] / live[0],
                "stage0_param_optim_mb_per_rank": po[0] / 2**20, "stage3_param_optim_mb_per_rank": po[3] / 2**20,
                "stage0_live_tensor_mb_per_rank": live[0] / 2**20, "stage3_live_tensor_mb_per_rank": live[3] / 2**20,
                "breakdown_mb": {f"stage{s}": {k: recs[0][k] / 2**20 for k in ("param_bytes", "master_bytes",
                                                                               "moment_bytes", "grad_buffer_bytes")}
                                 for s, recs in res.items()},
                "rss_mb": {f"stage{s}": [r["rss_bytes"] / 2**20 for r in recs] for s, recs in res.items()},
            }
            r = result[prec]
            print(f"{args.preset} {prec}: params+optimiser per rank ZeRO-0 {r['stage0_param_optim_mb_per_rank']:.0f} MB, "
                  f"ZeRO-3 {r['stage3_param_optim_mb_per_rank']:.0f} MB -> ratio {r['ratio']:.3f} "
                  f"(all live tensors {r['ratio_all_live_tensors']:.3f})")
    for prec in precisions:   # headline figures, one per precision (no single "best of" number)
        result[f"ratio_{prec}"] = result[prec]["ratio"]
    result["machine"] = machine(threads=1)  # one thread per rank
    write_result(result, args.result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
