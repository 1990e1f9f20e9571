"""Temperature-sampled multi-dataset mixture as a stateless, randomly accessible epoch stream.

Dataset k is drawn with probability ``p_k ∝ n_k^(1/T)`` (T=1 proportional, T=inf uniform). An epoch
of length L gives dataset k exactly ``c_k`` slots (largest-remainder rounding of ``L * p_k``). The
item at position ``p`` of epoch ``e`` is computed from ``(seed, e, p)`` alone:

1. ``q = perm_L(p)`` with a keyed permutation of [0, L); dataset k owns slots
   ``[start_k, start_k + c_k)`` of q, so datasets are interleaved uniformly at random;
2. ``j = q - start_k`` is the draw number inside dataset k; round ``r = j // n_k`` uses its own keyed
   permutation of [0, n_k): index = ``perm_{n_k}^{(k, r)}(j % n_k)``. Hence a subsampled dataset
   (c_k <= n_k) gets distinct indices and a repeated one (c_k > n_k) gets every index
   floor(c_k/n_k) or ceil(c_k/n_k) times.

Permutations are Feistel networks over the next power of two with cycle-walking: O(1) time and
memory per lookup, no per-sample arrays, so any rank can index any position of a 10^8-sample epoch
without communication, and resuming is just indexing from the saved position.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

import numpy as np

_M64 = (1 << 64) - 1
_ROUNDS = 6  # even, so the unbalanced halves return to their original widths
_TAG_SLOTS = 0x736C6F7473   # "slots"
_TAG_INDEX = 0x696E646578   # "index"
_TAG_TIES = 0x74696573      # "ties"


def _mix64(x):
    """splitmix64 finaliser; works on Python ints and on numpy uint64 arrays (wrapping arithmetic)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key(*parts):
    """Hash of a tuple of integers; any part may be a numpy integer array (then the result is an array)."""
    h = 0x243F6A8885A308D3
    for v in parts:
        v = v.astype(np.uint64) if isinstance(v, np.ndarray) else int(v) & _M64
        h = _mix64((h ^ v) + 0x9E3779B97F4A7C15 & _M64)
    return h


def _split_bits(n: int) -> tuple[int, int]:
    bits = max(1, (n - 1).bit_length())
    return bits // 2, bits - bits // 2


def _encrypt(v, round_keys, a: int, b: int):
    """One pass of the Feistel network on [0, 2^(a+b)); round keys may be ints or arrays shaped like v."""
    hi_w, lo_w = a, b
    x, y = v >> lo_w, v & ((1 << lo_w) - 1)
    for rk in round_keys:
        f = _mix64(y ^ rk) & ((1 << hi_w) - 1)
        x, y = y, (x + f) & ((1 << hi_w) - 1)
        hi_w, lo_w = lo_w, hi_w
    return (x << lo_w) | y


def _permute_many(t: np.ndarray, n: int, keys) -> np.ndarray:
    """Vectorised keyed permutation of [0, n) applied to ``t``; ``keys`` is an int or a per-element array."""
    v = np.asarray(t).astype(np.uint64)
    if n == 1:
        return np.zeros(v.shape, dtype=np.int64)
    a, b = _split_bits(n)
    rks = [_key(keys, r) for r in range(_ROUNDS)]
    v = _encrypt(v, rks, a, b)
    todo = np.flatnonzero(v >= n)
    while todo.size:  # cycle-walking, only on the elements still out of range
        sub = [rk[todo] if isinstance(rk, np.ndarray) else rk for rk in rks]
        v[todo] = _encrypt(v[todo], sub, a, b)
        todo = todo[v[todo] >= n]
    return v.astype(np.int64)


class FeistelPermutation:
    """Keyed bijection of [0, n): unbalanced Feistel network on ceil(log2 n) bits + cycle-walking.

    State is split into ``a`` high and ``b`` low bits (a + b = bits); a round maps
    ``(x, y) -> (y, (x + F_r(y)) mod 2^a)``, which swaps the widths, so an even number of rounds is a
    bijection on [0, 2^bits). Values >= n are re-encrypted until they fall in range (the domain is
    < 2n, so on average < 2 steps)."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError("permutation domain must be non-empty")
        self.n, self.key = int(n), int(key)
        self.a, self.b = _split_bits(self.n)
        self.round_keys = [_key(self.key, r) for r in range(_ROUNDS)]

    def __call__(self, i: int) -> int:
        if self.n == 1:
            return 0
        v = _encrypt(int(i), self.round_keys, self.a, self.b)
        while v >= self.n:
            v = _encrypt(v, self.round_keys, self.a, self.b)
        return v

    def many(self, i: np.ndarray) -> np.ndarray:
        """Vectorised ``__call__`` on an integer array."""
        return _permute_many(i, self.n, self.key)


def temperature_probabilities(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """``p_k ∝ n_k^(1/T)``; empty datasets get 0; ``T=inf`` is uniform over non-empty datasets."""
    n = np.asarray(sizes, dtype=np.float64)
    if (n < 0).any() or not (n > 0).any():
        raise ValueError("sizes must be >= 0 with at least one non-empty dataset")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    w = np.where(n > 0, 1.0, 0.0) if math.isinf(temperature) else np.where(n > 0, n ** (1.0 / temperature), 0.0)
    return w / w.sum()


def mixture_probabilities(sizes: Sequence[int], temperature: float,
                          shares: Sequence[float | None] | None = None) -> np.ndarray:
    """Temperature probabilities, except that a dataset with a ``share`` gets exactly that fraction of
    the draws (e.g. replayed pre-training data during fine-tuning); the others split the rest by
    temperature."""
    if shares is None or all(s is None for s in shares):
        return temperature_probabilities(sizes, temperature)
    if len(shares) != len(sizes):
        raise ValueError(f"shares has {len(shares)} entries for {len(sizes)} datasets")
    fixed = {k: float(s) for k, s in enumerate(shares) if s is not None}
    if any(not 0 < s < 1 for s in fixed.values()) or any(sizes[k] <= 0 for k in fixed):
        raise ValueError(f"a share must be in (0, 1) and its dataset non-empty, got shares {list(shares)}")
    free = [k for k in range(len(sizes)) if k not in fixed]
    rest = 1.0 - sum(fixed.values())
    if not free or rest <= 0:
        raise ValueError(f"shares {list(shares)} leave no draws for the datasets without one")
    p = np.zeros(len(sizes))
    p[free] = rest * temperature_probabilities([sizes[k] for k in free], temperature)
    for k, s in fixed.items():
        p[k] = s
    return p


class MixtureStream:
    """Epoch streams of (dataset, index) draws from datasets of the given ``sizes``.

    ``shares``: per dataset, None (temperature sampling) or a fixed fraction of the draws.

    ``epoch_length`` defaults to ``sum(sizes)``. ``counts(e)`` are the exact per-dataset draws of
    epoch e (largest-remainder rounding; exact ties of the fractional parts are broken by a keyed
    per-epoch hash so no dataset is favoured in every epoch). ``epoch(e)`` is an indexable view."""

    def __init__(self, sizes: Sequence[int], temperature: float = 2.0, seed: int = 0,
                 epoch_length: int | None = None, shares: Sequence[float | None] | None = None):
        self.sizes = [int(s) for s in sizes]
        self.temperature = float(temperature)
        self.seed = int(seed)
        self._p = mixture_probabilities(self.sizes, self.temperature, shares)
        self.epoch_length = sum(self.sizes) if epoch_length is None else int(epoch_length)
        if self.epoch_length < 0:
            raise ValueError("epoch_length must be >= 0")

    @property
    def num_datasets(self) -> int:
        return len(self.sizes)

    def probabilities(self) -> np.ndarray:
        return self._p.copy()

    def counts(self, epoch: int) -> list[int]:
        L = self.epoch_length
        # float64 quotas are exact enough for any realistic L; the fix-ups below make the total exactly L.
        quota = self._p * L
        base = np.floor(quota).astype(np.int64)
        base = np.minimum(base, L)
        rest = L - int(base.sum())
        frac = quota - base
        eligible = [k for k in range(self.num_datasets) if self._p[k] > 0]
        order = sorted(eligible, key=lambda k: (-frac[k], _key(_TAG_TIES, self.seed, epoch, k)))
        counts = base.tolist()
        for i in range(max(rest, 0)):
            counts[order[i % len(order)]] += 1
        for k in reversed(order):  # float round-off made the floors overshoot: take from smallest remainders
            if rest >= 0:
                break
            if counts[k] > 0:
                counts[k] -= 1
                rest += 1
        return [int(c) for c in counts]

    def epoch(self, epoch: int) -> "EpochView":
        return EpochView(self, int(epoch))


class EpochView(Sequence):
    """Random-access sequence of ``(dataset, index)`` for one epoch; O(K) memory, O(log K) per item."""

    def __init__(self, stream: MixtureStream, epoch: int):
        self.stream, self.epoch = stream, epoch
        self.counts = stream.counts(epoch)
        self.starts = [0]
        for c in self.counts:
            self.starts.append(self.starts[-1] + c)
        self._length = self.starts[-1]
        s = stream.seed
        self._slots = FeistelPermutation(max(self._length, 1), _key(_TAG_SLOTS, s, epoch))
        self._index_perms: dict[tuple[int, int], FeistelPermutation] = {}  # bounded, see _index_perm

    def __len__(self) -> int:
        return self._length

    def _index_perm(self, k: int, r: int) -> FeistelPermutation:
        perm = self._index_perms.get((k, r))
        if perm is None:
            if len(self._index_perms) > 4 * self.stream.num_datasets + 64:
                self._index_perms.clear()  # cache only; keeps memory O(K) for heavily repeated sets
            perm = FeistelPermutation(self.stream.sizes[k], _key(_TAG_INDEX, self.stream.seed, self.epoch, k, r))
            self._index_perms[(k, r)] = perm
        return perm

    def __getitem__(self, p):
        if isinstance(p, slice):
            return [self[i] for i in range(*p.indices(self._length))]
        p = int(p)
        if p < 0:
            p += self._length
        if not 0 <= p < self._length:
            raise IndexError(f"position {p} out of range for epoch of length {self._length}")
        q = self._slots(p)
        k = bisect.bisect_right(self.starts, q) - 1
        j = q - self.starts[k]
        n = self.stream.sizes[k]
        return k, self._index_perm(k, j // n)(j % n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for p in range(self._length):
            yield self[p]

    def take(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised lookup of many positions: (dataset ids, indices) int64 arrays."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self._length):
            raise IndexError("position out of range")
        q = self._slots.many(pos)
        k = np.searchsorted(np.asarray(self.starts[1:], dtype=np.int64), q, side="right")
        j = q - np.asarray(self.starts, dtype=np.int64)[k]
        sizes = np.asarray(self.stream.sizes, dtype=np.int64)
        n = sizes[k]
        r, t = j // np.maximum(n, 1), j % np.maximum(n, 1)
        idx = np.empty_like(j)
        for kk in np.unique(k).tolist():  # one vectorised pass per dataset, whatever the number of rounds
            m = k == kk
            keys = _key(_TAG_INDEX, self.stream.seed, self.epoch, kk, r[m])
            idx[m] = _permute_many(t[m], int(sizes[kk]), keys)
        return k, idx
