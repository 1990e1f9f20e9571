"""Per-step, per-rank micro-batches from the mixture stream: a pure function of (seed, step).

The concatenated epoch streams are cut into windows of ``W = window_steps * batch_size`` draws
(global positions ``[w*W, (w+1)*W)``, exactly as ``plan_step`` tiles them step by step). Window
``w`` holds steps ``[w*k, (w+1)*k)`` and every one of its draws is assigned to exactly one
(step, rank) slot of those steps. Step ``s`` therefore needs window ``s // k`` only: any rank,
any resumed run, recomputes the same plan from the stream's seed and the stored atom/edge counts,
with no communication, in O(W) memory.

``fixed`` and ``atoms`` plan one step at a time (``window_steps`` is ignored: W = batch_size).
``balanced``, ``budget`` and ``max_atoms`` plan a window of ``window_steps`` steps at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lamm_ds.mixture import MixtureStream
from lamm_ds.scheduler.cost import CostModel
from lamm_ds.scheduler.partition import (Caps, ScheduleError, plan_balanced, plan_budget, plan_max_atoms, split_atoms,
                                         split_fixed)

STRATEGIES = ("fixed", "atoms", "balanced", "budget", "max_atoms")
WINDOWED = ("balanced", "budget", "max_atoms")
NEEDS_COST_MODEL = ("balanced", "budget")


@dataclass
class StepPlan:
    """All ranks' draws of one step. ``rank[i]`` owns draw i; draws are ordered by (rank, position)."""

    step: int
    epoch: int
    positions: np.ndarray
    ks: np.ndarray
    idx: np.ndarray
    rank: np.ndarray
    natoms: np.ndarray
    nedges: np.ndarray
    predicted: np.ndarray  # (ranks,) predicted seconds per rank (cost model, incl. the per-batch constant)

    def for_rank(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sel = self.rank == r
        return self.positions[sel], self.ks[sel], self.idx[sel]

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.rank, minlength=len(self.predicted))


class StepScheduler:
    """Plans for ``ranks`` (virtual) ranks; see the module docstring.

    ``natoms`` / ``nedges``: per dataset of the stream, the stored per-sample counts (memory-mapped
    arrays are fine: only the window's entries are read). ``composition_preserving`` (``balanced``
    only): steps keep the window's mix of datasets and sizes (stratified dealing) instead of
    grouping similar-sized draws.
    """

    def __init__(self, stream: MixtureStream, batch_size: int, ranks: int, strategy: str = "fixed",
                 cost_model: CostModel | None = None, natoms: Sequence[np.ndarray] | None = None,
                 nedges: Sequence[np.ndarray] | None = None, window_steps: int = 8,
                 caps: Caps | None = None, epoch_length: int | None = None, refine_iters: int | None = None,
                 composition_preserving: bool = False):
        if strategy not in STRATEGIES:
            raise ValueError(f"schedule.strategy must be one of {STRATEGIES}, got {strategy!r}")
        if composition_preserving and strategy != "balanced":
            raise ValueError(f"schedule.composition_preserving applies to strategy 'balanced' only, not {strategy!r}")
        if batch_size < ranks:
            raise ScheduleError(f"data.batch_size={batch_size} is smaller than the {ranks} ranks")
        if window_steps < 1:
            raise ValueError("schedule.window_steps must be >= 1")
        if strategy != "fixed" and (natoms is None or nedges is None):
            raise ValueError(f"strategy {strategy!r} needs the stored natoms/nedges arrays")
        if strategy in NEEDS_COST_MODEL and cost_model is None:
            raise ValueError(f"strategy {strategy!r} needs a cost model")
        self.stream, self.batch_size, self.ranks, self.strategy = stream, batch_size, ranks, strategy
        self.cost_model, self.natoms, self.nedges = cost_model, natoms, nedges
        self.window_steps = window_steps if strategy in WINDOWED else 1
        self.caps = caps or Caps()
        self.refine_iters = refine_iters
        self.composition_preserving = composition_preserving
        self.epoch_length = len(stream.epoch(0)) if epoch_length is None else int(epoch_length)
        if self.epoch_length < 1:
            raise ValueError("the mixture stream has an empty epoch")
        self._views: dict[int, object] = {}
        self._cache: tuple[int, dict] | None = None

    @property
    def window_draws(self) -> int:
        return self.window_steps * self.batch_size

    # ------------------------------------------------------------------------------------------
    def _view(self, e: int):
        v = self._views.get(e)
        if v is None:
            if len(self._views) > 4:
                self._views.clear()
            v = self._views[e] = self.stream.epoch(e)
        return v

    def draws(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epochs, dataset ids, indices) of global stream positions."""
        L = self.epoch_length
        epochs = positions // L
        ks = np.empty(len(positions), dtype=np.int64)
        idx = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            ks[sel], idx[sel] = self._view(int(e)).take(positions[sel] - e * L)
        return epochs, ks, idx

    def sizes(self, ks: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored atoms and edges of draws (dataset ``ks[i]``, sample ``idx[i]``); no decoding."""
        natoms = np.zeros(len(ks), dtype=np.int64)
        nedges = np.zeros(len(ks), dtype=np.int64)
        if self.natoms is None:
            return natoms, nedges
        for k in np.unique(ks).tolist():
            sel = ks == k
            natoms[sel] = np.asarray(self.natoms[k])[idx[sel]]
            nedges[sel] = np.asarray(self.nedges[k])[idx[sel]]
        return natoms, nedges

    # ------------------------------------------------------------------------------------------
    def _window(self, w: int) -> dict:
        """Plan of window ``w`` (cached: consecutive steps of a window reuse it)."""
        if self._cache is not None and self._cache[0] == w:
            return self._cache[1]
        W, k, R = self.window_draws, self.window_steps, self.ranks
        positions = np.arange(w * W, (w + 1) * W, dtype=np.int64)
        epochs, ks, idx = self.draws(positions)
        natoms, nedges = self.sizes(ks, idx)
        cost = self.cost_model.sample_costs(natoms, nedges) if self.cost_model is not None else None
        if self.strategy == "fixed":
            step = np.zeros(W, dtype=np.int64)
            rank = split_fixed(W, R)
        elif self.strategy == "atoms":
            step = np.zeros(W, dtype=np.int64)
            rank = split_atoms(natoms, R)
        elif self.strategy == "balanced":
            p = plan_balanced(cost, natoms, nedges, k, R, self.batch_size, self.caps, self.refine_iters,
                              strata=ks if self.composition_preserving else None)
            step, rank = self._shuffle(w, p.step, p.rank)
        elif self.strategy == "max_atoms":
            # batch order shuffled within the window (as the sampler it stands for shuffles its
            # batches), then dealt in turn: consecutive batches to consecutive ranks
            order = np.random.default_rng([self.stream.seed, 0x3A7A, w]).permutation(k * R)
            p = plan_max_atoms(natoms, nedges, k, R, self.caps, order=order)
            step, rank = p.step, p.rank
        else:
            p = plan_budget(cost, natoms, nedges, k, R, self.caps, self.refine_iters)
            step, rank = self._shuffle(w, p.step, p.rank)
        # draws ordered by (step, rank, position): a step is a contiguous slice, each rank's draws in
        # stream order (the fixed split keeps today's per-rank draw order)
        order = np.lexsort((positions, rank, step))
        bounds = np.searchsorted(step[order], np.arange(k + 1))
        plan = {"positions": positions, "epochs": epochs, "ks": ks, "idx": idx, "natoms": natoms,
                "nedges": nedges, "step": step, "rank": rank, "order": order, "bounds": bounds}
        self._cache = (w, plan)
        return plan

    def _shuffle(self, w: int, step: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keyed permutations of the step order in the window and of the rank order in each step,
        so the expensive step is not always the first and rank 0 not always the heaviest."""
        k, R = self.window_steps, self.ranks
        rng = np.random.default_rng([self.stream.seed, 0x5C4ED, w])
        step_perm = rng.permutation(k)
        rank_perm = np.stack([rng.permutation(R) for _ in range(k)])
        return step_perm[step], rank_perm[step, rank]

    def plan(self, step: int) -> StepPlan:
        """Every rank's draws of global step ``step``."""
        if step < 0:
            raise ValueError("step must be >= 0")
        k = self.window_steps
        win = self._window(step // k)
        j = step % k
        sel = win["order"][win["bounds"][j]:win["bounds"][j + 1]]
        rank = win["rank"][sel]
        natoms, nedges = win["natoms"][sel], win["nedges"][sel]
        R = self.ranks
        if self.cost_model is not None:
            a = np.bincount(rank, weights=natoms, minlength=R)
            e = np.bincount(rank, weights=nedges, minlength=R)
            g = np.bincount(rank, minlength=R)
            predicted = self.cost_model.batch_cost(a, e, g)
        else:
            predicted = np.full(R, np.nan)
        return StepPlan(step=int(step), epoch=int(win["epochs"][sel].min()), positions=win["positions"][sel],
                        ks=win["ks"][sel], idx=win["idx"][sel], rank=rank, natoms=natoms, nedges=nedges,
                        predicted=predicted)

    def loads(self, first_step: int, steps: int) -> np.ndarray:
        """Predicted seconds per (step, rank) for ``steps`` steps from ``first_step``: (steps, ranks)."""
        return np.stack([self.plan(s).predicted for s in range(first_step, first_step + steps)])


def rank_slice(ranks: int, world: int, rank: int) -> range:
    """The virtual ranks (plan slots) that real ``rank`` of ``world`` processes runs, concatenated."""
    if ranks % world:
        raise ValueError(f"schedule.plan_ranks={ranks} must be a multiple of the world size {world}")
    per = ranks // world
    return range(rank * per, (rank + 1) * per)


__all__ = ["NEEDS_COST_MODEL", "STRATEGIES", "WINDOWED", "StepPlan", "StepScheduler", "rank_slice"]
