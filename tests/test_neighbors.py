import zlib

import numpy as np
import pytest

from lamm_ds.neighbors import MAX_PAIRS, TooManyPairsError, neighbor_summary, radius_graph, shortest_distance


def _edges(g):
    return sorted(zip(g.i.tolist(), g.j.tolist(), map(tuple, g.shifts.tolist())))


def _plane_spacings(cell):
    vol = abs(np.linalg.det(cell))
    return [vol / np.linalg.norm(np.cross(cell[(a + 1) % 3], cell[(a + 2) % 3])) for a in range(3)]


def _random_system(rng, case):
    n = int(rng.integers(1, 14))
    while True:  # triclinic, often thinner than the cutoff, but not so flat that images number millions
        cell = rng.normal(size=(3, 3)) * 0.6 + np.eye(3) * rng.uniform(1.2, 7.0)
        if min(_plane_spacings(cell)) > 0.5:
            break
    pbc = rng.random(3) < 0.6
    if case == "nonperiodic":
        pbc[:] = False
    elif case == "periodic":
        pbc[:] = True
    pos = rng.uniform(-0.3, 1.3, size=(n, 3)) @ cell  # some atoms outside the cell
    if case == "nonperiodic" and rng.random() < 0.5:
        cell = np.zeros((3, 3))
    return pos, cell, pbc, float(rng.uniform(1.0, 6.0))


@pytest.mark.parametrize("backend", ["vesin", "matscipy"])
@pytest.mark.parametrize("case", ["periodic", "mixed", "nonperiodic"])
def test_matches_brute_force(backend, case):
    # a fixed seed per case (str hashes change with every interpreter, so hash() is not one)
    rng = np.random.default_rng(zlib.crc32(f"{backend}-{case}".encode()))
    for _ in range(40):
        pos, cell, pbc, cutoff = _random_system(rng, case)
        for cap in (None, 4):
            ref = radius_graph(pos, cell, pbc, cutoff, cap, backend="brute")
            got = radius_graph(pos, cell, pbc, cutoff, cap, backend=backend)
            assert _edges(got) == _edges(ref)
            # and the same order, since ordering is ours, not the library's
            np.testing.assert_array_equal(got.i, ref.i)
            np.testing.assert_array_equal(got.j, ref.j)


def test_cell_smaller_than_cutoff_sees_many_images():
    cell = np.eye(3) * 2.0
    g = radius_graph(np.zeros((1, 3)), cell, [True] * 3, cutoff=4.5)
    d = np.linalg.norm(g.shifts @ cell, axis=1)
    assert (d < 4.5).all() and g.num_edges == sum(
        1 for a in range(-3, 4) for b in range(-3, 4) for c in range(-3, 4)
        if 0 < 2.0 * np.sqrt(a * a + b * b + c * c) < 4.5)


def test_max_neighbors_tie_break_is_deterministic():
    # simple cubic: 6 equidistant first neighbours; keep 4 -> chosen by (j, shift) order
    cell = np.eye(3) * 3.0
    g = radius_graph(np.zeros((1, 3)), cell, [True] * 3, cutoff=3.5, max_neighbors=4)
    assert g.shifts.tolist() == [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, 1]]
    for backend in ("vesin", "matscipy", "brute"):
        h = radius_graph(np.zeros((1, 3)), cell, [True] * 3, cutoff=3.5, max_neighbors=4, backend=backend)
        np.testing.assert_array_equal(h.shifts, g.shifts)


def test_edge_vectors_shorter_than_cutoff_and_sorted():
    rng = np.random.default_rng(3)
    pos = rng.uniform(0, 8, size=(30, 3))
    cell = np.diag([8.0, 8.0, 8.0])
    g = radius_graph(pos, cell, [True, True, False], 3.0, max_neighbors=5)
    d = np.linalg.norm(pos[g.j] + g.shifts @ cell - pos[g.i], axis=1)
    assert (d < 3.0).all()
    assert np.bincount(g.i, minlength=30).max() <= 5
    for i in range(30):
        di = d[g.i == i]
        assert np.all(np.diff(di) >= 0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown neighbour-list backend"):
        radius_graph(np.zeros((2, 3)), np.eye(3), [False] * 3, 1.0, backend="nope")


@pytest.mark.parametrize("backend", ["vesin", "matscipy", "brute"])
def test_degenerate_cell_refused_before_allocating(backend):
    # planes 1e-5 A apart: 4 atoms would need ~1e8 pairs; we must refuse, not run out of memory
    cell = np.diag([3.0, 3.0, 1e-5])
    pos = np.array([[0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]])
    with pytest.raises(TooManyPairsError, match=r"smallest periodic lattice-plane spacing 1e-05 A"):
        radius_graph(pos, cell, [True] * 3, 5.0, backend=backend)
    # the same flat axis, non-periodic, is harmless: the box is only a container there
    assert radius_graph(pos, cell, [True, True, False], 5.0, backend=backend).num_edges > 0


def test_dense_but_real_cells_pass_the_pair_guard():
    # 300 atoms at a metal's density with a 12 A cutoff: the largest training cell we expect
    rng = np.random.default_rng(0)
    cell = np.eye(3) * (300 / 0.085) ** (1 / 3)
    pos = rng.uniform(0, 1, size=(300, 3)) @ cell
    g = radius_graph(pos, cell, [True] * 3, 12.0)
    assert 0 < g.num_edges < MAX_PAIRS


@pytest.mark.parametrize("case", ["periodic", "mixed", "nonperiodic"])
def test_neighbor_summary_is_the_graphs_count_and_shortest_edge(case):
    # ingest stores neighbor_summary's count as nedges; the scheduler's cost model and the loader's
    # graphs must agree on it, so it has to equal the capped graph's size exactly
    rng = np.random.default_rng(zlib.crc32(f"summary-{case}".encode()))
    for _ in range(60):
        pos, cell, pbc, cutoff = _random_system(rng, case)
        if rng.random() < 0.3:  # exact ties: a duplicated image distance / symmetric positions
            pos = np.round(pos * 2) / 2
        for cap in (None, 0, 1, 4, 50):
            g = radius_graph(pos, cell, pbc, cutoff, cap)
            for dense in (True, False):
                got = neighbor_summary(pos, cell, pbc, cutoff, cap, dense=dense)
                assert got.num_edges == g.num_edges
                assert got.shortest == shortest_distance(pos, cell, g)


def _non_strict_reference(pos, cell, pbc, cutoff, k):
    """fairchem's non-strict cap written out per centre: all neighbours if at most k, else those with
    d^2 <= d^2 of the (k+1)-th nearest + 0.01."""
    full = radius_graph(pos, cell, pbc, cutoff, None, backend="brute")
    d = np.linalg.norm(pos[full.j] - pos[full.i] + full.shifts @ cell, axis=1)
    keep = set()
    for c in np.unique(full.i):
        sel = np.flatnonzero(full.i == c)
        if len(sel) <= k:
            keep.update(sel.tolist())
            continue
        d2 = np.sort(d[sel] ** 2)
        keep.update(sel[d[sel] ** 2 <= d2[k] + 0.01].tolist())
    return sorted((int(full.i[e]), int(full.j[e]), tuple(full.shifts[e].tolist())) for e in keep)


@pytest.mark.parametrize("case", ["periodic", "nonperiodic"])
def test_non_strict_cap_is_fairchems_rule(case):
    rng = np.random.default_rng(zlib.crc32(f"nonstrict-{case}".encode()))
    for _ in range(30):
        pos, cell, pbc, cutoff = _random_system(rng, case)
        for k in (1, 3, 6):
            got = radius_graph(pos, cell, pbc, cutoff, k, strict=False)
            assert _edges(got) == _non_strict_reference(pos, cell, pbc, cutoff, k)


def test_non_strict_cap_keeps_tied_shells_of_a_crystal():
    """fcc: 12 nearest neighbours at the same distance. The strict cap of 8 picks 8 of them by
    index (an arbitrary choice that breaks the symmetry); the non-strict cap keeps the shell."""
    from ase.build import bulk

    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    pos, cell, pbc = a.positions, np.asarray(a.cell[:]), a.pbc
    strict = radius_graph(pos, cell, pbc, 6.0, 8)
    loose = radius_graph(pos, cell, pbc, 6.0, 8, strict=False)
    assert np.bincount(strict.i).tolist() == [8] * 4
    assert np.bincount(loose.i).tolist() == [12] * 4
    d = np.linalg.norm(pos[loose.j] - pos[loose.i] + loose.shifts @ cell, axis=1)
    np.testing.assert_allclose(d, 3.61 / np.sqrt(2), rtol=1e-12)


def test_dense_summary_of_real_crystals_equals_the_libraries_pairs(monkeypatch):
    """Ingest counts small structures itself (all N x N distances per image); ideal crystals (every
    shell an exact tie), rattled and strained cells, a slab and a molecule give the library's numbers."""
    import lamm_ds.neighbors as neighbors
    from ase.build import bulk, fcc111, molecule

    rng = np.random.default_rng(7)
    systems = [bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2), bulk("Cu", "fcc", a=3.61) * (3, 3, 3),
               bulk("Mo", "bcc", a=3.15, cubic=True) * (2, 2, 2), bulk("Si", "diamond", a=5.43),
               fcc111("Pt", size=(3, 3, 4), vacuum=6.0), molecule("C6H6")]
    rattled = systems[0].copy()
    rattled.positions += rng.normal(0, 0.05, rattled.positions.shape) + 7.0  # and shifted out of the cell
    strained = systems[1].copy()
    strained.set_cell(strained.cell @ (np.eye(3) + rng.normal(0, 0.05, (3, 3))), scale_atoms=True)
    systems += [rattled, strained]
    used = []
    real_dense = neighbors._dense_summary
    monkeypatch.setattr(neighbors, "_dense_summary", lambda *a: used.append(1) or real_dense(*a))
    for atoms in systems:
        for cutoff, cap in ((6.0, 50), (5.0, None), (3.0, 8)):
            args = (atoms.positions, atoms.cell[:], atoms.pbc, cutoff, cap)
            dense, library = neighbor_summary(*args), neighbor_summary(*args, dense=False)
            g = radius_graph(*args)
            assert dense == library and dense.num_edges == g.num_edges, (atoms.get_chemical_formula(), cutoff)
            assert dense.shortest == shortest_distance(atoms.positions, atoms.cell[:], g)
    assert len(used) == 3 * len(systems)  # every one of these took the dense path
