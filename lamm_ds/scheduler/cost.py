"""Cost model of a micro-batch: predicted forward+backward seconds = a·atoms + b·edges + c·graphs + d.

``atoms`` and ``edges`` are the per-sample counts stored in a dataset's memory-mapped index
(``LmdbDataset.natoms`` / ``.nedges``), never obtained by decoding records. ``edges`` are counted at
the manifest's cutoff/max_neighbors (``lamm-ds ingest --cutoff/--max-neighbors``), which need not be
the model's: the coefficients are fitted against those stored counts, so they absorb the ratio.

Coefficients are fitted by non-negative least squares on relative residuals (every micro-batch
counts equally, small or large) by ``lamm-ds calibrate`` and saved as JSON.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FEATURES = ("atoms", "edges", "graphs", "const")


@dataclass(frozen=True)
class CostModel:
    atoms: float = 0.0   # seconds per atom
    edges: float = 0.0   # seconds per stored edge
    graphs: float = 0.0  # seconds per graph (structure)
    const: float = 0.0   # seconds per micro-batch
    source: str = ""     # where the coefficients came from (a file, "builtin:<name>", "config")
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        vals = [self.atoms, self.edges, self.graphs, self.const]
        if any(not np.isfinite(v) or v < 0 for v in vals):
            raise ValueError(f"cost coefficients must be finite and >= 0, got {vals}")
        if self.atoms == self.edges == self.graphs == 0:
            raise ValueError("cost model: at least one of atoms/edges/graphs must be > 0")

    @property
    def coefficients(self) -> np.ndarray:
        return np.array([self.atoms, self.edges, self.graphs, self.const], dtype=np.float64)

    def sample_costs(self, natoms, nedges) -> np.ndarray:
        """Per-sample part ``a·atoms + b·edges + c`` (the per-micro-batch ``d`` is added per rank)."""
        return (self.atoms * np.asarray(natoms, dtype=np.float64) + self.edges * np.asarray(nedges, dtype=np.float64)
                + self.graphs)

    def batch_cost(self, natoms, nedges, ngraphs):
        """Predicted seconds of micro-batches with these totals (scalars or arrays)."""
        return (self.atoms * np.asarray(natoms, dtype=np.float64) + self.edges * np.asarray(nedges, dtype=np.float64)
                + self.graphs * np.asarray(ngraphs, dtype=np.float64) + self.const)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coefficients"] = {k: d.pop(k) for k in FEATURES}
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "CostModel":
        coef = d.get("coefficients", d)
        missing = [k for k in FEATURES if k not in coef]
        if missing:
            raise ValueError(f"cost model: missing coefficient(s) {missing}")
        return cls(*(float(coef[k]) for k in FEATURES), source=source or d.get("source", ""),
                   meta=d.get("meta", {}))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CostModel":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"cost model file not found: {path} (create it with `lamm-ds calibrate`)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from exc
        return cls.from_dict(data, source=str(path))


# --------------------------------------------------------------------------------------------------
# fitting


def nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a few columns: the best of the unconstrained solutions
    on every subset of columns that come out non-negative (2^4 = 16 subsets here)."""
    A, y = np.asarray(A, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = A.shape[1]
    best, best_res = np.zeros(n), float(y @ y)
    for size in range(1, n + 1):
        for cols in itertools.combinations(range(n), size):
            sub = A[:, cols]
            x, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if (x < 0).any():
                continue
            res = float(np.sum((sub @ x - y) ** 2))
            if res < best_res - 1e-15 * max(best_res, 1e-300):
                full = np.zeros(n)
                full[list(cols)] = x
                best, best_res = full, res
    return best


@dataclass
class FitReport:
    r2: float                       # on seconds, all micro-batches
    max_rel_error: float            # worst |pred - t| / t
    mean_rel_error: float
    n: int
    predicted: list[float]
    measured: list[float]

    def summary(self) -> str:
        return (f"R² {self.r2:.4f}, worst relative error {self.max_rel_error * 100:.1f}%, "
                f"mean relative error {self.mean_rel_error * 100:.1f}% over {self.n} micro-batches")


def fit_cost_model(features: np.ndarray, seconds: np.ndarray, source: str = "calibrate",
                   meta: dict | None = None) -> tuple[CostModel, FitReport]:
    """Fit a·atoms + b·edges + c·graphs + d >= 0 to measured seconds; features (n, 3) or (n, 4)
    columns atoms, edges, graphs[, 1]. Residuals are relative (rows divided by the time)."""
    F = np.asarray(features, dtype=np.float64)
    if F.shape[1] == 3:
        F = np.concatenate([F, np.ones((len(F), 1))], axis=1)
    t = np.asarray(seconds, dtype=np.float64)
    if len(t) < 4 or (t <= 0).any():
        raise ValueError("need at least 4 positive timings to fit 4 coefficients")
    scale = F.max(axis=0)
    scale[scale == 0] = 1.0
    w = 1.0 / t
    x = nnls(F / scale * w[:, None], t * w) / scale
    if not (x[:3] > 0).any():
        raise ValueError(
            f"cost fit: the {len(t)} timings show no growth with atoms, edges or graphs (best fit is a "
            f"constant {x[3]:.3g} s; timings span {t.min():.3g}..{t.max():.3g} s), so they are dominated by "
            "overhead or machine noise; time more and larger micro-batches (calibrate --batches, "
            "--max-graphs, --repeats) on an otherwise idle machine")
    model = CostModel(*x.tolist(), source=source, meta=meta or {})
    pred = F @ x
    ss_res = float(np.sum((pred - t) ** 2))
    ss_tot = float(np.sum((t - t.mean()) ** 2)) or 1e-300
    rel = np.abs(pred - t) / t
    return model, FitReport(1 - ss_res / ss_tot, float(rel.max()), float(rel.mean()), len(t), pred.tolist(), t.tolist())
