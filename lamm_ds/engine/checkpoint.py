"""The checkpoint format: DeepSpeed's states plus per-rank RNG, sealed by ``lamm_complete.json``
(size and SHA-256 of every file) before ``latest`` moves; verified and loaded without unpickling
code; full-precision weights for export."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lamm_ds.safe_load import RefusedPickleError, load_weights_only

COMPLETE = "lamm_complete.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A missing, partial or corrupt checkpoint; the message names the file."""


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


def save_checkpoint(engine, ckpt_root: Path, step: int, keep_last: int, rank: int, world: int,
                    rank0_extra: Callable[[Path], object] | None = None) -> str:
    """All ranks: DeepSpeed states + per-rank RNG; then rank 0 seals it and moves ``latest``.

    ``rank0_extra(tag_dir)``: rank 0 writes more state there (the weights' EMA) before the seal, so
    ``lamm_complete.json`` covers it too. ``latest`` is replaced atomically only after every file
    is written and hashed, so a kill at any moment leaves it pointing to a complete checkpoint.
    """
    tag = f"step{step + 1:08d}"
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"next_step": step + 1}, save_latest=False)
    tag_dir = ckpt_root / tag
    (tag_dir / f"rng_rank{rank:05d}.json").write_text(json.dumps(_rng_state()))
    if rank == 0 and rank0_extra is not None:
        rank0_extra(tag_dir)
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
            return load_weights_only(path, safe, map_location=map_location)
        except RefusedPickleError as exc:
            wanted = f"it needs {', '.join(exc.globals)}" if exc.globals else exc.detail
            raise CheckpointError(
                f"{path}: holds Python objects outside the safe list, and loading it could run code from the "
                f"file ({wanted}). Resume with --trust-pickle only if you trust this checkpoint") from None

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
