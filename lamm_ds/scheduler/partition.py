"""Partitioning a window of draws into (step, rank) micro-batches: pure functions on cost arrays.

Everything here works on plain numpy arrays (per-draw predicted cost, atoms, edges) and is
deterministic: ties are broken by the draw's index in the window, never by hashing or timing,
so every rank computes bit-identical plans from the same inputs.

Strategies (see docs/load_balancing.md):

* ``split_fixed``    draw ``d`` of a step goes to rank ``d % ranks`` (a plain distributed sampler);
* ``split_atoms``    longest-processing-time (LPT) on atom counts of one step's draws, no refinement
                     (the strategy of fairchem's balanced batch sampler);
* ``plan_balanced``  a window of ``k`` steps (``k * B`` draws, exactly ``B`` per step): draws sorted by
                     cost are cut into layers of ``k * ranks``; step ``s`` takes the ``s``-th chunk of
                     every layer (so expensive draws share a step), then LPT + pairwise-swap
                     refinement inside each step;
  (``strata`` given: the composition-preserving variant deals the draws, sorted by stratum then
                     cost, to the steps in turn, so every step keeps the window's mix);
* ``plan_budget``    a window of ``k`` steps: its draws, in stream order, cut into ``k`` consecutive
                     runs of about equal total cost (a variable number of draws each), each run split
                     over the ranks by LPT + refinement;
* ``plan_max_atoms`` a window of ``k`` steps: its draws, in stream order, packed greedily into
                     ``k * ranks`` micro-batches under one atom budget, dealt to the (step, rank) slots
                     in turn, no balancing between ranks (the behaviour of fairchem 2.x's max-atoms
                     batch sampler).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from dataclasses import dataclass

import numpy as np


class ScheduleError(ValueError):
    """A plan cannot be made (memory caps too small for the draws, too few draws for the ranks)."""


@dataclass
class Caps:
    """Per-rank memory caps on atoms and (stored) edges; None = unlimited."""

    atoms: int | None = None
    edges: int | None = None

    @property
    def active(self) -> bool:
        return self.atoms is not None or self.edges is not None

    def check_items(self, atoms: np.ndarray, edges: np.ndarray) -> None:
        if self.atoms is not None and atoms.size and atoms.max() > self.atoms:
            i = int(np.argmax(atoms))
            raise ScheduleError(f"a draw has {int(atoms[i])} atoms, more than schedule.max_atoms_per_rank="
                                f"{self.atoms}: raise the cap (one sample must fit on a rank)")
        if self.edges is not None and edges.size and edges.max() > self.edges:
            i = int(np.argmax(edges))
            raise ScheduleError(f"a draw has {int(edges[i])} stored edges, more than schedule.max_edges_per_rank="
                                f"{self.edges}: raise the cap (one sample must fit on a rank)")


def desc_order(cost: np.ndarray) -> np.ndarray:
    """Indices by decreasing cost; equal costs keep window order (stable)."""
    return np.argsort(-np.asarray(cost, dtype=np.float64), kind="stable")


# --------------------------------------------------------------------------------------------------
# baselines


def split_fixed(n: int, ranks: int) -> np.ndarray:
    """Rank of each of a step's ``n`` draws: ``d % ranks`` (what DistributedSampler does)."""
    return np.arange(n, dtype=np.int64) % ranks


def split_atoms(natoms: np.ndarray, ranks: int) -> np.ndarray:
    """fairchem's balanced partition: sort by atoms (descending), each draw to the lightest rank."""
    natoms = np.asarray(natoms, dtype=np.int64)
    rank_of = np.empty(len(natoms), dtype=np.int64)
    heap = [(0, 0, r) for r in range(ranks)]  # (atoms, count, rank): empty ranks first, then lightest
    for i in desc_order(natoms).tolist():
        load, count, r = heapq.heappop(heap)
        rank_of[i] = r
        heapq.heappush(heap, (load + int(natoms[i]), count + 1, r))
    return rank_of


# --------------------------------------------------------------------------------------------------
# building blocks


class _Bins:
    """Loads, counts, atoms and edges of a set of bins, with their member lists."""

    def __init__(self, n: int):
        self.load = np.zeros(n)
        self.count = np.zeros(n, dtype=np.int64)
        self.atoms = np.zeros(n, dtype=np.int64)
        self.edges = np.zeros(n, dtype=np.int64)
        self.members: list[list[int]] = [[] for _ in range(n)]

    def add(self, b: int, i: int, cost: float, atoms: int, edges: int) -> None:
        self.load[b] += cost
        self.count[b] += 1
        self.atoms[b] += atoms
        self.edges[b] += edges
        self.members[b].append(i)


def _fits(bins: _Bins, b: int, atoms: int, edges: int, caps: Caps) -> bool:
    return ((caps.atoms is None or bins.atoms[b] + atoms <= caps.atoms)
            and (caps.edges is None or bins.edges[b] + edges <= caps.edges))


def _lpt_into(bins: _Bins, bin_ids: np.ndarray, items: list[int], cost, atoms, edges, caps: Caps) -> None:
    """Items (already in LPT order) each to the lightest bin of ``bin_ids`` that fits the caps.

    The loop runs on Python floats/ints (numpy scalar updates cost ~4x more); the bins' arrays are
    updated in bulk at the end, in the same order, so results do not depend on the code path."""
    ids = np.asarray(bin_ids, dtype=np.int64)
    heap = list(zip(bins.load[ids].tolist(), bins.count[ids].tolist(), ids.tolist()))
    heapq.heapify(heap)
    c_list = np.asarray(cost, dtype=np.float64)[items].tolist()
    assign = []
    if not caps.active:
        loads = bins.load[ids]
        if len(ids) and (loads == 0).all() and (bins.count[ids] == 0).all():
            # empty bins (every step of a window starts so): the heap would hand the first len(ids)
            # items to the bins in ascending id order, so do that without it (the same result)
            first = min(len(ids), len(c_list))
            ascending = np.sort(ids).tolist()
            assign = ascending[:first]
            heap = ([(0.0 + c, 1, b) for c, b in zip(c_list[:first], assign)]
                    + [(0.0, 0, b) for b in ascending[first:]])
            heapq.heapify(heap)
            c_list = c_list[first:]
        for c in c_list:
            load, count, b = heap[0]
            heapq.heapreplace(heap, (load + c, count + 1, b))
            assign.append(b)
    else:
        a_list, e_list = np.asarray(atoms)[items].tolist(), np.asarray(edges)[items].tolist()
        used_a = {int(b): int(bins.atoms[b]) for b in bin_ids}
        used_e = {int(b): int(bins.edges[b]) for b in bin_ids}
        cap_a = caps.atoms if caps.atoms is not None else float("inf")
        cap_e = caps.edges if caps.edges is not None else float("inf")
        for c, a, e in zip(c_list, a_list, e_list):
            skipped = []
            while heap:
                entry = heapq.heappop(heap)
                if used_a[entry[2]] + a <= cap_a and used_e[entry[2]] + e <= cap_e:
                    break
                skipped.append(entry)
            else:
                raise ScheduleError(f"no rank can take a draw of {a} atoms / {e} edges within the memory caps "
                                    f"(atoms {caps.atoms}, edges {caps.edges}); raise the caps or lower "
                                    "data.batch_size")
            load, count, b = entry
            used_a[b] += a
            used_e[b] += e
            heapq.heappush(heap, (load + c, count + 1, b))
            for x in skipped:
                heapq.heappush(heap, x)
            assign.append(b)
    if not items:
        return
    idx = np.asarray(items, dtype=np.int64)
    tgt = np.asarray(assign, dtype=np.int64)
    np.add.at(bins.load, tgt, np.asarray(cost, dtype=np.float64)[idx])
    np.add.at(bins.count, tgt, 1)
    np.add.at(bins.atoms, tgt, np.asarray(atoms, dtype=np.int64)[idx])
    np.add.at(bins.edges, tgt, np.asarray(edges, dtype=np.int64)[idx])
    members = bins.members
    for b, i in zip(assign, items):
        members[b].append(i)


def _refine(bins: _Bins, bin_ids: np.ndarray, cost, atoms, edges, caps: Caps, max_iter: int,
            candidates: int = 8) -> int:
    """Pairwise moves/swaps between the most loaded bin and the lightest ``candidates`` bins while
    they lower that pair's maximum; a bin never becomes empty. Returns the number of changes."""
    ids = np.asarray(bin_ids)
    if len(ids) < 2:
        return 0
    changes = 0
    cost = np.asarray(cost, dtype=np.float64)
    for _ in range(max_iter):
        loads = bins.load[ids]
        top = int(np.argmax(loads))
        M, LM = int(ids[top]), float(loads[top])
        ncand = min(candidates, len(ids) - 1)
        light = np.argpartition(loads, ncand)[:ncand + 1]
        xs = np.asarray(bins.members[M], dtype=np.int64)
        cx = cost[xs]
        best_val, best = LM * (1 - 1e-9), None
        for pos in light.tolist():
            b = int(ids[pos])
            if b == M:
                continue
            Lb = float(bins.load[b])
            if len(xs) >= 2:  # move x from M to b
                new = np.maximum(LM - cx, Lb + cx)
                for j in np.argsort(new, kind="stable")[:4].tolist():
                    if new[j] >= best_val:
                        break
                    x = int(xs[j])
                    if not caps.active or _fits(bins, b, int(atoms[x]), int(edges[x]), caps):
                        best_val, best = float(new[j]), ("move", x, None, b)
                        break
            ys = np.asarray(bins.members[b], dtype=np.int64)
            d = cx[:, None] - cost[ys][None, :]
            new = np.where(d > 0, np.maximum(LM - d, Lb + d), np.inf)
            flat = np.argsort(new, axis=None, kind="stable")[:4]
            for f in flat.tolist():
                jx, jy = divmod(f, len(ys))
                if new[jx, jy] >= best_val:
                    break
                x, y = int(xs[jx]), int(ys[jy])
                if caps.active:
                    da, de = int(atoms[x]) - int(atoms[y]), int(edges[x]) - int(edges[y])
                    if not (_fits(bins, b, da, de, caps) and _fits(bins, M, -da, -de, caps)):
                        continue
                best_val, best = float(new[jx, jy]), ("swap", x, y, b)
                break
        if best is None:
            break
        kind, x, y, b = best
        _remove(bins, M, x, cost, atoms, edges)
        bins.add(b, x, float(cost[x]), int(atoms[x]), int(edges[x]))
        if kind == "swap":
            _remove(bins, b, y, cost, atoms, edges)
            bins.add(M, y, float(cost[y]), int(atoms[y]), int(edges[y]))
        changes += 1
    return changes


def _remove(bins: _Bins, b: int, i: int, cost, atoms, edges) -> None:
    bins.members[b].remove(i)
    bins.load[b] -= float(cost[i])
    bins.count[b] -= 1
    bins.atoms[b] -= int(atoms[i])
    bins.edges[b] -= int(edges[i])


# --------------------------------------------------------------------------------------------------
# window planners


@dataclass
class WindowPlan:
    """Slot of every draw of a window: ``step`` in [0, k) and ``rank`` in [0, ranks)."""

    step: np.ndarray
    rank: np.ndarray


def _refine_iters(ranks: int, refine_iters: int | None) -> int:
    return max(16, min(4 * ranks, 512)) if refine_iters is None else refine_iters


def plan_balanced(cost, atoms, edges, steps: int, ranks: int, per_step: int, caps: Caps | None = None,
                  refine_iters: int | None = None, strata=None) -> WindowPlan:
    """``steps * per_step`` draws into ``steps`` steps of exactly ``per_step`` draws each (every rank
    at least one), minimising the sum over steps of the largest rank cost.

    Composition ("layers"): draws sorted by decreasing cost are cut into layers of ``steps * ranks``
    draws (the last one shorter when ``per_step`` is not a multiple of ``ranks``); step ``s`` takes
    the ``s``-th chunk of every layer. Each step thus holds draws of similar size from every layer:
    the most expensive draws share a step instead of each setting the pace of a different one, and
    within a step the spread of each layer is narrow, so LPT (each draw, largest first, to the
    lightest rank) followed by pairwise-swap refinement balances it tightly. Per-rank draw counts vary.

    ``strata`` (one label per draw, e.g. its dataset): composition-preserving instead. Draws sorted
    by (stratum, decreasing cost) are dealt to the steps in turn, alternating direction each round
    (stratified dealing), so every step holds each stratum's share of the window (within one draw)
    and a slice of every size range; the ranks of each step are then balanced by the same LPT +
    refinement. The steps look like the stream, at the price of the look-ahead gain.
    """
    cost = np.asarray(cost, dtype=np.float64)
    atoms, edges = np.asarray(atoms, dtype=np.int64), np.asarray(edges, dtype=np.int64)
    caps = caps or Caps()
    n = len(cost)
    if n != steps * per_step:
        raise ValueError(f"window has {n} draws, expected steps*per_step = {steps * per_step}")
    if per_step < ranks:
        raise ScheduleError(f"{per_step} draws per step cannot give each of {ranks} ranks one")
    caps.check_items(atoms, edges)
    if strata is not None:
        comp = _stratified_composition(cost, np.asarray(strata, dtype=np.int64), steps)
        return _to_plan(_balance_steps(comp, cost, atoms, edges, steps, ranks, caps, refine_iters), n, ranks)
    order = desc_order(cost)
    try:
        bins = _balanced_bins(order, cost, atoms, edges, steps, ranks, per_step, caps, refine_iters, snake=False)
    except ScheduleError:
        if not caps.active:
            raise
        # memory caps: heavy draws of every layer in one step may not fit; alternate the layers'
        # direction (heavy with light) so each step's atoms/edges stay near the window mean
        bins = _balanced_bins(order, cost, atoms, edges, steps, ranks, per_step, caps, refine_iters, snake=True)
    return _to_plan(bins, n, ranks)


def _stratified_composition(cost: np.ndarray, strata: np.ndarray, steps: int) -> list[list[int]]:
    """Window indices of each step: sorted by (stratum, decreasing cost, index), dealt in snake order."""
    n = len(cost)
    if len(strata) != n:
        raise ValueError(f"{len(strata)} strata labels for {n} draws")
    order = np.lexsort((np.arange(n), -cost, strata))
    rnd, pos = np.divmod(np.arange(n), steps)
    target = np.where(rnd % 2 == 0, pos, steps - 1 - pos)  # alternate direction: totals stay level
    comp: list[list[int]] = [[] for _ in range(steps)]
    for s, i in zip(target.tolist(), order.tolist()):
        comp[s].append(i)
    return comp


def _balanced_bins(order, cost, atoms, edges, steps, ranks, per_step, caps, refine_iters, snake) -> _Bins:
    comp: list[list[int]] = [[] for _ in range(steps)]
    full, rest = divmod(per_step, ranks)
    for layer in range(full):
        seg = order[layer * steps * ranks:(layer + 1) * steps * ranks]
        for s in range(steps):
            t = steps - 1 - s if snake and layer % 2 else s
            comp[t].extend(seg[s * ranks:(s + 1) * ranks].tolist())
    if rest:
        seg = order[full * steps * ranks:]
        for s in range(steps):
            t = steps - 1 - s if snake and full % 2 else s
            comp[t].extend(seg[s * rest:(s + 1) * rest].tolist())
    return _balance_steps(comp, cost, atoms, edges, steps, ranks, caps, refine_iters)


def _balance_steps(comp, cost, atoms, edges, steps, ranks, caps, refine_iters) -> _Bins:
    """Each step's draws (``comp[s]``) over its ranks: LPT, then pairwise refinement."""
    bins = _Bins(steps * ranks)  # bin = s * ranks + r
    for s in range(steps):
        ids = np.arange(s * ranks, (s + 1) * ranks)
        items = np.asarray(comp[s], dtype=np.int64)
        items = items[np.lexsort((items, -cost[items]))]  # LPT order, ties by window index
        _lpt_into(bins, ids, items.tolist(), cost, atoms, edges, caps)
        _refine(bins, ids, cost, atoms, edges, caps, _refine_iters(ranks, refine_iters))
    return bins


def plan_budget(cost, atoms, edges, steps: int, ranks: int, caps: Caps | None = None,
                refine_iters: int | None = None) -> WindowPlan:
    """A window's draws, in stream order, cut into ``steps`` consecutive runs of about equal total
    cost ("token budget" batching: a run of small molecules holds many draws, a run of large cells
    few), each run split over the ranks by LPT + refinement. Every run holds at least ``ranks`` draws."""
    cost = np.asarray(cost, dtype=np.float64)
    atoms, edges = np.asarray(atoms, dtype=np.int64), np.asarray(edges, dtype=np.int64)
    caps = caps or Caps()
    n = len(cost)
    if n < steps * ranks:
        raise ScheduleError(f"{n} draws cannot give {steps} steps x {ranks} ranks one each")
    caps.check_items(atoms, edges)
    cum = np.cumsum(cost)
    target = cum[-1] / steps
    # draw i belongs to the run holding the midpoint of its cost interval
    cuts = np.searchsorted(cum - cost / 2, target * np.arange(1, steps), side="left")
    bounds = [0]
    for j, c in enumerate(cuts.tolist(), start=1):
        bounds.append(int(min(max(c, bounds[-1] + ranks), n - (steps - j) * ranks)))
    bounds.append(n)
    bins = _Bins(steps * ranks)
    for s in range(steps):
        items = np.arange(bounds[s], bounds[s + 1])
        items = items[np.lexsort((items, -cost[items]))]
        ids = np.arange(s * ranks, (s + 1) * ranks)
        _lpt_into(bins, ids, items.tolist(), cost, atoms, edges, caps)
        _refine(bins, ids, cost, atoms, edges, caps, _refine_iters(ranks, refine_iters))
    return _to_plan(bins, n, ranks)


def next_fit_starts(atoms, budget: int) -> list[int]:
    """Start index of each batch when ``atoms`` (in order) are packed greedily: a draw joins the
    open batch while the batch's atoms stay within ``budget``, else it opens a new batch. A draw
    larger than the budget therefore forms a batch of its own."""
    starts, run = [0], 0
    for i, a in enumerate(atoms):
        if run and run + a > budget:
            starts.append(i)
            run = a
        else:
            run += a
    return starts


def _next_fit_count(atoms: list[int], budget: int) -> int:
    count, run = 1, 0
    for a in atoms:
        if run and run + a > budget:
            count += 1
            run = a
        else:
            run += a
    return count


def plan_max_atoms(atoms, edges, steps: int, ranks: int, caps: Caps | None = None,
                   order=None) -> WindowPlan:
    """A window's draws, in stream order, packed greedily into ``steps * ranks`` micro-batches under
    one atom budget, dealt to the slots in turn; nothing balances the ranks of a step.

    The budget is the smallest number of atoms for which greedy (next-fit) packing of the window
    needs at most ``steps * ranks`` batches (the batch count of next-fit never grows with the
    budget, so a bisection finds it). So a micro-batch holds ``per_step / ranks`` draws on average,
    as in the other strategies, and every draw is used once: a draw above the budget is a batch of
    its own (fairchem's sampler drops such samples; keeping them keeps the data the same for every
    strategy). When the count at that budget falls short (next-fit counts can jump by more than
    one), the batch with the most atoms is cut in two at its atom midpoint until the count is met.

    Dealing: batch ``b`` (in stream order) fills slot ``order[b]`` (default ``b``): step
    ``slot // ranks``, rank ``slot % ranks``, i.e. consecutive batches go to consecutive ranks.
    """
    atoms, edges = np.asarray(atoms, dtype=np.int64), np.asarray(edges, dtype=np.int64)
    caps = caps or Caps()
    n, nb = len(atoms), steps * ranks
    if n < nb:
        raise ScheduleError(f"{n} draws cannot give {steps} steps x {ranks} ranks one each")
    caps.check_items(atoms, edges)
    a_list = atoms.tolist()
    lo, hi = 1, max(int(atoms.sum()), 1)
    while lo < hi:  # smallest budget with at most nb batches
        mid = (lo + hi) // 2
        if _next_fit_count(a_list, mid) <= nb:
            hi = mid
        else:
            lo = mid + 1
    budget = lo
    bounds = next_fit_starts(a_list, budget) + [n]
    batches = [(bounds[j], bounds[j + 1]) for j in range(len(bounds) - 1)]
    cum = np.concatenate([[0], np.cumsum(atoms)]).tolist()
    if len(batches) < nb:
        # the heaviest batch of >= 2 draws (ties: the earliest) is cut where its halves' atoms are closest
        heap = [(-(cum[b] - cum[a]), a, b) for a, b in batches if b - a >= 2]
        heapq.heapify(heap)
        done = [(a, b) for a, b in batches if b - a < 2]
        for _ in range(nb - len(batches)):
            _, a, b = heapq.heappop(heap)
            half = (cum[a] + cum[b]) / 2
            cut = min(max(bisect.bisect_left(cum, half, a + 1, b), a + 1), b - 1)
            if cut > a + 1 and abs(cum[cut - 1] - half) <= abs(cum[cut] - half):
                cut -= 1
            for x, y in ((a, cut), (cut, b)):
                if y - x >= 2:
                    heapq.heappush(heap, (-(cum[y] - cum[x]), x, y))
                else:
                    done.append((x, y))
        batches = sorted(done + [(a, b) for _, a, b in heap])
    if caps.active:
        for a, b in batches:
            if caps.atoms is not None and cum[b] - cum[a] > caps.atoms:
                raise ScheduleError(f"max_atoms: a micro-batch needs {int(cum[b] - cum[a])} atoms (window budget "
                                    f"{budget}), more than schedule.max_atoms_per_rank={caps.atoms}: raise the cap "
                                    "or lower data.batch_size")
            if caps.edges is not None and int(edges[a:b].sum()) > caps.edges:
                raise ScheduleError(f"max_atoms: a micro-batch has {int(edges[a:b].sum())} stored edges, more than "
                                    f"schedule.max_edges_per_rank={caps.edges}: raise the cap or lower data.batch_size")
    slots = np.arange(nb, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    if sorted(slots.tolist()) != list(range(nb)):
        raise ValueError(f"order must be a permutation of the {nb} slots")
    lengths = np.array([b - a for a, b in batches], dtype=np.int64)
    slot_of_draw = np.repeat(slots, lengths)
    return WindowPlan(slot_of_draw // ranks, slot_of_draw % ranks)


def _to_plan(bins: _Bins, n: int, ranks: int) -> WindowPlan:
    # one vectorised scatter, not a numpy assignment per slot: a window at 4096 ranks has 131k slots
    lengths = np.fromiter((len(m) for m in bins.members), dtype=np.int64, count=len(bins.members))
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        b = int(empty[0])
        raise ScheduleError(f"internal error: slot (step {b // ranks}, rank {b % ranks}) is empty")
    members = np.fromiter(itertools.chain.from_iterable(bins.members), dtype=np.int64, count=int(lengths.sum()))
    slot = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    step = np.full(n, -1, dtype=np.int64)
    rank = np.full(n, -1, dtype=np.int64)
    step[members] = slot // ranks
    rank[members] = slot % ranks
    if (step < 0).any():
        raise ScheduleError("internal error: a draw of the window was not assigned")
    return WindowPlan(step, rank)


# --------------------------------------------------------------------------------------------------
# evaluation helpers (plans as arrays of per-(step, rank) costs)


def slot_loads(values: np.ndarray, step: np.ndarray, rank: np.ndarray, steps: int, ranks: int) -> np.ndarray:
    """Sum of ``values`` per (step, rank): array (steps, ranks)."""
    out = np.zeros(steps * ranks, dtype=np.float64)
    np.add.at(out, np.asarray(step) * ranks + np.asarray(rank), np.asarray(values, dtype=np.float64))
    return out.reshape(steps, ranks)
