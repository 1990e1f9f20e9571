"""Single-process training over the temperature-sampled mixture (the DeepSpeed engine wraps the same step).

One optimiser step = the next ``data.batch_size`` draws of the mixture stream, denoising labels
for unlabelled structures, the model, the universal loss, clipping and AdamW.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lamm_ds.denoise import apply_denoising
from lamm_ds.engine.config import RunConfig, to_yaml
from lamm_ds.engine.data import fit_stats, make_loader, open_datasets
from lamm_ds.engine.evaluate import evaluate_entries
from lamm_ds.engine.export import export_model
from lamm_ds.engine.guards import (check_datasets_contribute, check_eval_heads, merge_trained_elements,
                                  nonfinite_structures)
from lamm_ds.engine.rundir import RunDirLock
from lamm_ds.graphs import AtomsBatch, GraphDataset
from lamm_ds.loss import per_dataset_metrics, summarize_per_dataset, universal_loss
from lamm_ds.mixture import MixtureStream
from lamm_ds.model.potential import Potential


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``max_steps`` (or constant)."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - o.warmup_steps)
    t = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def log_evaluation(writer, evaluation: dict[str, dict], step: int, prefix: str = "eval") -> None:
    """Finite scalar metrics of each evaluated dataset to TensorBoard under <prefix>/<name>/."""
    for name, metrics in evaluation.items():
        for k, v in metrics.items():
            if isinstance(v, float) and math.isfinite(v):
                writer.add_scalar(f"{prefix}/{name}/{k}", v, step)


class EvalCurve:
    """Evaluation every ``cfg.eval_every`` optimiser steps (and before the first): the learning curve.

    The sets are read and turned into graphs once. Each point goes to ``<run_dir>/eval_curve.jsonl``
    and to TensorBoard under ``curve/<set>/<metric>`` (x = optimiser steps done). ``fresh``: a run
    starting at step 0 drops the points of an earlier run in the same directory.
    """

    def __init__(self, cfg: RunConfig, model_cfg, run_dir: Path, writer, fresh: bool) -> None:
        self.path, self.writer = Path(run_dir) / "eval_curve.jsonl", writer
        self.sets = []
        if cfg.eval_every:
            from lamm_ds.engine.evaluate import prepare_eval_sets

            self.sets = prepare_eval_sets(cfg.eval_datasets, model_cfg.cutoff, model_cfg.max_neighbors,
                                          cfg.eval_max_structures)
            if fresh:
                self.path.unlink(missing_ok=True)

    @staticmethod
    def is_due(cfg: RunConfig, steps_done: int) -> bool:
        return bool(cfg.eval_every) and (steps_done % cfg.eval_every == 0 or steps_done == cfg.max_steps)

    def record(self, model, steps_done: int) -> dict:
        from lamm_ds.engine.evaluate import append_curve_point, evaluate_prepared

        evaluation = evaluate_prepared(model, self.sets)
        append_curve_point(self.path, steps_done, evaluation)
        log_evaluation(self.writer, evaluation, steps_done, prefix="curve")
        self.writer.flush()
        return evaluation


def prepare_batch(batch: AtomsBatch, cfg: RunConfig, epoch: int) -> AtomsBatch:
    """Denoising pseudo-labels for unlabelled graphs (and, with a probability, labelled ones)."""
    if cfg.denoise_unlabelled:
        batch = apply_denoising(batch, cfg.denoise, epoch)
    return batch


def build_model(cfg: RunConfig, datasets) -> Potential:
    from lamm_ds.engine.config import model_config
    from lamm_ds.engine.export import build_potential

    mcfg = model_config(cfg)
    stats = {d.name: fit_stats(d, mcfg.max_z, cfg.data.stats_samples, cfg.seed) for d in datasets}
    torch.manual_seed(cfg.seed)
    return build_potential(cfg.model_kind, mcfg, [d.name for d in datasets], stats)


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    history: list[dict] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)


def train(cfg: RunConfig, run_dir: str | os.PathLike, progress: bool = True, model: Potential | None = None
          ) -> TrainResult:
    """Train for ``cfg.max_steps`` steps in this process; writes TensorBoard logs, metrics.jsonl,
    the resolved config and ``model.safetensors`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(run_dir)
    lock.acquire()  # a DeepSpeed job or another `lamm-ds train` writing here is refused, naming it
    try:
        return _train(cfg, run_dir, progress, model)
    finally:
        lock.release()


def _train(cfg: RunConfig, run_dir: Path, progress: bool, model: Potential | None) -> TrainResult:
    from torch.utils.tensorboard import SummaryWriter

    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    datasets = open_datasets(cfg.data.datasets, cfg.data.demo_dir)
    names = [d.name for d in datasets]
    if model is None:
        model = build_model(cfg, datasets)
    check_datasets_contribute(datasets, cfg, bool(getattr(model.cfg, "stress", False)))
    check_eval_heads(model, cfg.eval_datasets)
    dataset_ids = torch.tensor([model.dataset_index(n) for n in names])
    graphs = GraphDataset(datasets, model.cfg.cutoff, model.cfg.max_neighbors)
    stream = MixtureStream([len(d) for d in datasets], cfg.data.temperature, cfg.seed, cfg.data.epoch_length)
    epoch_length = len(stream.epoch(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    writer = SummaryWriter(str(run_dir / "tb"))
    history = []
    loader = make_loader(graphs, stream, epoch_length, cfg.data.batch_size, 0, cfg.max_steps, cfg.data.num_workers)
    curve = EvalCurve(cfg, model.cfg, run_dir, writer, fresh=True)
    if curve.is_due(cfg, 0):
        curve.record(model, 0)
    model.train()
    t_last = time.perf_counter()
    window = {"samples": 0, "atoms": 0, "edges": 0}
    with open(run_dir / "metrics.jsonl", "w") as log, tqdm(total=cfg.max_steps, disable=not progress,
                                                           desc="train", file=sys.stderr) as bar:
        for step, (epoch, batch) in enumerate(loader):
            batch = batch.replace(dataset_id=dataset_ids[batch.dataset_id])
            batch = prepare_batch(batch, cfg, epoch)
            out = model(batch)
            loss, metrics = universal_loss(out, batch, cfg.loss)
            if not torch.isfinite(loss):
                culprits = nonfinite_structures(out, batch, model.dataset_names, datasets)
                raise FloatingPointError(f"step {step}: loss is {loss.item()}: {culprits} (check the data and "
                                         "learning rate)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
            optimizer.step()
            scheduler.step()
            window["samples"] += batch.num_graphs
            window["atoms"] += batch.num_atoms
            window["edges"] += batch.num_edges
            if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                dt = time.perf_counter() - t_last
                t_last = time.perf_counter()
                per_ds = summarize_per_dataset(per_dataset_metrics(out, batch, model.dataset_names),
                                               model.dataset_names)
                record = {"step": step, "loss": loss.item() if not loss.requires_grad else float(loss.detach()), "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm),
                          **{k: float(v) for k, v in metrics.items()},
                          **{f"dataset/{k}": v for k, v in per_ds.items() if math.isfinite(v)},
                          **{f"throughput/{k}_per_s": v / dt for k, v in window.items()}}
                window = dict.fromkeys(window, 0)
                history.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
            if curve.is_due(cfg, step + 1):
                curve.record(model, step + 1)
    writer.flush()
    model.trained_elements = merge_trained_elements(getattr(model, "trained_elements", None), datasets)
    model_path = export_model(model, run_dir / "model.safetensors", {"steps": cfg.max_steps})
    evaluation = evaluate_entries(model, cfg.eval_datasets)
    log_evaluation(writer, evaluation, cfg.max_steps)
    writer.close()
    if evaluation:
        (run_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    return TrainResult(run_dir, model_path, history, evaluation)
