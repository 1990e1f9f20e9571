"""What a run records: per-step statistics gathered from every rank (step, busy, all-reduce and
predicted times, sizes, per-dataset errors, the mean loss), written by rank 0 to ``metrics.jsonl``,
TensorBoard (``train/``, ``schedule/``, ``dataset/``) and the progress bar; the environment."""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from lamm_ds.engine.config import RunConfig
from lamm_ds.engine.host_memory import host_memory_mode
from lamm_ds.engine.step import StepResult
from lamm_ds.loss import per_dataset_metrics, summarize_per_dataset


def environment(world: int) -> dict:
    """Versions, platform and launcher variables of this process (``environment.json``)."""
    import deepspeed

    versions = {}
    for name in ("torch", "deepspeed", "e3nn", "ase", "numpy", "lmdb", "vesin"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # an optional package: record its absence
            versions[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "hostname": socket.gethostname(),
            "world_size": world, "cuda": torch.cuda.is_available(), "versions": versions,
            "deepspeed_accelerator": deepspeed.get_accelerator().device_name(),
            "launcher_env": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT") if k in os.environ}}


# Variables that decide how a rank computes: recorded per rank, since on other nodes they come from
# the remote shell plus what the launcher exports (`.deepspeed_env`), not from the launching shell.
_RANK_ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "PYTHON", "DS_", "CUDA_", "NCCL_", "LAMM_DS_", "SSH_CONNECTION")


def rank_environment(rank: int) -> dict:
    """This rank's pid, host, thread count and computing-relevant environment variables."""
    return {"rank": rank, "pid": os.getpid(), "hostname": socket.gethostname(),
            "torch_threads": torch.get_num_threads(), "host_memory": host_memory_mode(),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_RANK_ENV_PREFIXES)}}


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class Telemetry:
    """Every rank takes part in :meth:`after_step` (it holds collectives); rank 0 writes.

    On resume, ``metrics.jsonl`` keeps only the records of the steps before ``start_step``, so the
    log reads as one run, and TensorBoard purges the steps that will be run again."""

    def __init__(self, cfg: RunConfig, run_dir: Path, rank: int, world: int, device: torch.device,
                 start_step: int, resume: bool, progress: bool, head_names: list[str]) -> None:
        self.cfg, self.rank, self.world, self.device, self.head_names = cfg, rank, world, device, head_names
        self.history: list[dict] = []
        self.writer = self.metrics_file = None
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (progress and rank == 0),
                        desc="pretrain", file=sys.stderr)
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step)
        path = run_dir / "metrics.jsonl"
        kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if line.strip() and json.loads(line)["step"] < start_step] if resume else []
        self.metrics_file = open(path, "w")
        self.metrics_file.writelines(line + "\n" for line in kept)

    def after_step(self, step: int, result: StepResult, allreduce_s: float, predicted, engine, skipped: int) -> None:
        device, world = self.device, self.world
        # per rank: step time, busy time (without collectives), all-reduce time, predicted time
        step_time = torch.tensor([result.elapsed, result.elapsed - result.sync_s - allreduce_s, allreduce_s,
                                  float(predicted[self.rank])], dtype=torch.float64, device=device)
        times = [torch.zeros_like(step_time) for _ in range(world)]
        dist.all_gather(times, step_time)
        batch, out = result.batch, result.out
        sizes = torch.tensor([batch.num_graphs, batch.num_atoms, batch.num_edges], dtype=torch.float64,
                             device=device)
        dist.all_reduce(sizes)
        per_ds = per_dataset_metrics(out, batch, self.head_names).to(device)
        dist.all_reduce(per_ds)
        loss_sum = result.loss.detach().clone()
        dist.all_reduce(loss_sum)
        if self.rank != 0:
            self.bar.update(1)
            return
        writer = self.writer
        tt = torch.stack(times).cpu().numpy()
        t, busy, allreduce, pred = tt[:, 0], tt[:, 1], tt[:, 2], tt[:, 3]
        sched = {"predicted_imbalance": float(pred.max() / pred.mean()),
                 "busy_imbalance": float(busy.max() / max(busy.mean(), 1e-12)),
                 "allreduce_wait_frac": float(allreduce.mean() / max(t.mean(), 1e-12)),
                 "predicted_step_s": float(pred.max()), "busy_max_s": float(busy.max())}
        for k, v in sched.items():  # every step: the scheduler's telemetry
            writer.add_scalar(f"schedule/{k}", v, step)
        if world <= 64:  # and per rank (larger worlds: every log_every steps, in the record below)
            for r in range(world):
                writer.add_scalar(f"schedule/rank{r}/predicted_s", float(pred[r]), step)
                writer.add_scalar(f"schedule/rank{r}/busy_s", float(busy[r]), step)
        if step % self.cfg.log_every == 0 or step == self.cfg.max_steps - 1:
            grad_norm = engine.get_global_grad_norm() if result.manual_grad_norm is None else result.manual_grad_norm
            record = {"step": step, "loss": float(loss_sum) / world, "lr": engine.get_lr()[0],
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "loss_scale": float(getattr(engine.optimizer, "cur_scale", 1.0)),
                      "samples_per_s": float(sizes[0] / t.max()), "atoms_per_s": float(sizes[1] / t.max()),
                      "edges_per_s": float(sizes[2] / t.max()), "step_time_max": float(t.max()),
                      "imbalance": float(t.max() / t.mean()), "memory_mb": memory_mb(device),
                      "skipped_steps": skipped, **sched,
                      **{f"rank{r}/step_time": float(x) for r, x in enumerate(t)},
                      **{f"rank{r}/busy_s": float(x) for r, x in enumerate(busy)},
                      **{f"rank{r}/predicted_s": float(x) for r, x in enumerate(pred)},
                      **{f"dataset/{k}": v for k, v in summarize_per_dataset(per_ds.cpu(), self.head_names).items()
                         if math.isfinite(v)}}
            self.history.append(record)
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            for k, v in record.items():
                if k != "step" and v is not None:
                    writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.writer is not None:
            self.writer.close()
