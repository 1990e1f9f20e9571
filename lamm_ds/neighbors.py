"""Periodic radius graphs with a max-neighbours cap and a deterministic tie-break.

Pairs come from a compiled neighbour-list library (vesin by default, matscipy as an alternative;
see ``bench/neighbor_lists.py`` for the measurement behind the default). We then recompute every
distance ourselves in float64 and sort, so the result does not depend on which library found the
pairs: for each centre ``i`` neighbours are ordered by (distance, j, shift) and the first
``max_neighbors`` are kept.

Convention used everywhere in lamm-ds: an edge ``(i, j, S)`` points from centre ``i`` to neighbour
``j`` in the periodic image ``S`` (integer multiples of the cell rows), with vector
``r_ij = x_j + S @ cell - x_i``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lamm_ds.structure import det3

BACKENDS = ("vesin", "matscipy", "brute")
_SKIN = 1e-6  # ask the library for a slightly larger sphere, then apply the exact cutoff ourselves
# A pair costs ~50 bytes on its way through the library and our sort, so 20 M pairs is ~1 GB.
# Real training cells (<= 300 atoms, cutoff <= 12 A) stay below 1 M; far beyond is a broken cell.
MAX_PAIRS = 20_000_000


class TooManyPairsError(ValueError):
    """The structure would give an unreasonable number of neighbour pairs (usually a degenerate cell)."""


@dataclass(frozen=True)
class Graph:
    """Edges of one structure: centres ``i``, neighbours ``j``, integer image shifts ``shifts`` (E, 3)."""

    i: np.ndarray
    j: np.ndarray
    shifts: np.ndarray

    @property
    def num_edges(self) -> int:
        return int(self.i.shape[0])


def _box_for_library(cell: np.ndarray, pbc: np.ndarray, positions: np.ndarray, cutoff: float) -> np.ndarray:
    """A full-rank box: non-periodic axes whose vector is zero or degenerate get a large
    orthogonal vector, since only periodic axes affect which pairs exist."""
    box = np.array(cell, dtype=np.float64)
    extent = float(np.ptp(positions, axis=0).max()) if len(positions) else 0.0
    length = 2.0 * (extent + cutoff) + 1.0
    for axis in range(3):
        if pbc[axis]:
            continue
        others = [box[k] for k in range(3) if k != axis]
        normal = np.cross(others[0], others[1])
        if np.linalg.norm(normal) < 1e-8:
            normal = np.eye(3)[axis]
        box[axis] = normal / np.linalg.norm(normal) * length
    if abs(np.linalg.det(box)) < 1e-10:
        # Several non-periodic axes with zero vectors: fall back to an orthogonal box.
        for axis in range(3):
            if not pbc[axis]:
                box[axis] = np.eye(3)[axis] * length
    return box


def _check_pair_count(positions: np.ndarray, box: np.ndarray, pbc: np.ndarray, cutoff: float) -> None:
    """Refuse periodic cells that would produce more than MAX_PAIRS pairs, before any is allocated.

    ``box`` is :func:`_box_for_library`'s. A nearly flat cell (lattice planes 1e-4 A apart, say) is
    finite and passes every other check, but asks for millions of periodic images: without this the
    process runs out of memory.
    """
    volume = abs(float(np.linalg.det(box)))
    n = len(positions)
    sphere = 4.0 / 3.0 * np.pi * cutoff ** 3
    expected = n * n * sphere / volume if volume > 0 else np.inf  # homogeneous-density estimate
    if expected > MAX_PAIRS:
        spacings = [volume / np.linalg.norm(np.cross(box[(a + 1) % 3], box[(a + 2) % 3]))
                    for a in range(3) if pbc[a]]
        raise TooManyPairsError(
            f"about {expected:.3g} neighbour pairs expected ({n} atoms, cutoff {cutoff:g} A, cell volume "
            f"{volume:.3g} A^3, smallest periodic lattice-plane spacing {min(spacings):.3g} A); more than "
            f"{MAX_PAIRS:.0e} means the cell is almost surely degenerate")


# Each backend takes the box radius_graph already built (None: build it here, e.g. when benchmarked alone).


_VESIN_LISTS: dict[float, object] = {}  # one calculator per cutoff: creating one costs ~15 us per structure


def _pairs_vesin(positions, cell, pbc, cutoff, box=None):
    from vesin import NeighborList

    # Non-periodic: vesin ignores the box, so skip building one (a measurable cost for molecules).
    if not pbc.any():
        box = np.zeros((3, 3))
    elif box is None:
        box = _box_for_library(cell, pbc, positions, cutoff)
    nl = _VESIN_LISTS.get(cutoff)
    if nl is None:
        if len(_VESIN_LISTS) > 16:
            _VESIN_LISTS.clear()
        nl = _VESIN_LISTS[cutoff] = NeighborList(cutoff=cutoff + _SKIN, full_list=True)
    i, j, s = nl.compute(positions, box, [bool(p) for p in pbc], quantities="ijS")
    return i, j, s


def _pairs_matscipy(positions, cell, pbc, cutoff, box=None):
    from matscipy.neighbours import neighbour_list

    if box is None:  # matscipy needs a full-rank box even for a molecule
        box = _box_for_library(cell, pbc, positions, cutoff)
    return neighbour_list("ijS", positions=positions, cell=box, pbc=pbc, cutoff=cutoff + _SKIN)


def _pairs_brute(positions, cell, pbc, cutoff, box=None):
    """All-images O(N^2 S) reference, used by the tests to check the libraries."""
    positions = np.asarray(positions, dtype=np.float64)
    ranges = []
    if pbc.any():
        box = _box_for_library(cell, pbc, positions, cutoff) if box is None else box
        inv = np.linalg.inv(box)
        frac = positions @ inv
    for axis in range(3):
        if not pbc[axis]:
            ranges.append([0])
            continue
        others = [cell[k] for k in range(3) if k != axis]
        area = np.linalg.norm(np.cross(others[0], others[1]))
        spacing = abs(np.linalg.det(cell)) / area  # distance between lattice planes
        span = float(np.ptp(frac[:, axis])) if len(frac) else 0.0
        n = int(np.ceil(cutoff / spacing + span)) + 1
        ranges.append(range(-n, n + 1))
    shifts = np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1).T
    offsets = shifts @ cell
    diff = positions[None, :, None, :] + offsets[None, None, :, :] - positions[:, None, None, :]
    dist = np.linalg.norm(diff, axis=-1)
    ii, jj, ss = np.nonzero(dist < cutoff + _SKIN)
    keep = ~((ii == jj) & np.all(shifts[ss] == 0, axis=1))
    return ii[keep], jj[keep], shifts[ss[keep]]


_PAIRS = {"vesin": _pairs_vesin, "matscipy": _pairs_matscipy, "brute": _pairs_brute}


def _inputs(positions, cell, pbc, backend: str):
    """positions (N, 3), cell (3, 3) as float64 and pbc (3,) as bool; an unknown backend is refused."""
    if backend not in _PAIRS:
        raise ValueError(f"unknown neighbour-list backend {backend!r}; choose one of {BACKENDS}")
    return (np.ascontiguousarray(positions, dtype=np.float64), np.asarray(cell, dtype=np.float64).reshape(3, 3),
            np.asarray(pbc, dtype=bool).reshape(3))


def _guarded_box(positions, cell, pbc, cutoff: float) -> np.ndarray | None:
    """The library's box (None without periodic axes), after refusing a cell that would give more than
    MAX_PAIRS pairs: built once, since the guard and the backend both need it."""
    if not pbc.any():
        return None
    box = _box_for_library(cell, pbc, positions, cutoff)
    _check_pair_count(positions, box, pbc, cutoff)
    return box


def _candidate_pairs(positions, cell, pbc, cutoff: float, backend: str):
    """Inputs normalised, pairs from the backend with the exact cutoff applied: (positions, cell,
    i, j, shifts, distances), or None for an empty structure."""
    positions, cell, pbc = _inputs(positions, cell, pbc, backend)
    if len(positions) == 0:
        return None
    return _pairs_within(positions, cell, pbc, float(cutoff), backend, _guarded_box(positions, cell, pbc, float(cutoff)))


def _pairs_within(positions, cell, pbc, cutoff: float, backend: str, box):
    """The backend's pairs of normalised inputs, with the exact cutoff applied (see _candidate_pairs)."""
    i, j, s = _PAIRS[backend](positions, cell, pbc, cutoff, box)
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64).reshape(-1, 3)
    dist = _exact_lengths(positions, cell, i, j, s, periodic=bool(pbc.any()))
    inside = dist < cutoff
    if inside.all():
        return positions, cell, i, j, s, dist
    return positions, cell, i[inside], j[inside], s[inside], dist[inside]


def _exact_lengths(positions, cell, i, j, shifts, periodic: bool = True) -> np.ndarray:
    """Edge lengths, computed the one way every path of this module (and AtomsBatch.edge_vectors)
    computes them: (x_j - x_i) + S @ cell, so images that are mathematically equidistant get
    bit-identical distances and the (j, shift) tie-break applies. Without periodic axes every shift is
    zero and adding it changes no bit, so it is skipped. sqrt(sum of squares) is what
    np.linalg.norm(axis=1) computes, without its overhead."""
    vec = positions[j] - positions[i]
    if periodic:
        vec += shifts @ cell
    return np.sqrt((vec * vec).sum(axis=1))


def radius_graph(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    max_neighbors: int | None = None,
    backend: str = "vesin",
    strict: bool = True,
) -> Graph:
    """All pairs with ``|r_ij| < cutoff`` over every periodic image, keeping at most
    ``max_neighbors`` nearest per centre (ties broken by neighbour index, then image shift).

    ``strict=False`` is fairchem's non-strict cap (``enforce_max_neighbors_strictly: False``): a
    centre with more than k = ``max_neighbors`` neighbours keeps every neighbour whose squared
    distance is within :data:`NON_STRICT_TOLERANCE` Å² of its (k+1)-th nearest's, so tied shells of
    a crystal are kept whole (and the cap is no longer a maximum).

    Raises :class:`TooManyPairsError` for a periodic cell that would give more than
    :data:`MAX_PAIRS` pairs (a degenerate cell) instead of exhausting memory.
    """
    pairs = _candidate_pairs(positions, cell, pbc, cutoff, backend)
    if pairs is None:
        empty = np.zeros(0, dtype=np.int64)
        return Graph(empty, empty, np.zeros((0, 3), dtype=np.int64))
    _, _, i, j, s, dist = pairs
    order = np.lexsort((s[:, 2], s[:, 1], s[:, 0], j, dist, i))
    i, j, s = i[order], j[order], s[order]
    if max_neighbors is not None and len(i):
        # rank of each edge within its centre's sorted list
        starts = np.searchsorted(i, i, side="left")
        rank = np.arange(len(i)) - starts
        keep = rank < max_neighbors if strict else _non_strict_keep(i, dist[order], starts, rank, max_neighbors)
        i, j, s = i[keep], j[keep], s[keep]
    return Graph(i, j, s)


# fairchem's degeneracy tolerance of the non-strict cap, on squared distances (Å^2)
NON_STRICT_TOLERANCE = 0.01


def _non_strict_keep(i, dist, starts, rank, k: int) -> np.ndarray:
    """Edges (sorted by centre, then distance) kept by the non-strict cap: all of a centre with at
    most k; else those with d^2 <= d^2 of its (k+1)-th nearest + tolerance (that one included)."""
    degree = np.bincount(i)
    deg = degree[i]
    if k <= 0:  # fairchem: a cap <= 0 keeps everything
        return np.ones(len(i), dtype=bool)
    d2 = dist * dist
    kth = starts + k  # the (k+1)-th nearest of the edge's centre, where it has one
    threshold = np.where(deg > k, d2[np.minimum(kth, len(i) - 1)] + NON_STRICT_TOLERANCE, np.inf)
    return (deg <= k) | (rank < k) | (d2 <= threshold)


# Interatomic distances below this are treated as two atoms on the same spot (a duplicated atom, a
# unit mix-up, an atom coinciding with its own periodic image). 0.1 Å is far below any real bond
# (H-H, the shortest, is 0.74 Å) and below the closest contacts even of datasets that sample the
# repulsive wall of dimers (a few tenths of an Å), so no physical structure is rejected; at such a
# distance models give NaN or huge forces, later and without naming the structure.
MIN_INTERATOMIC_DISTANCE = 0.1


class ShortestEdge(NamedTuple):
    """The shortest edge of a graph: its length (Å), centre ``i``, neighbour ``j`` and image shift."""

    distance: float
    i: int
    j: int
    shift: tuple[int, int, int]


NO_EDGE = ShortestEdge(float("inf"), -1, -1, (0, 0, 0))  # the shortest edge of a graph without edges


def shortest_distance(positions: np.ndarray, cell: np.ndarray, graph: Graph) -> ShortestEdge:
    """The shortest interatomic distance over all edges of ``graph`` (periodic images included).

    ``graph`` is :func:`radius_graph`'s for these positions and cell. Self-image edges (``i == j``,
    ``shift != 0``) count, so an atom that coincides with its own periodic image (a lattice vector
    shorter than the distance) shows up too. The nearest neighbour of every atom survives the
    ``max_neighbors`` cap, so the cap does not hide the shortest edge; pairs farther apart than the
    graph's cutoff are not seen. No edges: ``distance`` is ``inf`` and ``i = j = -1``.
    """
    if graph.num_edges == 0:
        return NO_EDGE
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    dist = _exact_lengths(positions, cell, graph.i, graph.j, graph.shifts)
    k = int(np.argmin(dist))
    shift = tuple(int(x) for x in graph.shifts[k])
    return ShortestEdge(float(dist[k]), int(graph.i[k]), int(graph.j[k]), shift)


class NeighborSummary(NamedTuple):
    """What ingest stores and checks of a structure's graph: its edge count and its shortest edge."""

    num_edges: int
    shortest: ShortestEdge


# neighbor_summary counts structures itself (all distances to the atoms and to the image atoms near
# them, half the images by symmetry) instead of asking the library: 1.4-15x faster than vesin's cell
# list for the 20-400-atom structures of training sets (bench/neighbor_lists.py, "summary_*").
# Beyond this many candidate distances (16 MB of float64) the library's pairs are counted instead.
DENSE_SUMMARY_LIMIT = 2_000_000


def neighbor_summary(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float,
                     max_neighbors: int | None = None, backend: str = "vesin", dense: bool = True) -> NeighborSummary:
    """``radius_graph(...).num_edges`` and ``shortest_distance`` of that graph, without building it.

    The cap keeps ``min(degree, max_neighbors)`` edges per centre whatever the tie-break, so the count
    needs no sort; ties of the shortest edge resolve as in the sorted graph (centre, neighbour, shift).
    Structures up to :data:`DENSE_SUMMARY_LIMIT` candidate distances are counted by
    :func:`_dense_summary` (exactly the same numbers), larger ones (or all, with ``dense=False``) from
    ``backend``'s pairs.
    """
    positions, cell, pbc = _inputs(positions, cell, pbc, backend)
    cutoff = float(cutoff)
    if len(positions) == 0 or (max_neighbors is not None and max_neighbors < 1):
        return NeighborSummary(0, NO_EDGE)
    # The reach is a bound computed from the cell alone, so even a degenerate cell costs nothing here; one
    # the dense count takes has at most 2 * DENSE_SUMMARY_LIMIT pairs, far below MAX_PAIRS, so only the
    # library's path needs the pair-count guard.
    reach = _image_reach(positions, cell, pbc, cutoff)
    if dense and reach is not None and len(positions) ** 2 * (_shift_count(reach) + 1) // 2 <= DENSE_SUMMARY_LIMIT:
        return _dense_summary(positions, cell, _half_shifts(reach), cutoff, max_neighbors)
    box = _guarded_box(positions, cell, pbc, cutoff)
    _, _, i, j, s, dist = _pairs_within(positions, cell, pbc, cutoff, backend, box)
    if len(i) == 0:
        return NeighborSummary(0, NO_EDGE)
    degree = np.bincount(i, minlength=len(positions))
    count = int(np.minimum(degree, max_neighbors).sum()) if max_neighbors is not None else len(i)
    return NeighborSummary(count, _first_shortest(dist, i, j, s))


def _first_shortest(dist, i, j, s) -> ShortestEdge:
    """The shortest of these edges; among exactly equal lengths the first by (centre, neighbour, shift)."""
    at_min = np.flatnonzero(dist == dist.min())
    if len(at_min) > _FEW_TIES:
        k = at_min[np.lexsort((s[at_min, 2], s[at_min, 1], s[at_min, 0], j[at_min], i[at_min]))[0]]
        return ShortestEdge(float(dist[k]), int(i[k]), int(j[k]), tuple(int(x) for x in s[k]))
    # the usual case (an edge and its reverse): Python's tuple order is the same order, and cheaper
    centre, neighbour, *shift = min(zip(i[at_min].tolist(), j[at_min].tolist(), *s[at_min].T.tolist()))
    return ShortestEdge(float(dist[at_min[0]]), centre, neighbour, tuple(shift))


_FEW_TIES = 32


def _image_reach(positions, cell, pbc, cutoff: float) -> tuple[int, int, int] | None:
    """The largest |S_a| of an image shift that can hold a pair closer than ``cutoff``, per axis; None
    for a singular periodic cell.

    A pair (i, j, S) is at least |f_j - f_i + S_a| * h_a apart along periodic axis a (f: fractional
    coordinates, h_a: the spacing of the lattice planes normal to it), so |S_a| <= cutoff / h_a + the
    atoms' fractional extent along a.
    """
    if not pbc.any():
        return (0, 0, 0)
    if abs(det3(cell)) < 1e-10:
        return None
    inverse = np.linalg.inv(cell)
    spacing = 1.0 / np.sqrt((inverse * inverse).sum(axis=0))
    frac = positions @ inverse
    reach = np.where(pbc, np.floor(cutoff / spacing + (frac.max(axis=0) - frac.min(axis=0)) + 1e-9), 0)
    return tuple(int(r) for r in reach)


def _shift_count(reach: tuple[int, int, int]) -> int:
    return (2 * reach[0] + 1) * (2 * reach[1] + 1) * (2 * reach[2] + 1)


@functools.lru_cache(maxsize=256)
def _half_shifts(reach: tuple[int, int, int]) -> np.ndarray:
    """The shifts with |S_a| <= reach[a] that are lexicographically positive: one of each pair S, -S,
    without 0 (read-only: shared between calls)."""
    axes = [np.arange(-r, r + 1) for r in reach]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    positive = (grid[:, 0] > 0) | ((grid[:, 0] == 0) & ((grid[:, 1] > 0) | ((grid[:, 1] == 0) & (grid[:, 2] > 0))))
    half = grid[positive]
    half.flags.writeable = False
    return half


def _dense_summary(positions, cell, half, cutoff: float, max_neighbors: int | None) -> NeighborSummary:
    """Count and shortest edge from the distances of every atom to every atom and to every image atom
    that can be within ``cutoff`` of the structure's bounding box, for the ``half`` shifts
    (:func:`_half_shifts`): pair (i, j, S)
    has the length of (j, i, -S), bit for bit, so it counts for both centres.

    Squared distances minus cutoff^2 come from one matrix product; the few within rounding of the
    cutoff (or of the minimum) are recomputed by :func:`_exact_lengths`, as every other path, so the result
    is identical to counting the backend's pairs."""
    n = len(positions)
    others_pos = positions  # zero shift first: columns 0..n-1 are the atoms themselves
    image_s = image_j = np.zeros(0, dtype=np.int64)
    sq_x = np.einsum("ij,ij->i", positions, positions)
    sq_y = sq_x
    if len(half):
        image_pos = (positions[None, :, :] + (half @ cell)[:, None, :]).reshape(-1, 3)  # image s, atom j
        # an image atom farther than the cutoff from the atoms' bounding box has no pair with any atom
        gap = image_pos - np.minimum(np.maximum(image_pos, positions.min(0)), positions.max(0))
        near = np.flatnonzero(np.einsum("ij,ij->i", gap, gap) <= cutoff * cutoff * (1 + 1e-9) + 1e-12)
        image_s, image_j = np.divmod(near, n)
        image_pos = image_pos[near]
        others_pos = np.concatenate([positions, image_pos])
        sq_y = np.concatenate([sq_x, np.einsum("ij,ij->i", image_pos, image_pos)])
    centres = np.empty((n, 5))
    centres[:, :3], centres[:, 3], centres[:, 4] = positions, 1.0, sq_x - cutoff * cutoff
    others = np.empty((5, len(others_pos)))
    others[:3], others[3], others[4] = -2.0 * others_pos.T, sq_y, 1.0
    excess = centres @ others  # (n, n + images): d^2 - cutoff^2
    excess[np.arange(n), np.arange(n)] = np.inf  # an atom is not its own neighbour (zero shift)
    tol = 1e-9 * max(1.0, float(sq_x.max()) + float(sq_y.max()) + cutoff * cutoff)
    col_atom = np.concatenate([np.arange(n), image_j])

    def col_shift(c):
        out = np.zeros((len(c), 3), dtype=np.int64)
        image = c >= n
        out[image] = half[image_s[c[image] - n]]
        return out

    inside = excess < -tol
    maybe = excess <= tol
    if np.count_nonzero(maybe) != np.count_nonzero(inside):  # rounding could put these on either side
        i, c = np.nonzero(maybe & ~inside)
        inside[i, c] = _exact_lengths(positions, cell, i, col_atom[c], col_shift(c)) < cutoff
    # counts as float32 matrix-vector products (exact: far below 2^24), cheaper than boolean reductions
    ones = np.ones(len(others_pos), dtype=np.float32)
    counted = inside.astype(np.float32)
    degree = (counted @ ones).astype(np.int64)
    if len(image_j):  # the image columns count for their atom too, as the reverse edge (j, i, -S)
        degree += np.bincount(image_j, weights=ones[:n] @ counted[:, n:], minlength=n).astype(np.int64)
    total = int(degree.sum())
    if total == 0:
        return NeighborSummary(0, NO_EDGE)
    count = int(np.minimum(degree, max_neighbors).sum()) if max_neighbors is not None else total
    # the shortest edge: candidates within rounding of the smallest excess, in both directions, exactly
    row_min = excess.min(axis=1)
    bound = row_min.min() + 2 * tol
    rows = np.flatnonzero(row_min <= bound)
    r, c = np.nonzero(excess[rows] <= bound)
    i, j, sh = rows[r], col_atom[c], col_shift(c)
    i, j, sh = np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([sh, -sh])
    dist = _exact_lengths(positions, cell, i, j, sh)
    keep = dist < cutoff
    return NeighborSummary(count, _first_shortest(dist[keep], i[keep], j[keep], sh[keep]))
