"""Temperature-sampled mixture stream: probabilities, exact counts, (non-)replacement, determinism, scale."""

from __future__ import annotations

import math
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from lamm_ds.mixture import FeistelPermutation, MixtureStream, sampler


@pytest.fixture
def feistel_work(monkeypatch):
    """Counts the values pushed through the Feistel network and the vectorised calls: the work a
    lookup does, measured without a stopwatch."""
    work = {"values": 0, "vector_calls": 0}
    encrypt, permute_many = sampler._encrypt, sampler._permute_many

    def counting_encrypt(v, *args):
        work["values"] += int(np.size(v))
        return encrypt(v, *args)

    def counting_permute_many(*args):
        work["vector_calls"] += 1
        return permute_many(*args)

    monkeypatch.setattr(sampler, "_encrypt", counting_encrypt)
    monkeypatch.setattr(sampler, "_permute_many", counting_permute_many)
    return work


def test_probabilities_match_formula():
    sizes = [1000, 100, 10]
    p1 = MixtureStream(sizes, temperature=1.0).probabilities()
    np.testing.assert_allclose(p1, np.array(sizes) / 1110)
    p2 = MixtureStream(sizes, temperature=2.0).probabilities()
    w = np.sqrt(sizes)
    np.testing.assert_allclose(p2, w / w.sum())
    pinf = MixtureStream(sizes, temperature=math.inf).probabilities()
    np.testing.assert_allclose(pinf, [1 / 3] * 3)
    np.testing.assert_allclose(MixtureStream([5, 0, 20], temperature=2.0).probabilities(),
                               [np.sqrt(5) / (np.sqrt(5) + np.sqrt(20)), 0, np.sqrt(20) / (np.sqrt(5) + np.sqrt(20))])
    with pytest.raises(ValueError):
        MixtureStream([0, 0])
    with pytest.raises(ValueError):
        MixtureStream([3], temperature=0)


@pytest.mark.parametrize("length", [None, 1, 17, 999, 5000])
def test_exact_counts(length):
    s = MixtureStream([1000, 50, 7, 0, 300], temperature=2.0, seed=3, epoch_length=length)
    L = s.epoch_length
    for e in range(3):
        c = s.counts(e)
        assert sum(c) == L and c[3] == 0
        quota = s.probabilities() * L
        assert all(math.floor(q) <= ci <= math.ceil(q) for q, ci in zip(quota, c))
        got = Counter(k for k, _ in s.epoch(e))
        assert [got.get(k, 0) for k in range(5)] == c


def test_ties_rotate_between_epochs():
    s = MixtureStream([10, 10, 10], temperature=math.inf, epoch_length=31)  # 10.33 each: one extra slot
    winners = {tuple(s.counts(e)) for e in range(30)}
    assert all(sum(c) == 31 for c in winners) and len(winners) > 1


def test_indices_in_range_subsampled_unique_repeated_balanced():
    sizes = [5000, 40, 3]
    s = MixtureStream(sizes, temperature=2.0, seed=11, epoch_length=4000)
    for e in range(2):
        c = s.counts(e)
        assert c[0] <= sizes[0] and c[1] > sizes[1] and c[2] > sizes[2]
        per = {k: [] for k in range(3)}
        for k, i in s.epoch(e):
            assert 0 <= i < sizes[k]
            per[k].append(i)
        assert len(set(per[0])) == len(per[0]) == c[0]  # subsampled without replacement
        for k in (1, 2):  # repeated: every index floor or ceil(c/n) times
            reps = Counter(per[k])
            assert set(reps) == set(range(sizes[k]))
            assert set(reps.values()) <= {c[k] // sizes[k], -(-c[k] // sizes[k])}


def test_exact_multiple_repeats_evenly():
    s = MixtureStream([4, 6], temperature=1.0, epoch_length=30)  # 12 and 18 draws: 3 rounds each
    reps = Counter(s.epoch(0))
    assert set(reps.values()) == {3} and len(reps) == 10


def test_determinism_and_variation():
    a = MixtureStream([300, 20, 70], seed=5)
    b = MixtureStream([300, 20, 70], seed=5)
    assert list(a.epoch(1)) == list(b.epoch(1))
    assert list(a.epoch(1)) != list(a.epoch(2))
    assert list(a.epoch(1)) != list(MixtureStream([300, 20, 70], seed=6).epoch(1))
    # a subsampled dataset sees a different subset in another epoch
    s = MixtureStream([10_000, 10], temperature=1.0, epoch_length=200)
    sub = [{i for k, i in s.epoch(e) if k == 0} for e in range(2)]
    assert sub[0] != sub[1]


def test_random_access_equals_iteration():
    s = MixtureStream([700, 33, 5], temperature=2.0, seed=9)
    ev = s.epoch(4)
    items = list(ev)
    assert len(items) == len(ev) == 738
    rng = np.random.default_rng(0)
    for p in rng.integers(0, len(ev), size=50):
        assert ev[int(p)] == items[p]
    assert ev[-1] == items[-1] and ev[100:110] == items[100:110]
    assert s.epoch(4)[123] == items[123]  # a fresh view (a resumed run) agrees
    k, i = ev.take(np.arange(len(ev)))
    assert list(zip(k.tolist(), i.tolist())) == items
    with pytest.raises(IndexError):
        ev[len(ev)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 31, 64, 100, 1000, 4097])
def test_feistel_is_a_permutation(n):
    p = FeistelPermutation(n, key=12345)
    vals = [p(i) for i in range(n)]
    assert sorted(vals) == list(range(n))
    assert p.many(np.arange(n)).tolist() == vals
    if n >= 8:
        assert vals != list(range(n))  # not the identity
        assert vals != [FeistelPermutation(n, key=54321)(i) for i in range(n)]


def test_huge_epoch_is_constant_work_and_memory(feistel_work):
    sizes = [100_000_000, 3_000_000, 50_000, 7]
    tracemalloc.start()
    s = MixtureStream(sizes, temperature=2.0, seed=1)
    ev = s.epoch(12)
    n = len(ev)
    assert n == sum(sizes)
    items = [ev[n - 1 - j] for j in range(10)] + [ev[j] for j in range(10)]
    k, i = ev.take(np.arange(n - 1000, n))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 1020 lookups through two permutations each; cycle-walking re-encrypts < 1 time on average
    assert feistel_work["values"] < 4 * 2 * 1020
    assert peak < 2_000_000  # bytes: nothing proportional to the epoch
    assert all(0 <= idx < sizes[kk] for kk, idx in items)
    assert np.all(i < np.asarray(sizes)[k])
    assert (k[-10:].tolist(), i[-10:].tolist()) == ([x[0] for x in items[9::-1]], [x[1] for x in items[9::-1]])


def test_datasets_interleave():
    s = MixtureStream([2000, 1000, 500], temperature=1.0, seed=2)
    ev = s.epoch(0)
    L, chunks = len(ev), 10
    c = np.array(s.counts(0), dtype=float)
    observed = np.zeros((chunks, 3))
    for p, (k, _) in enumerate(ev):
        observed[p * chunks // L, k] += 1
    expected = np.outer(np.full(chunks, 1 / chunks), c)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    # dof = (10-1)*(3-1) = 18; P(chi2 > 50) ~ 1e-4, while "dataset 0 first" gives chi2 in the thousands
    assert chi2 < 50, chi2
    first = [k for k, _ in (ev[p] for p in range(100))]
    assert len(set(first)) == 3


def test_take_with_many_repeat_rounds(feistel_work):
    # a 3-sample dataset repeated ~10^6 times per epoch: vectorised lookup must not loop per round
    s = MixtureStream([3_000_000, 3], temperature=math.inf, seed=4, epoch_length=4_000_000)
    ev = s.epoch(0)
    assert s.counts(0)[1] == 2_000_000  # uniform over datasets: ~667k rounds of the 3-sample set
    pos = np.arange(len(ev) - 20_000, len(ev))
    k, i = ev.take(pos)
    assert (k == 1).sum() > 5000  # the window spans > 1600 of those rounds
    assert feistel_work["vector_calls"] == 1 + 2  # the slot permutation, then one per dataset
    assert [ev[int(p)] for p in pos[:200]] == list(zip(k[:200].tolist(), i[:200].tolist()))
    assert np.all(i[k == 1] < 3)
