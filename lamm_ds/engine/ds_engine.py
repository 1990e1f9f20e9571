"""Pre-training and fine-tuning: the one training loop (``launch/pretrain.py``, ``launch/finetune.py``,
``lamm-ds train``).

The same script runs under ``deepspeed`` (single or multi-node), ``torchrun`` and plain ``python``
(a one-process group). One optimiser step consumes ``data.batch_size`` draws of the mixture stream,
split over the ranks by the scheduler (``schedule.strategy``; lamm_ds/scheduler,
docs/load_balancing.md); every rank computes its share from (seed, step) alone, so no sampler state
needs to be communicated and a resumed run continues with exactly the draws it would have seen.

Where each part lives (docs/architecture.md): process group ``distributed``, run directory
``rundir``, checkpoints ``checkpoint``, the model ``model_init``, the optimiser ``optim``, the
DeepSpeed JSON ``ds_config``, per-rank batches ``data``, the step ``step``, the weights' moving
average ``ema``, what is recorded ``telemetry``, learning curves ``curve``, the end of a run ``finish``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lamm_ds.engine.checkpoint import (LATEST, CheckpointError, latest_tag, load_checkpoint, save_checkpoint,
                                       verify_checkpoint)
from lamm_ds.engine.config import ConfigError, RunConfig, config_defaults, load_config, to_yaml
from lamm_ds.engine.curve import EvalCurve
from lamm_ds.engine.data import open_datasets, run_stream, step_loader, with_replay
from lamm_ds.engine.distributed import (RendezvousError, agree, leave_process_group, rendezvous_env,
                                         setup_distributed)
from lamm_ds.engine.ds_config import check_compile, check_ema, check_zero_stage, deepspeed_config, resolve_path
from lamm_ds.engine.ema import WeightEMA, start_ema
from lamm_ds.engine.finish import finish_run
from lamm_ds.engine.guards import (UselessDatasetError, check_datasets_contribute, check_eval_heads,
                                   predicts_stress)
from lamm_ds.engine.host_memory import apply_keep_host_memory
from lamm_ds.engine.launcher_watch import watch_launcher
from lamm_ds.engine.model_init import build_or_init_model
from lamm_ds.engine.optim import build_optimizer
from lamm_ds.engine.replay import select_fps
from lamm_ds.engine.rundir import (CONFIG_FILE, DS_CONFIG_FILE, ConfigChangedError, RunDirBusyError, RunDirLock,
                                   add_resume_arguments, check_resume_arguments, check_resume_config)
from lamm_ds.engine.schedule import build_scheduler, check_edge_basis, resolve_cost_model, save_run_cost_model
from lamm_ds.engine.step import AllReduceTimer, NonFiniteGuard, train_step
from lamm_ds.engine.telemetry import Telemetry, environment, rank_environment
from lamm_ds.graphs import GraphDataset
from lamm_ds.shards.dataset import DatasetError

log = logging.getLogger("lamm_ds")


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
        allow_config_change: bool = False, trust_pickle: bool = False) -> dict:
    """Train; returns a summary (on every rank). The process group is left and the environment
    restored afterwards, so one process can run several trainings one after another."""
    saved, owned = rendezvous_env(), not dist.is_initialized()
    rank, world, device = setup_distributed(cfg.faults.collective_timeout_s)
    apply_keep_host_memory(device, cfg.keep_host_memory)  # before the model's first allocations
    watch_launcher(rank)
    lock = RunDirLock(run_dir)
    try:
        return _run(cfg, Path(run_dir), rank, world, device, resume, progress, allow_config_change,
                    trust_pickle, lock)
    finally:
        lock.release()
        leave_process_group(saved, destroy=owned)


def _run(cfg: RunConfig, run_dir: Path, rank: int, world: int, device: torch.device, resume: bool,
         progress: bool, allow_config_change: bool, trust_pickle: bool, lock: RunDirLock) -> dict:
    import deepspeed

    ckpt_root = run_dir / "checkpoints"
    claim_run_dir_on_every_rank(cfg, run_dir, rank, world, device, resume, allow_config_change, lock)
    started_with, cfg = cfg, with_replay(cfg)  # the run directory keeps the config as given
    datasets, cost_model = open_run_data(cfg, run_dir, rank)
    plan_ranks = check_plan_ranks(cfg, world)
    model = build_or_init_model(cfg, datasets, rank)
    datasets = select_fps(model, datasets, cfg.data.datasets, run_dir, rank)
    check_datasets_contribute(datasets, cfg, predicts_stress(model.cfg))
    check_eval_heads(model, cfg.eval_datasets)
    ds_ids = torch.tensor([model.dataset_index(d.name) for d in datasets])
    ds_config = deepspeed_config(cfg, world)
    optimizer, lr_schedule = build_optimizer(model, cfg)
    check_zero_stage(cfg, ds_config, model.cfg)
    check_compile(cfg, ds_config, model.cfg)
    check_ema(cfg, ds_config)
    if cfg.compile:  # in place: parameter names, checkpoints and exports stay those of the plain module
        model.compile(dynamic=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_schedule,
                                           config=ds_config, dist_init_required=False)
    start_step = 0
    if resume:
        start_step = load_checkpoint(engine, ckpt_root, rank, trust_pickle)
        if rank == 0:
            log.info("resumed from %s at step %d", ckpt_root / latest_tag(ckpt_root), start_step)
    ema = start_ema(engine, cfg.optim.ema_decay, ckpt_root / latest_tag(ckpt_root) if resume else None)
    record_run_start(run_dir, rank, world, started_with, ds_config, resume)
    graphs = GraphDataset(datasets, model.cfg.cutoff, model.cfg.max_neighbors,
                          strict=model.cfg.max_neighbors_strict)
    stream = run_stream(cfg, datasets)
    scheduler = build_scheduler(cfg, datasets, stream, plan_ranks, cost_model)
    loader = step_loader(graphs, scheduler, rank, world, start_step, cfg.max_steps, cfg.data.num_workers)
    allreduce = AllReduceTimer(engine)
    telemetry = Telemetry(cfg, run_dir, rank, world, device, start_step, resume, progress, model.dataset_names)
    curve = EvalCurve(cfg, model.cfg, run_dir, telemetry.writer, fresh=start_step == 0) if rank == 0 else None
    guard = NonFiniteGuard(cfg, rank, model.dataset_names, datasets)
    try:
        if start_step == 0:
            record_curve(curve, engine, cfg, 0, ema)
        tag = latest_tag(ckpt_root) if resume else None
        for step, (epoch, batch, predicted) in zip(range(start_step, cfg.max_steps), loader):
            allreduce.seconds = 0.0
            result = train_step(engine, batch, epoch, step, cfg, ds_ids, device, world, guard)
            if result is None:  # skipped on every rank (non-finite loss)
                telemetry.bar.update(1)
                continue
            if ema is not None:
                ema.update(engine)
            telemetry.after_step(step, result, allreduce.seconds, predicted, engine, guard.skipped)
            record_curve(curve, engine, cfg, step + 1, ema)
            if step == cfg.max_steps - 1 or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
                tag = save_checkpoint(engine, ckpt_root, step, cfg.checkpoint.keep_last, rank, world,
                                      ema.save if ema is not None else None)
        telemetry.bar.close()
        return finish_run(engine, model, datasets, cfg, run_dir, tag, rank, world, start_step, guard.skipped,
                          telemetry.history, telemetry.writer, ema)
    finally:
        telemetry.close()


# --------------------------------------------------------------------------------------------------
# the chapters of the story


def claim_run_dir(cfg: RunConfig, run_dir: Path, world: int, resume: bool, allow_config_change: bool,
                  lock: RunDirLock) -> None:
    """Rank 0: lock the run directory for this job; on resume, check the checkpoint and that the
    config is the one the run was started with; without resume, refuse a directory with checkpoints."""
    ckpt_root = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    if resume:
        tag = latest_tag(ckpt_root)
        if tag is None:
            raise CheckpointError(f"{ckpt_root / LATEST}: no checkpoint to resume from")
        manifest = verify_checkpoint(ckpt_root, tag)
        changes = check_resume_config(run_dir, to_yaml(cfg), deepspeed_config(cfg, world), allow_config_change,
                                      int(manifest["next_step"]), *config_defaults())
        for key, old, new in changes:
            log.warning("resume with a changed config (--allow-config-change): %s: %r -> %r", key, old, new)
    elif (ckpt_root / LATEST).exists():
        raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume to continue, "
                              "or choose another --run-dir")


def claim_run_dir_on_every_rank(cfg: RunConfig, run_dir: Path, rank: int, world: int, device: torch.device,
                                resume: bool, allow_config_change: bool, lock: RunDirLock) -> None:
    """:func:`claim_run_dir` on rank 0; every rank stops if it failed."""
    error = None
    if rank == 0:
        try:
            claim_run_dir(cfg, run_dir, world, resume, allow_config_change, lock)
        except Exception as exc:  # every rank stops; rank 0 raises this one
            error = exc
    agree(error, rank, device)


def open_run_data(cfg: RunConfig, run_dir: Path, rank: int):
    """(datasets, cost model). One process generates the demo data (file lock inside) while the
    others wait at the barrier; rank 0 also records the cost model the plans use (read back by
    every rank, and on resume)."""
    if rank == 0:
        datasets = open_datasets(cfg.data.datasets, cfg.data.demo_dir, cfg.seed)
        save_run_cost_model(resolve_cost_model(cfg, run_dir), run_dir)
    dist.barrier()
    if rank != 0:
        datasets = open_datasets(cfg.data.datasets, None, cfg.seed)
    cost_model = resolve_cost_model(cfg, run_dir)
    if rank == 0:
        check_edge_basis(cost_model, datasets)
    return datasets, cost_model


def check_plan_ranks(cfg: RunConfig, world: int) -> int:
    """The number of ranks the scheduler plans for (``schedule.plan_ranks``, default the world size)."""
    plan_ranks = cfg.schedule.plan_ranks or world
    if plan_ranks % world:
        raise ValueError(f"schedule.plan_ranks={plan_ranks} must be a multiple of the world size {world}")
    if cfg.data.batch_size < plan_ranks:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is smaller than the {plan_ranks} ranks")
    return plan_ranks


def record_run_start(run_dir: Path, rank: int, world: int, cfg: RunConfig, ds_config: dict, resume: bool) -> None:
    """Each rank's pid (for tests and operators); on rank 0 the configs the run was started with
    (a resume never overwrites them) and this process's environment."""
    pid_dir = run_dir / "pids"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank:05d}.pid").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    rank_dir = run_dir / "ranks"  # what reached each rank (multi-node: the remote environment)
    rank_dir.mkdir(parents=True, exist_ok=True)
    (rank_dir / f"rank{rank:05d}.json").write_text(json.dumps(rank_environment(rank), indent=2))
    if rank != 0:
        return
    if not resume or not (run_dir / CONFIG_FILE).is_file():
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
    if not resume or not (run_dir / DS_CONFIG_FILE).is_file():
        (run_dir / DS_CONFIG_FILE).write_text(json.dumps(ds_config, indent=2))
    (run_dir / "environment.json").write_text(json.dumps(environment(world), indent=2))


def record_curve(curve: EvalCurve | None, engine, cfg: RunConfig, steps_done: int,
                 ema: WeightEMA | None = None) -> None:
    """A learning-curve point when one is due: rank 0 evaluates (an fp32 view of) the module, or a
    copy holding the weights' EMA when there is one, while the other ranks wait at the barrier."""
    if not EvalCurve.is_due(cfg, steps_done):
        return
    if curve is not None:
        module = engine.module
        if ema is not None:
            module = ema.module_copy(module)
        elif next(module.parameters()).dtype != torch.float32:
            module = copy.deepcopy(module).float()
        curve.record(module, steps_done)  # evaluate() restores the module's training mode
    dist.barrier()


# --------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str], finetune: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="lamm-ds fine-tuning" if finetune else "lamm-ds pre-training")
    p.add_argument("--config", action="append", default=None, help="YAML config (repeatable; merged in order)")
    p.add_argument("--run-dir", default=None, help="where checkpoints, logs and the exported model go")
    p.add_argument("--max-steps", type=int, default=None)
    add_resume_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if finetune:
        p.add_argument("--init", required=False, default=None,
                       help="pre-trained model: exported file, or a run directory holding model.safetensors")
        p.add_argument("--replay", action="append", default=None, metavar="DATASET[:N]",
                       help="mix this pre-training dataset (a lamm-ds dataset directory) into the fine-tuning, "
                            "N of its structures (default: all), into its own pre-trained head (repeatable; "
                            "finetune.replay_share, finetune.replay_selection)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden=128 data.batch_size=32")
    return p.parse_intermixed_args(argv)  # options may follow key=value overrides


# Errors that mean bad input, a refused start or a diverged run (each names its file, key or
# rank): reported as one line and exit code 2; anything else keeps its traceback.
EXPECTED_ERRORS = (ConfigError, CheckpointError, ConfigChangedError, RunDirBusyError, UselessDatasetError,
                   DatasetError, RendezvousError, FloatingPointError, FileNotFoundError)


def main(argv: list[str] | None = None, default_config: str = "configs/demo.yaml",
         default_run_dir: str = "runs/pretrain", finetune: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lamm-ds %(levelname)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv, finetune)
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if finetune and args.init is not None:
        overrides.append(f"finetune.init={args.init}")
    if finetune and args.replay:
        overrides.append(f"finetune.replay={json.dumps(args.replay)}")
    files = [str(resolve_path(f)) for f in (args.config or [default_config])]
    check_resume_arguments(args)
    try:
        cfg = load_config(files, overrides)
        if finetune and cfg.finetune.init is None:
            raise SystemExit("finetune: pass --init <exported model or run directory> (or finetune.init=...)")
        run(cfg, Path(args.run_dir or default_run_dir), resume=args.resume, progress=not args.quiet,
            allow_config_change=args.allow_config_change, trust_pickle=args.trust_pickle)
    except EXPECTED_ERRORS as exc:  # bad input or a refused start: the message says it all
        log.error("%s: %s", os.environ.get("RANK") and f"rank {os.environ['RANK']}" or "error", exc)
        return 2
    return 0
