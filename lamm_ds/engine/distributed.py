"""The process group: join the one a launcher prepared (deepspeed, torchrun) or make a
one-process group under plain ``python``; start-up checks every rank agrees on."""

from __future__ import annotations

import importlib
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RendezvousError(RuntimeError):
    """The ranks never formed a process group; the message says where they were to meet."""


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
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    except dist.DistError as exc:  # a rank that never arrives: an unreachable host, a failed launcher
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RendezvousError(
            f"the {os.environ.get('WORLD_SIZE')} ranks did not all reach the "
            f"rendezvous at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
            f"{timeout_s} s ({first}). A host in the hostfile may be unreachable over ssh or its launcher "
            "failed (the launcher's pdsh/ssh lines name it); no training step was run "
            "(faults.collective_timeout_s sets this wait)") from None
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def rendezvous_env() -> dict[str, str | None]:
    """The rendezvous variables as they are now, to restore after a run made its own group."""
    return {k: os.environ.get(k) for k in _RENDEZVOUS}


def leave_process_group(saved: dict[str, str | None], destroy: bool = True) -> None:
    """Destroy the process group (when this run created it) and restore the environment
    :func:`rendezvous_env` saw, so an in-process caller (``lamm-ds train``, a notebook) can start
    another run afterwards."""
    if destroy and dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups of this one
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def agree(error: BaseException | None, rank: int, device: torch.device) -> None:
    """Every rank raises if any rank failed a start-up check (instead of the healthy ranks waiting
    for the collective timeout); the failing rank raises its own error."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag)
    if error is not None:
        raise error
    if int(flag.item()):
        raise RuntimeError(f"rank {rank}: another rank refused to start (its error is logged above)")
