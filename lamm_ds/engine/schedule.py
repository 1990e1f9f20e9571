"""The scheduler from a run config: cost-model resolution, ``lamm-ds calibrate`` and ``lamm-ds plan-report``."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from lamm_ds.engine.config import RunConfig
from lamm_ds.engine.hardware import cpu_model
from lamm_ds.engine.host_memory import apply_keep_host_memory, host_memory_mode
from lamm_ds.mixture import MixtureStream
from lamm_ds.scheduler import Caps, CostModel, StepScheduler, builtin_cost_model, fit_cost_model
from lamm_ds.scheduler.defaults import DEFAULT_FOR_MODEL

log = logging.getLogger("lamm_ds")
COST_FILE = "cost_model.json"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _path(p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() or q.exists() else REPO_ROOT / q


def resolve_cost_model(cfg: RunConfig, run_dir: Path | None = None) -> CostModel:
    """``schedule.coefficients`` if given; else ``schedule.cost_model``: "auto" = the run directory's
    ``cost_model.json`` (written by ``lamm-ds calibrate --run-dir`` or by an earlier start of the same
    run), else the built-in coefficients for the model; "builtin:NAME"; or a calibration file."""
    sc = cfg.schedule
    if sc.coefficients:
        return CostModel(*map(float, sc.coefficients), source="config:schedule.coefficients")
    spec = sc.cost_model
    if spec == "auto":
        if run_dir is not None and (Path(run_dir) / COST_FILE).is_file():
            return CostModel.load(Path(run_dir) / COST_FILE)
        kind = getattr(cfg, "model_kind", "painn")
        if kind in DEFAULT_FOR_MODEL:
            return builtin_cost_model(DEFAULT_FOR_MODEL[kind])
        if sc.strategy in ("balanced", "budget"):
            raise ValueError(f"schedule.strategy={sc.strategy!r}: no built-in cost model for model_kind={kind!r}; "
                             "run `lamm-ds calibrate --config ... --run-dir <run dir>` first (or set "
                             "schedule.cost_model / schedule.coefficients)")
        # fixed/atoms plans do not use the cost model; it only feeds the predicted-time telemetry
        return builtin_cost_model(DEFAULT_FOR_MODEL["painn"])
    if spec.startswith("builtin:"):
        return builtin_cost_model(spec.split(":", 1)[1])
    return CostModel.load(_path(spec))


def edge_basis(datasets) -> list[dict]:
    """Cutoff/max_neighbors at which each dataset's stored edge counts were made."""
    return [{"dataset": d.name, **{k: d.manifest["graph"].get(k) for k in ("cutoff", "max_neighbors")}}
            for d in datasets]


def check_edge_basis(model: CostModel, datasets) -> None:
    fitted = model.meta.get("edge_basis")
    if not fitted:
        return
    basis = {(b["cutoff"], b["max_neighbors"]) for b in fitted}
    for b in edge_basis(datasets):
        if (b["cutoff"], b["max_neighbors"]) not in basis:
            log.warning("cost model %s was fitted on edges stored at cutoff/max_neighbors %s, but dataset %s "
                        "stores them at %s/%s: predictions may be off (re-run `lamm-ds calibrate`)",
                        model.source, sorted(basis), b["dataset"], b["cutoff"], b["max_neighbors"])


def build_scheduler(cfg: RunConfig, datasets, stream: MixtureStream, ranks: int,
                    cost_model: CostModel | None, strategy: str | None = None) -> StepScheduler:
    sc = cfg.schedule
    strategy = strategy or sc.strategy
    return StepScheduler(stream, cfg.data.batch_size, ranks, strategy, cost_model,
                         natoms=[d.natoms for d in datasets], nedges=[d.nedges for d in datasets],
                         window_steps=sc.window_steps, caps=Caps(sc.max_atoms_per_rank, sc.max_edges_per_rank),
                         composition_preserving=sc.composition_preserving and strategy == "balanced")


# --------------------------------------------------------------------------------------------------
# calibrate


def _hardware(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cpu":
        info["host_memory"] = host_memory_mode()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def time_micro_batch(model: torch.nn.Module, batch, loss_cfg) -> float:
    """Seconds of one forward + universal loss + backward of ``batch`` (device-synchronised)."""
    from lamm_ds.loss import universal_loss

    dev = batch.pos.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = model(batch)
    loss, _ = universal_loss(out, batch, loss_cfg)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def calibrate(cfg: RunConfig, batches: int = 40, repeats: int = 3, max_graphs: int | None = None, seed: int = 0,
              device: str | None = None, progress: bool = True,
              max_atoms: int | None = None) -> tuple[CostModel, dict]:
    """Time forward+loss+backward of ``batches`` real micro-batches of mixed sizes drawn from the
    configured data, fit the coefficients against their *stored* atom/edge counts, return the
    model and a report (fit quality and every micro-batch's measured/predicted seconds).

    ``max_atoms`` (default ``schedule.max_atoms_per_rank``) caps a micro-batch's atoms the way the
    scheduler caps a rank's: draws past the cap are left out (a micro-batch keeps at least one), so
    calibration never builds a batch larger than training would, nor one that exhausts memory."""
    from lamm_ds.engine.data import open_datasets, run_stream, with_replay
    from lamm_ds.engine.model_init import build_or_init_model
    from lamm_ds.engine.step import prepare_batch
    from lamm_ds.graphs import GraphDataset, collate

    if batches < 8:
        raise ValueError("calibrate: use at least 8 micro-batches (tens are better)")
    max_atoms = max_atoms if max_atoms is not None else cfg.schedule.max_atoms_per_rank
    if max_atoms is not None and max_atoms < 1:
        raise ValueError(f"calibrate: max_atoms must be >= 1, got {max_atoms}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    apply_keep_host_memory(dev, cfg.keep_host_memory)  # time the allocator training will run with
    cfg = with_replay(cfg)
    datasets = open_datasets(cfg.data.datasets, cfg.data.demo_dir, cfg.seed)
    model = build_or_init_model(cfg, datasets, 0).to(dev).train()
    ds_ids = torch.tensor([model.dataset_index(d.name) for d in datasets])
    graphs = GraphDataset(datasets, model.cfg.cutoff, model.cfg.max_neighbors,
                          strict=model.cfg.max_neighbors_strict)
    stream = run_stream(cfg, datasets)
    view = stream.epoch(0)
    rng = np.random.default_rng(seed)
    hi = max_graphs or max(8, 2 * cfg.data.batch_size)
    specs = []
    for b in range(batches):
        n = int(np.clip(round(math.exp(rng.uniform(0.0, math.log(hi)))), 1, hi))
        if b % 2 == 0:  # a slice of the mixture stream
            pos = rng.choice(len(view), size=n, replace=n > len(view))
            ks, idx = view.take(pos)
        else:  # one dataset alone: decorrelates atoms, edges and graphs across batches
            k = (b // 2) % len(datasets)
            ks = np.full(n, k, dtype=np.int64)
            idx = rng.choice(len(datasets[k]), size=n, replace=n > len(datasets[k]))
            pos = np.full(n, -1)
        sizes = np.array([datasets[k].natoms[i] for k, i in zip(ks, idx)], dtype=np.int64)
        if max_atoms is not None:  # leave out the draws past the cap
            n = max(1, int(np.searchsorted(np.cumsum(sizes), max_atoms, side="right")))
            ks, idx, sizes = ks[:n], idx[:n], sizes[:n]
        feats = [int(sizes.sum()), sum(int(datasets[k].nedges[i]) for k, i in zip(ks, idx)), n]
        samples = [graphs[(int(k), int(i), int(p))] for k, i, p in zip(ks, idx, range(len(ks)))]
        batch = collate(samples)
        batch = prepare_batch(batch.replace(dataset_id=ds_ids[batch.dataset_id]), cfg, 0).to(dev, torch.float32)
        specs.append((feats + [int(batch.num_edges)], batch))

    for _, batch in specs[:3]:  # warm-up (allocator, lazy init)
        time_micro_batch(model, batch, cfg.loss)
    times = np.full((repeats, len(specs)), np.inf)
    for r in range(repeats):
        for j in rng.permutation(len(specs)).tolist():  # a new order per repeat spreads machine noise
            times[r, j] = time_micro_batch(model, specs[j][1], cfg.loss)
        if progress:
            log.info("calibrate: repeat %d/%d done", r + 1, repeats)
    seconds = times.min(axis=0)
    all_feats = np.array([f for f, _ in specs], dtype=np.float64)
    features, model_edges = all_feats[:, :3], all_feats[:, 3]
    meta = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model_kind": getattr(cfg, "model_kind", "painn"),
            "model": model.cfg.to_dict(),
            "hardware": _hardware(dev), "edge_basis": edge_basis(datasets), "batches": batches,
            "repeats": repeats, "max_atoms": max_atoms, "datasets": [d.name for d in datasets],
            "note": "seconds of forward+loss+backward (min over repeats); atoms/edges are the stored counts"}
    model_fit, fit = fit_cost_model(features, seconds, source="lamm-ds calibrate", meta=meta)
    meta["fit"] = {"r2": fit.r2, "max_rel_error": fit.max_rel_error, "mean_rel_error": fit.mean_rel_error,
                   "n": fit.n}
    # diagnostic only: the same fit on the edges the model really sees (its own cutoff/max_neighbors);
    # a much better fit here means the stored counts are a poor proxy (re-ingest at the model's cutoff)
    _, diag = fit_cost_model(np.stack([features[:, 0], model_edges, features[:, 2]], axis=1), seconds)
    meta["fit_on_model_edges"] = {"r2": diag.r2, "max_rel_error": diag.max_rel_error,
                                  "mean_rel_error": diag.mean_rel_error}
    table = [{"graphs": int(f[2]), "atoms": int(f[0]), "edges": int(f[1]), "model_edges": int(me),
              "seconds": float(t), "predicted": float(p)}
             for f, me, t, p in zip(features, model_edges, seconds, fit.predicted)]
    meta["micro_batches"] = table
    report = {"fit": meta["fit"], "fit_on_model_edges": meta["fit_on_model_edges"], "coefficients": model_fit.to_dict()["coefficients"], "micro_batches": table,
              "summary": fit.summary()}
    return model_fit, report


# --------------------------------------------------------------------------------------------------
# plan report


def plan_loads(cfg: RunConfig, ranks: int, steps: int, strategies: list[str], cost_model: CostModel,
               datasets=None) -> dict[str, np.ndarray]:
    """Predicted seconds per (step, rank) of the first ``steps`` steps under each strategy."""
    from lamm_ds.engine.data import open_datasets, run_stream, with_replay

    cfg = with_replay(cfg)
    datasets = datasets if datasets is not None else open_datasets(cfg.data.datasets, cfg.data.demo_dir, cfg.seed)
    stream = run_stream(cfg, datasets)
    return {s: build_scheduler(cfg, datasets, stream, ranks, cost_model, strategy=s).loads(0, steps)
            for s in strategies}


def summarize_loads(loads: dict[str, np.ndarray]) -> dict:
    out = {}
    base = loads.get("fixed")
    for name, L in loads.items():
        t, perfect = float(L.max(1).sum()), float(L.mean(1).sum())
        out[name] = {"predicted_time_s": t, "perfect_balance_s": perfect, "efficiency": perfect / t,
                     "imbalance_time_weighted": t / perfect, "imbalance_mean_over_steps": float((L.max(1) / L.mean(1)).mean()),
                     **({"speedup_vs_fixed": float(base.max(1).sum()) / t} if base is not None else {})}
    return out


def draw_plan_report(loads: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """PNG: per strategy, predicted seconds per (step, rank) as a heat map (shared colour scale) and
    each step's slowest rank vs the mean rank (the perfect-balance limit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize_loads(loads)
    n = len(loads)
    vmax = max(float(L.max()) for L in loads.values())
    fig, axes = plt.subplots(n, 2, figsize=(12, 2.6 * n + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1.4, 1]})
    for row, (name, L) in enumerate(loads.items()):
        s = summary[name]
        ax = axes[row, 0]
        im = ax.imshow(L.T, aspect="auto", origin="lower", vmin=0, vmax=vmax, cmap="viridis", interpolation="nearest")
        ax.set_ylabel(f"{name}\nrank")
        ax.set_title(f"{name}: predicted time {s['predicted_time_s']:.3g} s, efficiency {s['efficiency']:.2f}"
                     + (f", {s['speedup_vs_fixed']:.2f}x vs fixed" if "speedup_vs_fixed" in s else ""), fontsize=9)
        fig.colorbar(im, ax=ax, label="predicted s")
        ax2 = axes[row, 1]
        steps = np.arange(L.shape[0])
        ax2.step(steps, L.max(1), where="mid", label="slowest rank (step time)")
        ax2.step(steps, L.mean(1), where="mid", label="mean rank (perfect balance)")
        ax2.fill_between(steps, L.min(1), L.max(1), step="mid", alpha=0.2, label="min..max over ranks")
        ax2.set_ylim(0, vmax * 1.05)
        ax2.set_ylabel("predicted s")
        if row == 0:
            ax2.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    axes[-1, 1].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plan_report(cfg: RunConfig, ranks: int, steps: int, out: str | Path, strategies: list[str] | None = None,
                run_dir: Path | None = None) -> dict:
    strategies = strategies or ["fixed", "atoms", cfg.schedule.strategy if cfg.schedule.strategy not in
                                ("fixed", "atoms") else "balanced"]
    cost_model = resolve_cost_model(cfg, run_dir)
    loads = plan_loads(cfg, ranks, steps, list(dict.fromkeys(strategies)), cost_model)
    title = (f"{ranks} ranks, batch_size {cfg.data.batch_size} ({cfg.data.batch_size / ranks:g} per rank), "
             f"window {cfg.schedule.window_steps} steps, cost model {cost_model.source}")
    png = draw_plan_report(loads, out, title)
    return {"png": str(png), "ranks": ranks, "steps": steps, "cost_model": cost_model.source,
            "strategies": summarize_loads(loads)}


def save_run_cost_model(model: CostModel, run_dir: Path) -> Path:
    """Record the cost model a run plans with (read back on resume by ``cost_model: auto``)."""
    path = Path(run_dir) / COST_FILE
    if path.is_file():
        try:
            if np.array_equal(CostModel.load(path).coefficients, model.coefficients):
                return path
        except (ValueError, json.JSONDecodeError):
            pass
        log.warning("%s: replaced by the configured cost model %s (plans of a resumed run change)", path, model.source)
    return model.save(path)
