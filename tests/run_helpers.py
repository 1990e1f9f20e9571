"""Shared by the tests that start training runs as subprocesses (python, torchrun, deepspeed)."""

import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A model and batch small enough that a step takes milliseconds on one CPU thread.
TINY = ["model.hidden=16", "model.layers=2", "model.num_rbf=8", "model.cutoff=4.0", "model.max_neighbors=12",
        "data.batch_size=6", "log_every=1", "optim.lr=2e-3", "optim.warmup_steps=2", "data.stats_samples=50",
        "faults.collective_timeout_s=60"]


def child_env() -> dict:
    """This environment without the rendezvous variables an in-process fixture may have set, one
    OpenMP thread per rank, the CPU accelerator, unbuffered output."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, exited but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for(predicate, timeout: float, poll: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def complete_checkpoint(run_dir) -> bool:
    """True once ``run_dir`` holds a complete checkpoint (the earliest point a resume can start from)."""
    from pathlib import Path

    latest = Path(run_dir) / "checkpoints" / "latest"
    try:
        return (latest.parent / latest.read_text().strip() / "lamm_complete.json").is_file()
    except OSError:
        return False
