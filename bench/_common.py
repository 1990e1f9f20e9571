"""Helpers the benchmark scripts share: where things are, the machine a result was measured on,
writing ``bench/results/NAME.json`` with the same object as the last stdout line, a clean skip,
the environment of launched children, and small timing pieces (a timed call, repetitions per
timed pass, a rotating order so no method always goes first, geometric mean, peak step memory).

The scripts run as ``python bench/NAME.py``, which puts ``bench/`` first on ``sys.path``; they
import this module as ``from _common import ...``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DATA = Path(os.environ.get("LAMM_DS_SHARED_DATA", REPO.parent / "shared" / "data"))
# Launcher variables of an enclosing job that the benchmark's own torchrun children must not inherit.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from lamm_ds.engine.hardware import cpu_model  # noqa: E402,F401  (one reader for calibrate and benchmarks)
from lamm_ds.engine.launcher_env import LAUNCHER_ENV  # noqa: E402,F401  (one list for the driver and benchmarks)


# ------------------------------------------------------------------------------------ the machine
def machine(threads: int | None = None) -> dict:
    """What a result was measured on: CPU model and cores, Python, torch and its threads, GPUs.

    ``threads``: intra-op threads of the measured processes where they are not this one (children
    started with ``OMP_NUM_THREADS``); default this process's ``torch.get_num_threads()``.
    """
    info = {"cpu": cpu_model(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    try:
        import torch
    except ImportError:
        return {**info, "torch": None, "torch_threads": threads, "gpus": []}
    gpus = [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {**info, "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads() if threads is None else threads, "gpus": gpus}


def load_1min() -> float:
    """The 1-minute load average: other processes on the machine skew the figures."""
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------------ results
def write_result(result: dict, path: str | Path | None, indent: int | None = 1) -> None:
    """Write ``result`` as JSON to ``path`` (its folder made; None: not written), then print it
    compact as the last stdout line."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=indent) + "\n")
    print(json.dumps(result))


def skip(message: str) -> None:
    """Exit 0 with the reason on stderr and a ``{"skipped": true}`` JSON line (nothing written)."""
    print(f"SKIP: {message}", file=sys.stderr)
    print(json.dumps({"skipped": True, "reason": message}))
    sys.exit(0)


def child_env(**extra: str) -> dict:
    """This environment without launcher variables, one thread, the CPU DeepSpeed accelerator, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    return env


# ------------------------------------------------------------------------------------ timing
def timed(fn, *args, **kwargs) -> float:
    """Seconds one call of ``fn(*args, **kwargs)`` takes."""
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def repeats_for(seconds: float, target_s: float) -> int:
    """How often to repeat something of ``seconds`` so one timed pass lasts about ``target_s``:
    short passes are at the mercy of the scheduler on a busy machine."""
    return max(1, math.ceil(target_s / max(seconds, 1e-9)))


def rotated(seq, k: int):
    """``seq`` started at item ``k`` (mod its length): round ``k`` of an alternating order."""
    k %= len(seq)
    return seq[k:] + seq[:k]


def geomean(values) -> float:
    import numpy as np

    return float(np.exp(np.mean(np.log(list(values)))))


def peak_bytes(fn, *args, **kwargs) -> int:
    """Highest net CPU bytes allocated during one call of ``fn`` (allocation events of ``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args, **kwargs)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def cuda_peak_bytes(fn, device, *args, **kwargs) -> int:
    """Highest CUDA bytes allocated during one call of ``fn`` on ``device`` over what was allocated before it."""
    import torch

    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# ------------------------------------------------------------------------------------ fairchem-core 1.x
def fairchem_core_modules(marker: str, subpackages: tuple[str, ...]) -> bool:
    """Make fairchem-core 1.x's ``fairchem.core.<sub>`` modules importable for a baseline: its package
    ``__init__`` (which pulls in the whole trainer stack) is bypassed by empty package modules, and a
    missing compiled ``torch_scatter`` is stood in for by torch_geometric's native scatter. False when
    fairchem-core (with ``fairchem/core/<marker>``) or any scatter is not importable."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("fairchem")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = os.path.join(list(spec.submodule_search_locations)[0], "core")
    if not os.path.isfile(os.path.join(root, marker)):
        return False
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        try:
            from torch_geometric.utils import scatter as pyg_scatter
        except ImportError:
            return False
        shim = types.ModuleType("torch_scatter")
        shim.scatter = lambda src, index, dim=0, out=None, dim_size=None, reduce="sum": pyg_scatter(
            src, index, dim=dim, dim_size=dim_size, reduce=reduce)
        sys.modules["torch_scatter"] = shim
    for sub in ("", *subpackages):
        name = "fairchem.core" + (f".{sub}" if sub else "")
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = mod
    return True
