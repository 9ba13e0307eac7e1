"""The data order at any corpus size: keyed permutations evaluated only where they are needed.

A run's order is a pure function of (seed, epoch, step), the same at every world size, and
nothing of size O(rows) is ever built: `Permutation(n, key)` maps positions to rows with a
Feistel network over the smallest power of two >= n and cycle-walking (an image >= n is
permuted again until it lands in [0, n); the network is a bijection of the power-of-two
domain, so this ends and stays a bijection of [0, n)). grain's `index_shuffle` works the same
way. `Mixture` assigns whole optimizer steps to sources the same way.

Bump SAMPLER_VERSION whenever the order produced for the same (config, seed) changes: it is
saved with every checkpoint, and a resume under another version is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SAMPLER_VERSION = "feistel-v1"
_ROUNDS = 6
_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 (wrapping arithmetic): a well-mixed 64-bit hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """One 64-bit key from integers (seed, epoch, source, ...), order-sensitive."""
    h = np.zeros(1, dtype=np.uint64)
    for p in parts:
        h = _splitmix64(h ^ np.array([p & _M64], dtype=np.uint64))
    return int(h[0])


class Permutation:
    """A keyed pseudo-random bijection of [0, n), applied to arrays of positions."""

    def __init__(self, n: int, key: int) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._hi, self._lo = bits // 2, bits - bits // 2  # x = hi << lo | lo; the widths swap each round
        self._keys = [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]

    def _network(self, x: np.ndarray) -> np.ndarray:
        hi_bits, lo_bits = self._hi, self._lo
        for k in self._keys:
            hi, lo = x >> np.uint64(lo_bits), x & np.uint64((1 << lo_bits) - 1)
            # (hi, lo) -> (lo, hi + F(lo) mod 2^hi_bits): invertible given lo, whatever F is
            new_lo = (hi + _splitmix64(lo ^ k)) & np.uint64((1 << hi_bits) - 1)
            x = (lo << np.uint64(hi_bits)) | new_lo
            hi_bits, lo_bits = lo_bits, hi_bits
        return x

    def __call__(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Rows at `positions` (each in [0, n)), as int64."""
        x = np.asarray(positions, dtype=np.uint64)
        if self.n <= 1:
            return x.astype(np.int64)
        y = self._network(x)
        out = y >= np.uint64(self.n)
        while out.any():  # cycle-walking: < 2 passes expected (the domain is < 2n)
            y[out] = self._network(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)


def apportion(weights: Sequence[float], total: int) -> list[int]:
    """Integers summing to `total`, each within 1 of its share total * w / sum(w) (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    share = total * w / w.sum()
    out = np.floor(share).astype(np.int64)
    for i in np.argsort(-(share - out), kind="stable")[: total - int(out.sum())]:
        out[i] += 1
    return out.tolist()


class Mixture:
    """Which source, and which of its batches, each step of an epoch draws.

    An epoch has `sum(batches_per_source)` steps (one pass over every source); source i gets
    `apportion(weights)[i]` of them, at positions of the epoch given by a keyed permutation of
    the steps. Source i's r-th step of epoch e takes batch e * share_i + r of its own stream,
    which runs through the source's epochs (so a source with a larger share is repeated and one
    with a smaller share is seen in part, each pass in a new order).
    """

    def __init__(self, batches_per_source: Sequence[int], weights: Sequence[float], seed: int) -> None:
        self.steps_per_epoch = int(sum(batches_per_source))
        self.shares = apportion(weights, self.steps_per_epoch)
        self._bounds = np.cumsum([0, *self.shares])
        self.seed = seed

    def at(self, epoch: int, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, batch index in that source's stream) of the given steps of `epoch`."""
        steps = np.asarray(steps, dtype=np.int64)
        if len(self.shares) == 1:
            return np.zeros_like(steps), epoch * self.steps_per_epoch + steps
        q = Permutation(self.steps_per_epoch, derive_key(self.seed, epoch, 0x5C4ED))(steps)
        source = np.searchsorted(self._bounds, q, side="right") - 1
        shares = np.asarray(self.shares, dtype=np.int64)
        return source, epoch * shares[source] + (q - self._bounds[source])

    def steps_before(self, step: int) -> list[int]:
        """Steps each source got among steps 0 .. step-1 (vectorised over the current epoch)."""
        epoch, s = divmod(step, self.steps_per_epoch)
        counts = np.asarray(self.shares, dtype=np.int64) * epoch
        for start in range(0, s, 1 << 20):
            source, _ = self.at(epoch, np.arange(start, min(s, start + (1 << 20))))
            counts += np.bincount(source, minlength=len(self.shares))
        return counts.tolist()
