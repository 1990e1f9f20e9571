"""Shared by the fine-tuning benchmarks: training runs as subprocesses (one thread each, finished runs
reused by the caller), ingest-once, dataset-list overrides, and a run's evaluation."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PY = sys.executable


def run(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` from the repository root (one OpenMP thread, CPU accelerator), output to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def ingest(src: list[Path], name: str, out: Path) -> Path:
    """``lamm-ds ingest`` of ``src`` into ``out`` unless already there."""
    if not (out / "manifest.json").is_file():
        run([str(REPO / ".venv/bin/lamm-ds"), "ingest", *map(str, src), "--name", name, "--out", str(out)],
            out.with_suffix(".log"))
    return out


def datasets_override(key: str, entries: list[tuple]) -> str:
    """``key=[{name: n, path: p[, head: h]}, ...]`` for (name, path[, head]) tuples."""
    def one(e):
        return f"{{name: {e[0]}, path: {e[1]}" + (f", head: {e[2]}" if len(e) > 2 else "") + "}"
    return f"{key}=[" + ", ".join(map(one, entries)) + "]"


def evaluation(run_dir: Path) -> dict[str, dict]:
    """Per evaluation set: energy MAE per atom and force MAE (eV/atom, eV/Å) from summary.json."""
    ev = json.loads((Path(run_dir) / "summary.json").read_text())["evaluation"]
    return {k: {"energy_mae_per_atom": m["energy_mae_per_atom"], "forces_mae": m["forces_mae"]}
            for k, m in ev.items()}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
