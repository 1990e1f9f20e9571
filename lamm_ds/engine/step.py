"""One optimiser step on every rank: denoising labels, forward, the universal loss with global
normalisation, a collective check for non-finite losses (a bad step is skipped on every rank and
its structures named), backward and update; and where the step's time went."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lamm_ds.denoise import apply_denoising
from lamm_ds.engine.config import RunConfig
from lamm_ds.engine.guards import nonfinite_structures
from lamm_ds.graphs import AtomsBatch
from lamm_ds.loss import local_counts, universal_loss

log = logging.getLogger("lamm_ds")


def prepare_batch(batch: AtomsBatch, cfg: RunConfig, epoch: int) -> AtomsBatch:
    """Denoising pseudo-labels for unlabelled graphs (and, with a probability, labelled ones)."""
    if cfg.denoise_unlabelled:
        batch = apply_denoising(batch, cfg.denoise, epoch)
    return batch


class AllReduceTimer:
    """Time spent inside DeepSpeed's gradient all-reduce (waiting for the slowest rank + transfer).

    Busy time = step time minus the collectives. With ZeRO-2/3 part of the reduction runs in
    backward hooks and is counted as busy."""

    def __init__(self, engine) -> None:
        self.seconds = 0.0
        if hasattr(engine, "allreduce_gradients"):
            allreduce = engine.allreduce_gradients

            def timed(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return allreduce(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t

            engine.allreduce_gradients = timed


class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss; aborts after ``faults.nan_abort_after`` in a row."""

    def __init__(self, cfg: RunConfig, rank: int, head_names: list[str], datasets) -> None:
        self.cfg, self.rank, self.head_names, self.datasets = cfg, rank, head_names, datasets
        self.streak = self.skipped = 0

    def skip(self, step: int, bad_ranks: list[int], out: dict, batch: AtomsBatch) -> bool:
        """Whether this step must be skipped (on every rank: ``bad_ranks`` is the same everywhere)."""
        if not bad_ranks:
            self.streak = 0
            return False
        self.streak += 1
        self.skipped += 1
        culprits = nonfinite_structures(out, batch, self.head_names, self.datasets) \
            if self.rank in bad_ranks else ""
        if culprits:
            log.warning("step %d, rank %d: %s", step, self.rank, culprits)
        if self.rank == 0:
            log.warning("step %d: non-finite loss on rank(s) %s; step skipped on every rank (%d in a row)",
                        step, bad_ranks, self.streak)
        if self.streak >= self.cfg.faults.nan_abort_after:
            raise FloatingPointError(
                f"{self.streak} consecutive steps with a non-finite loss (last: step {step}, rank(s) "
                f"{bad_ranks}{'; on this rank ' + culprits if culprits else ''}); aborting. Lower "
                "optim.lr or check the data.")
        return True


@dataclass
class StepResult:
    batch: AtomsBatch
    out: dict
    loss: torch.Tensor
    elapsed: float                  # seconds for the whole step on this rank
    sync_s: float                   # of which in the step's own collectives (counts, finite flags)
    manual_grad_norm: float | None  # DeepSpeed reports no norm at ZeRO stage 0: computed here


def graph_loss_weights(cfg: RunConfig, run_dataset_id: torch.Tensor) -> torch.Tensor | None:
    """Each graph's loss weight, its dataset's ``loss_weight``; None when every dataset weighs 1 (the
    unweighted loss, computed without a multiply)."""
    weights = [d.loss_weight for d in cfg.data.datasets]
    if all(w == 1.0 for w in weights):
        return None
    return torch.tensor(weights, dtype=torch.float32)[run_dataset_id]


def train_step(engine, batch: AtomsBatch, epoch: int, step: int, cfg: RunConfig, ds_ids: torch.Tensor,
               device: torch.device, world: int, guard: NonFiniteGuard) -> StepResult | None:
    """Forward, loss, backward and update of one step; ``None`` when the step was skipped."""
    t0 = time.perf_counter()
    weights = graph_loss_weights(cfg, batch.dataset_id)  # by the run's dataset index, before the head remap
    batch = batch.replace(dataset_id=ds_ids[batch.dataset_id])
    batch = prepare_batch(batch, cfg, epoch).to(device, torch.float32)
    weights = None if weights is None else weights.to(device)
    t_sync = time.perf_counter()
    counts = local_counts(batch).to(device)
    dist.all_reduce(counts)
    t_sync = time.perf_counter() - t_sync
    out = engine(batch)
    loss, _ = universal_loss(out, batch, cfg.loss, global_counts=counts, world_size=world, graph_weight=weights)
    if step in cfg.faults.inject_nan_steps:
        loss = loss * float("nan")
    finite = torch.tensor([float(torch.isfinite(loss).item())], device=device)
    flags = [torch.zeros_like(finite) for _ in range(world)]
    t1 = time.perf_counter()
    dist.all_gather(flags, finite)
    t_sync += time.perf_counter() - t1
    if guard.skip(step, [r for r, f in enumerate(flags) if f.item() == 0], out, batch):
        engine.zero_grad() if hasattr(engine, "zero_grad") else None
        return None
    engine.backward(loss)
    manual_norm = None
    if engine.zero_optimization_stage() == 0:
        grads = [p.grad.float().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
        manual_norm = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
    engine.step()
    return StepResult(batch, out, loss, time.perf_counter() - t0, t_sync, manual_norm)
