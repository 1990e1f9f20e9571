"""DeepSpeed pre-training and fine-tuning (``launch/pretrain.py``, ``launch/finetune.py``).

The same script runs under ``deepspeed`` (single or multi-node), ``torchrun`` and plain ``python``.
One optimiser step consumes ``data.batch_size`` draws of the mixture stream, split over the ranks
by the scheduler (``schedule.strategy``; lamm_ds/scheduler, docs/load_balancing.md); every rank
computes its share from (seed, step) alone, so no sampler state needs to be communicated and a
resumed run continues with exactly the draws it would have seen.
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import pickle
import platform
import random
import shutil
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lamm_ds.engine.config import ConfigError, RunConfig, load_config, model_config, to_yaml
from lamm_ds.engine.data import fit_stats, open_datasets
from lamm_ds.engine.evaluate import evaluate_entries
from lamm_ds.engine.guards import (UselessDatasetError, check_datasets_contribute, check_eval_heads,
                                  merge_trained_elements, nonfinite_structures)
from lamm_ds.engine.launcher_watch import watch_launcher
from lamm_ds.engine.rundir import (CONFIG_FILE, DS_CONFIG_FILE, ConfigChangedError, RunDirBusyError, RunDirLock,
                                   check_resume_config)
from lamm_ds.engine.export import build_potential, export_model, load_model
from lamm_ds.engine.schedule import build_scheduler, check_edge_basis, resolve_cost_model, save_run_cost_model
from lamm_ds.engine.trainer import EvalCurve, log_evaluation, lr_factor, prepare_batch
from lamm_ds.graphs import GraphDataset, collate
from lamm_ds.loss import local_counts, per_dataset_metrics, summarize_per_dataset, universal_loss
from lamm_ds.mixture import MixtureStream
from lamm_ds.model.potential import Potential
from lamm_ds.scheduler import StepScheduler, rank_slice
from lamm_ds.shards.dataset import DatasetError

log = logging.getLogger("lamm_ds")
REPO_ROOT = Path(__file__).resolve().parents[2]
COMPLETE = "lamm_complete.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A missing, partial or corrupt checkpoint; the message names the file."""


# --------------------------------------------------------------------------------------------------
# process group


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(timeout_s: int) -> tuple[int, int, torch.device]:
    """Join (or, under plain ``python``, create) the process group; returns (rank, world, device)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # plain `python launch/pretrain.py`: a one-process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    import deepspeed

    if not torch.cuda.is_available():
        # The CPU backend JIT-compiles a shared-memory op (~30 s) used only for inference all-reduce.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


# --------------------------------------------------------------------------------------------------
# data


class RankStepBatches(torch.utils.data.Dataset):
    """Item ``s``: (epoch, this rank's batch of step ``s``, predicted seconds of every rank (world,)).

    The split of a step's draws over ranks is the scheduler's plan (``schedule.strategy``; "fixed":
    draw ``d`` goes to rank ``d % world``). With ``schedule.plan_ranks = P > world`` the plan is
    made for P ranks and real rank r runs plan slots ``[r*P/world, (r+1)*P/world)`` concatenated."""

    def __init__(self, graphs: GraphDataset, scheduler: StepScheduler, rank: int, world: int):
        self.graphs, self.scheduler, self.rank, self.world = graphs, scheduler, rank, world
        self.slots = rank_slice(scheduler.ranks, world, rank)
        self.per = scheduler.ranks // world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int):
        plan = self.scheduler.plan(step)
        mine = (plan.rank >= self.slots.start) & (plan.rank < self.slots.stop)
        samples = [self.graphs[(int(k), int(i), int(p))]
                   for k, i, p in zip(plan.ks[mine], plan.idx[mine], plan.positions[mine])]
        if self.per == 1:
            predicted = plan.predicted
        else:  # real rank = consecutive plan slots in one micro-batch
            real = plan.rank // self.per
            predicted = self.scheduler.cost_model.batch_cost(
                np.bincount(real, plan.natoms, self.world), np.bincount(real, plan.nedges, self.world),
                np.bincount(real, minlength=self.world))
        return plan.epoch, collate(samples), torch.as_tensor(np.asarray(predicted, dtype=np.float64))


# --------------------------------------------------------------------------------------------------
# checkpoints


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def latest_tag(ckpt_root: Path) -> str | None:
    file = ckpt_root / LATEST
    if not file.is_file():
        return None
    tag = file.read_text().strip()
    if not tag:
        raise CheckpointError(f"{file}: empty checkpoint pointer")
    return tag


def verify_checkpoint(ckpt_root: Path, tag: str) -> dict:
    """Check that every file listed at save time is present with the same size and hash."""
    tag_dir = ckpt_root / tag
    marker = tag_dir / COMPLETE
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: checkpoint directory missing (pointer in {ckpt_root / LATEST})")
    try:
        manifest = json.loads(marker.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{marker}: missing; checkpoint {tag} was never completed") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{marker}: corrupt: {exc}") from exc
    for name, meta in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint {tag}")
        if path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path}: corrupt (size or checksum differs from when it was saved)")
    return manifest


def save_checkpoint(engine, ckpt_root: Path, step: int, keep_last: int, rank: int, world: int) -> str:
    """All ranks: DeepSpeed states + per-rank RNG; then rank 0 seals it and moves ``latest``.

    ``latest`` is replaced atomically only after every file is written and hashed, so a kill at any
    moment leaves it pointing to a complete checkpoint.
    """
    tag = f"step{step + 1:08d}"
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"next_step": step + 1}, save_latest=False)
    tag_dir = ckpt_root / tag
    (tag_dir / f"rng_rank{rank:05d}.json").write_text(json.dumps(_rng_state()))
    dist.barrier()
    if rank == 0:
        files = {str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != COMPLETE}
        tmp = tag_dir / (COMPLETE + ".tmp")
        tmp.write_text(json.dumps({"tag": tag, "next_step": step + 1, "world_size": world, "files": files}))
        os.replace(tmp, tag_dir / COMPLETE)
        pointer = ckpt_root / (LATEST + ".tmp")
        pointer.write_text(tag)
        os.replace(pointer, ckpt_root / LATEST)
        tags = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags:
            if old < tag and (old not in tags[-keep_last:] or not (ckpt_root / old / COMPLETE).exists()):
                shutil.rmtree(ckpt_root / old, ignore_errors=True)
    dist.barrier()
    return tag


def _deepspeed_safe_globals() -> list:
    """Classes DeepSpeed pickles into its checkpoints besides tensors and builtins (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3 x fp32/bf16 checkpoints).
    The weights-only unpickler may rebuild these (plain data holders), and nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_loader(trust_pickle: bool = False):
    """``torch.load`` for DeepSpeed's checkpoint engine that never runs code from the file: the
    weights-only unpickler with :func:`_deepspeed_safe_globals`; ``trust_pickle`` restores
    DeepSpeed's full unpickling (only for checkpoints you trust)."""
    safe = _deepspeed_safe_globals()

    def load(path: str, map_location=None):
        if trust_pickle:
            return torch.load(path, map_location=map_location, weights_only=False)
        try:
            with torch.serialization.safe_globals(safe):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path}: holds Python objects outside the safe list, and loading it could run code from the "
                f"file ({first}). Resume with --trust-pickle only if you trust this checkpoint") from None

    return load


def load_checkpoint(engine, ckpt_root: Path, rank: int, trust_pickle: bool = False) -> int:
    """Restore model, optimiser, LR schedule, loss scale and RNG; returns the next step to run."""
    tag = latest_tag(ckpt_root)
    if tag is None:
        raise CheckpointError(f"{ckpt_root / LATEST}: no checkpoint to resume from")
    manifest = verify_checkpoint(ckpt_root, tag)
    engine.checkpoint_engine.load = weights_only_loader(trust_pickle)
    try:
        path, client = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{ckpt_root / tag}: DeepSpeed could not load it: {exc}") from exc
    if path is None:
        raise CheckpointError(f"{ckpt_root / tag}: DeepSpeed found no loadable checkpoint there")
    rng_file = ckpt_root / tag / f"rng_rank{rank:05d}.json"
    if rng_file.is_file():
        _set_rng_state(json.loads(rng_file.read_text()))
    return int(client.get("next_step", manifest["next_step"]))


# --------------------------------------------------------------------------------------------------
# model, optimiser, DeepSpeed config


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def deepspeed_config(cfg: RunConfig, world: int) -> dict:
    """The JSON config with lamm-ds's batch bookkeeping and clipping filled in.

    Per-rank batches vary in size (a step's draws are split over ranks, later by cost), so the
    nominal ``train_micro_batch_size_per_gpu`` is ceil(batch_size / world): DeepSpeed only uses it
    for its sample counters. Exact gradients come from the loss's global normalisation instead.
    """
    path = _resolve(cfg.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(f"{path}: remove 'optimizer'/'scheduler'; lamm-ds passes AdamW and its LR schedule "
                         "from the run config (optim.*)")
    if (ds.get("fp16") or {}).get("enabled") and not torch.cuda.is_available():
        raise ValueError(f"{path}: fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use bf16 or fp32")
    micro = math.ceil(cfg.data.batch_size / world)
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
              train_batch_size=micro * world, gradient_clipping=float(cfg.optim.grad_clip))
    return ds


def param_groups(model: Potential, cfg: RunConfig) -> list[dict]:
    ft = cfg.finetune
    backbone = [p for n, p in model.named_parameters() if not n.startswith("heads.") and p.requires_grad]
    heads = [p for n, p in model.named_parameters() if n.startswith("heads.") and p.requires_grad]
    groups = [{"params": heads, "lr": cfg.optim.lr, "name": "heads"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.optim.lr * ft.backbone_lr_ratio, "name": "backbone"})
    return groups


def build_or_init_model(cfg: RunConfig, datasets, rank: int) -> Potential:
    """A fresh model, or (fine-tuning) a pre-trained one with heads added for new datasets."""
    ft = cfg.finetune
    if ft.init is None:
        mcfg = model_config(cfg)
        stats = {d.name: fit_stats(d, mcfg.max_z, cfg.data.stats_samples, cfg.seed) for d in datasets}
        torch.manual_seed(cfg.seed)
        return build_potential(cfg.model_kind, mcfg, [d.name for d in datasets], stats)
    model = load_pretrained(ft.init)
    model = finetune_force_mode(model, ft.forces, ft.init, rank)
    if rank == 0:
        report_new_elements(model, datasets)
    for d in datasets:
        if d.name not in model.dataset_names:
            stats = fit_stats(d, model.cfg.max_z, cfg.data.stats_samples, cfg.seed)
            model.add_dataset(d.name, stats, init_from=ft.head_init_from)
            if rank == 0:
                log.info("fine-tuning: new head %r (references fitted on %s)", d.name, d.path)
    if ft.freeze_backbone:
        for n, p in model.named_parameters():
            if not n.startswith("heads."):
                p.requires_grad_(False)
    return model.train()


DIRECT_FORCES_WARNING = (
    "fine-tuning %s keeps its direct force head (model.forces=direct): its forces are not the gradient of its "
    "energy, so molecular dynamics does not conserve energy (NVE drifts) and relaxations can go uphill. "
    "Pass finetune.forces=conservative to fine-tune with F = -dE/dx instead (the direct force head is dropped; "
    "training is slower: it needs a double backward), or finetune.forces=direct to keep direct forces knowingly.")


def finetune_force_mode(model: Potential, forces: str | None, source: str, rank: int) -> Potential:
    """The pre-trained model with the requested force mode; warns when a direct-force model is
    fine-tuned without the user having chosen direct forces."""
    current = model.cfg.forces
    if forces is None:
        if current == "direct" and rank == 0:
            log.warning(DIRECT_FORCES_WARNING, source)
        return model
    if forces == current:
        return model
    new_cfg = dataclasses.replace(model.cfg, forces=forces, stress=False)
    converted = type(model)(new_cfg, model.dataset_names)
    missing, unexpected = converted.load_state_dict(model.state_dict(), strict=False)
    converted.trained_elements = getattr(model, "trained_elements", None)
    if rank == 0:
        if forces == "conservative":
            log.warning("fine-tuning: switched %s from direct to conservative forces (F = -dE/dx); dropped the "
                        "direct force head (%d tensors)", source, len(unexpected))
        else:
            log.warning("fine-tuning: switched %s from conservative to direct forces; the new direct force "
                        "head (%d tensors) starts from random weights", source, len(missing))
    bad = [k for k in missing if not _is_force_head_key(k)] + [k for k in unexpected if not _is_force_head_key(k)]
    if bad:
        raise ValueError(f"{source}: cannot switch to forces={forces}: weights {bad[:5]} do not carry over")
    return converted.train()


def _is_force_head_key(key: str) -> bool:
    return key.startswith(("force_head.", "force_block.", "backbone.force_block."))


def report_new_elements(model: Potential, datasets) -> None:
    """Say loudly which elements of the fine-tuning data the pre-trained backbone never saw."""
    from ase.data import chemical_symbols

    seen = getattr(model, "trained_elements", None)
    wanted = sorted({int(z) for d in datasets for z in d.manifest.get("elements", [])})
    if seen is None:
        log.warning("fine-tuning: the pre-trained model does not record which elements it was trained on "
                    "(exported by an older lamm-ds, or converted); elements new to it cannot be reported")
        return
    known = set().union(*map(set, seen.values())) if seen else set()
    new = [z for z in wanted if z not in known]
    if new:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in new)
        log.warning("fine-tuning: %d element(s) the pre-trained model never saw: %s. Their embedding rows were "
                    "never trained and start from their random initial values, and no pre-trained head has a "
                    "reference energy for them (the new head fits one from the fine-tuning data). Expect the "
                    "fine-tune to gain little over training from scratch for structures holding them.",
                    len(new), names)


def load_pretrained(path: str) -> Potential:
    """An exported model file, or a run/checkpoint directory holding one (``model.safetensors``)."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / "model.safetensors", p.parent / "model.safetensors"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(f"{p}: no model.safetensors in this run/checkpoint directory "
                                  "(export one, or point --init at the file)")
        p = found
    return load_model(p)


def fp32_state_dict(engine, ckpt_root: Path | None, tag: str | None, rank: int) -> dict | None:
    """Full-precision weights on rank 0 (None elsewhere), from the fp32 master copies when training
    in bf16/fp16, and gathered from the shards under ZeRO."""
    module = engine.module
    stage = engine.zero_optimization_stage()
    if stage == 0:
        state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                 for k, v in module.state_dict().items()}
        opt = engine.optimizer
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # mixed precision: master weights
            names = {id(p): n for n, p in module.named_parameters()}
            for low_group, master_group in zip(opt.fp16_groups, opt.fp32_groups):
                for low, master in zip(low_group, master_group):
                    state[names[id(low)]] = master.detach().float().cpu().clone()
        return state if rank == 0 else None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    dist.barrier()
    state = None
    if rank == 0:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
        for k, v in module.state_dict().items():  # buffers (references, scales) are not in ZeRO shards
            if k not in state:
                state[k] = v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
    dist.barrier()
    return state


def _environment(world: int) -> dict:
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


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# --------------------------------------------------------------------------------------------------
# the run


def agree(error: BaseException | None, rank: int, device: torch.device) -> None:
    """Every rank raises if any rank failed a start-up check (instead of the healthy ranks waiting
    for the collective timeout); the failing rank raises its own error."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag)
    if error is not None:
        raise error
    if int(flag.item()):
        raise RuntimeError(f"rank {rank}: another rank refused to start (its error is logged above)")


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
                                      int(manifest["next_step"]))
        for key, old, new in changes:
            log.warning("resume with a changed config (--allow-config-change): %s: %r -> %r", key, old, new)
    elif (ckpt_root / LATEST).exists():
        raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume to continue, "
                              "or choose another --run-dir")


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
        allow_config_change: bool = False, trust_pickle: bool = False) -> dict:
    """Train under DeepSpeed; returns a summary (on every rank)."""
    rank, world, device = setup_distributed(cfg.faults.collective_timeout_s)
    watch_launcher(rank)
    lock = RunDirLock(run_dir)
    try:
        return _run(cfg, Path(run_dir), rank, world, device, resume, progress, allow_config_change,
                    trust_pickle, lock)
    finally:
        lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: RunConfig, run_dir: Path, rank: int, world: int, device: torch.device, resume: bool,
         progress: bool, allow_config_change: bool, trust_pickle: bool, lock: RunDirLock) -> dict:
    import deepspeed
    from tqdm import tqdm

    ckpt_root = run_dir / "checkpoints"
    error = None
    if rank == 0:
        try:
            claim_run_dir(cfg, run_dir, world, resume, allow_config_change, lock)
        except Exception as exc:  # every rank stops; rank 0 raises this one
            error = exc
    agree(error, rank, device)
    # One process generates the demo data (file lock inside); the others wait at the barrier.
    # Rank 0 also records the cost model the plans use (read back by every rank, and on resume).
    if rank == 0:
        datasets = open_datasets(cfg.data.datasets, cfg.data.demo_dir)
        save_run_cost_model(resolve_cost_model(cfg, run_dir), run_dir)
    dist.barrier()
    if rank != 0:
        datasets = open_datasets(cfg.data.datasets, None)
    cost_model = resolve_cost_model(cfg, run_dir)
    if rank == 0:
        check_edge_basis(cost_model, datasets)
    plan_ranks = cfg.schedule.plan_ranks or world
    if plan_ranks % world:
        raise ValueError(f"schedule.plan_ranks={plan_ranks} must be a multiple of the world size {world}")
    if cfg.data.batch_size < plan_ranks:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is smaller than the {plan_ranks} ranks")
    model = build_or_init_model(cfg, datasets, rank)
    check_datasets_contribute(datasets, cfg, bool(getattr(model.cfg, "stress", False)))
    check_eval_heads(model, cfg.eval_datasets)
    names = [d.name for d in datasets]
    ds_ids = torch.tensor([model.dataset_index(n) for n in names])
    ds_config = deepspeed_config(cfg, world)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if (ds_config.get("zero_optimization") or {}).get("stage", 0) == 3 and \
            getattr(model.cfg, "forces", "direct") == "conservative":
        raise ValueError(f"{cfg.deepspeed_config}: ZeRO stage 3 cannot train conservative forces (DeepSpeed "
                         "fails on the double backward through partitioned parameters); use ZeRO 0-2, or "
                         "model forces=direct")
    if cfg.eval_every and (ds_config.get("zero_optimization") or {}).get("stage", 0) == 3:
        raise ValueError(f"eval_every={cfg.eval_every}: evaluation during training needs whole parameters on "
                         f"rank 0, which ZeRO stage 3 ({cfg.deepspeed_config}) partitions; use ZeRO 0-2 or "
                         "eval_every=0 (the final evaluation still runs)")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    start_step = 0
    if resume:
        start_step = load_checkpoint(engine, ckpt_root, rank, trust_pickle)
        if rank == 0:
            log.info("resumed from %s at step %d", ckpt_root / latest_tag(ckpt_root), start_step)
    pid_dir = run_dir / "pids"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank:05d}.pid").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    if rank == 0:
        # The configs record what the run was started with: a resume never overwrites them.
        if not resume or not (run_dir / CONFIG_FILE).is_file():
            (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
        if not resume or not (run_dir / DS_CONFIG_FILE).is_file():
            (run_dir / DS_CONFIG_FILE).write_text(json.dumps(ds_config, indent=2))
        (run_dir / "environment.json").write_text(json.dumps(_environment(world), indent=2))
    graphs = GraphDataset(datasets, model.cfg.cutoff, model.cfg.max_neighbors)
    stream = MixtureStream([len(d) for d in datasets], cfg.data.temperature, cfg.seed, cfg.data.epoch_length)
    scheduler = build_scheduler(cfg, datasets, stream, plan_ranks, cost_model)
    loader = torch.utils.data.DataLoader(
        RankStepBatches(graphs, scheduler, rank, world), batch_size=None,
        sampler=range(start_step, cfg.max_steps), num_workers=cfg.data.num_workers)
    # Time spent inside DeepSpeed's gradient all-reduce (waiting for the slowest rank + transfer);
    # busy time = step time minus the collectives. With ZeRO-2/3 part of the reduction runs in
    # backward hooks and is counted as busy.
    comm = {"allreduce": 0.0}
    if hasattr(engine, "allreduce_gradients"):
        _allreduce = engine.allreduce_gradients

        def _timed_allreduce(*args, **kwargs):
            t = time.perf_counter()
            try:
                return _allreduce(*args, **kwargs)
            finally:
                comm["allreduce"] += time.perf_counter() - t

        engine.allreduce_gradients = _timed_allreduce
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step)
    float_dtype = torch.float32
    curve = EvalCurve(cfg, model.cfg, run_dir, writer, fresh=start_step == 0) if rank == 0 else None

    def record_curve(steps_done: int) -> None:
        """Rank 0 evaluates (an fp32 view of) the module while the others wait at the barrier."""
        if not EvalCurve.is_due(cfg, steps_done):
            return
        if curve is not None:
            module = engine.module
            if next(module.parameters()).dtype != torch.float32:
                module = copy.deepcopy(module).float()
            curve.record(module, steps_done)  # evaluate() restores the module's training mode
        dist.barrier()

    if start_step == 0:
        record_curve(0)
    bad_streak, skipped, history = 0, 0, []
    tag = latest_tag(ckpt_root) if resume else None
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (progress and rank == 0), desc="pretrain",
               file=sys.stderr)
    metrics_file = None
    if rank == 0:
        # On resume, drop records of steps that will be run again, so the log reads as one run.
        metrics_path = run_dir / "metrics.jsonl"
        kept = [line for line in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                if line.strip() and json.loads(line)["step"] < start_step] if resume else []
        metrics_file = open(metrics_path, "w")
        metrics_file.writelines(line + "\n" for line in kept)
    try:
        for step, (epoch, batch, predicted) in zip(range(start_step, cfg.max_steps), loader):
            t0 = time.perf_counter()
            batch = batch.replace(dataset_id=ds_ids[batch.dataset_id])
            batch = prepare_batch(batch, cfg, epoch).to(device, float_dtype)
            t_sync = time.perf_counter()
            counts = local_counts(batch).to(device)
            dist.all_reduce(counts)
            t_sync = time.perf_counter() - t_sync
            out = engine(batch)
            loss, metrics = universal_loss(out, batch, cfg.loss, global_counts=counts, world_size=world)
            if step in cfg.faults.inject_nan_steps:
                loss = loss * float("nan")
            finite = torch.tensor([float(torch.isfinite(loss).item())], device=device)
            flags = [torch.zeros_like(finite) for _ in range(world)]
            t1 = time.perf_counter()
            dist.all_gather(flags, finite)
            t_sync += time.perf_counter() - t1
            bad_ranks = [r for r, f in enumerate(flags) if f.item() == 0]
            if bad_ranks:
                bad_streak += 1
                skipped += 1
                culprits = nonfinite_structures(out, batch, model.dataset_names, datasets) \
                    if rank in bad_ranks else ""
                if culprits:
                    log.warning("step %d, rank %d: %s", step, rank, culprits)
                if rank == 0:
                    log.warning("step %d: non-finite loss on rank(s) %s; step skipped on every rank (%d in a row)",
                                step, bad_ranks, bad_streak)
                if bad_streak >= cfg.faults.nan_abort_after:
                    raise FloatingPointError(
                        f"{bad_streak} consecutive steps with a non-finite loss (last: step {step}, rank(s) "
                        f"{bad_ranks}{'; on this rank ' + culprits if culprits else ''}); aborting. Lower "
                        "optim.lr or check the data.")
                engine.zero_grad() if hasattr(engine, "zero_grad") else None
                bar.update(1)
                continue
            bad_streak = 0
            comm["allreduce"] = 0.0
            engine.backward(loss)
            manual_norm = None
            if engine.zero_optimization_stage() == 0:  # DeepSpeed reports no norm at stage 0
                grads = [p.grad.float().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
                manual_norm = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
            engine.step()
            elapsed = time.perf_counter() - t0
            # per rank: step time, busy time (without collectives), all-reduce time, predicted time
            step_time = torch.tensor([elapsed, elapsed - t_sync - comm["allreduce"], comm["allreduce"],
                                      float(predicted[rank])], dtype=torch.float64, device=device)
            times = [torch.zeros_like(step_time) for _ in range(world)]
            dist.all_gather(times, step_time)
            sizes = torch.tensor([batch.num_graphs, batch.num_atoms, batch.num_edges], dtype=torch.float64,
                                 device=device)
            dist.all_reduce(sizes)
            per_ds = per_dataset_metrics(out, batch, model.dataset_names).to(device)
            dist.all_reduce(per_ds)
            loss_sum = loss.detach().clone()
            dist.all_reduce(loss_sum)
            if rank == 0:
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
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.max_steps - 1):
                grad_norm = engine.get_global_grad_norm() if manual_norm is None else manual_norm
                record = {"step": step, "loss": float(loss_sum) / world, "lr": engine.get_lr()[0],
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          "loss_scale": float(getattr(engine.optimizer, "cur_scale", 1.0)),
                          "samples_per_s": float(sizes[0] / t.max()), "atoms_per_s": float(sizes[1] / t.max()),
                          "edges_per_s": float(sizes[2] / t.max()), "step_time_max": float(t.max()),
                          "imbalance": float(t.max() / t.mean()), "memory_mb": _memory_mb(device),
                          "skipped_steps": skipped, **sched,
                          **{f"rank{r}/step_time": float(x) for r, x in enumerate(t)},
                          **{f"rank{r}/busy_s": float(x) for r, x in enumerate(busy)},
                          **{f"rank{r}/predicted_s": float(x) for r, x in enumerate(pred)},
                          **{f"dataset/{k}": v for k, v in summarize_per_dataset(per_ds.cpu(), model.dataset_names).items()
                             if math.isfinite(v)}}
                history.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                for k, v in record.items():
                    if k != "step" and v is not None:
                        writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
            record_curve(step + 1)
            last = step == cfg.max_steps - 1
            if last or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
                tag = save_checkpoint(engine, ckpt_root, step, cfg.checkpoint.keep_last, rank, world)
        bar.close()
        state = fp32_state_dict(engine, ckpt_root, tag, rank)
        summary = {"steps": cfg.max_steps, "start_step": start_step, "skipped_steps": skipped,
                   "world_size": world, "history": history}
        if rank == 0:
            export = type(model)(model.cfg, model.dataset_names)
            export.load_state_dict(state)
            export.trained_elements = merge_trained_elements(getattr(model, "trained_elements", None), datasets)
            summary["model_path"] = str(export_model(export, run_dir / "model.safetensors",
                                                     {"steps": cfg.max_steps, "world_size": world}))
            evaluation = evaluate_entries(export, cfg.eval_datasets)
            log_evaluation(writer, evaluation, cfg.max_steps)
            summary["evaluation"] = evaluation
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.info("finished %d steps on %d rank(s): model %s; TensorBoard: tensorboard --logdir %s",
                     cfg.max_steps, world, summary["model_path"], run_dir / "tb")
            for name, m in evaluation.items():
                log.info("  %s: energy MAE %.1f meV/atom, force MAE %.1f meV/Å", name,
                         m["energy_mae_per_atom"] * 1000, m["forces_mae"] * 1000)
        dist.barrier()
        return summary
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()


def parse_args(argv: list[str], finetune: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="lamm-ds fine-tuning" if finetune else "lamm-ds pre-training")
    p.add_argument("--config", action="append", default=None, help="YAML config (repeatable; merged in order)")
    p.add_argument("--run-dir", default=None, help="where checkpoints, logs and the exported model go")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoints/latest")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a config that differs from the run's config.yaml (changes are "
                        "logged in config_changes.jsonl; config.yaml keeps the original)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="with --resume: unpickle the DeepSpeed checkpoint fully (can run code from the file); "
                        "by default only tensors and a short list of DeepSpeed's own classes are loaded")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if finetune:
        p.add_argument("--init", required=False, default=None,
                       help="pre-trained model: exported file, or a run directory holding model.safetensors")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden=128 data.batch_size=32")
    return p.parse_intermixed_args(argv)  # options may follow key=value overrides


# Errors that mean bad input, a refused start or a diverged run (each names its file, key or
# rank): reported as one line and exit code 2; anything else keeps its traceback.
EXPECTED_ERRORS = (ConfigError, CheckpointError, ConfigChangedError, RunDirBusyError, UselessDatasetError,
                   DatasetError, FloatingPointError, FileNotFoundError)


def main(argv: list[str] | None = None, default_config: str = "configs/demo.yaml",
         default_run_dir: str = "runs/pretrain", finetune: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lamm-ds %(levelname)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv, finetune)
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if finetune and args.init is not None:
        overrides.append(f"finetune.init={args.init}")
    files = [str(_resolve(f)) for f in (args.config or [default_config])]
    if (args.allow_config_change or args.trust_pickle) and not args.resume:
        raise SystemExit("--allow-config-change and --trust-pickle only apply with --resume")
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
