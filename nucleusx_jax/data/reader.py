"""Windows of a token store in a keyed pseudo-random order that takes O(1) memory.

Window ``i`` of a store is ``tokens[i * seq_len : (i + 1) * seq_len + 1]`` (inputs ``w[:-1]``, labels
``w[1:]``); a store of ``N`` tokens has ``(N - 1) // seq_len`` of them. Sample ``k`` of the endless stream
is window ``perm_e(k mod n)`` of epoch ``e = k // n``, where ``perm_e`` is a Feistel network over
``[0, 2^b)`` keyed by ``(seed, e)``, restricted to ``[0, n)`` by cycle walking: a bijection computed per
index, with no array of all windows. A sample is therefore a pure function of ``(seed, k)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import checks
from .store import TokenStore

_ROUNDS = 6
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scrambling of uint64 ``x`` (any shape)."""
    x = np.asarray(x, np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """A 64-bit key from non-negative ints (seed, tags, epoch, ...): chained :func:`mix64`."""
    h = np.zeros(1, np.uint64)
    for p in parts:
        h = mix64(h ^ np.uint64(p))
    return int(h[0])


class KeyedPermutation:
    """A bijection of ``[0, n)`` chosen by ``key``: a balanced Feistel network with cycle walking."""

    def __init__(self, n: int, key: int):
        checks.integer("n", n, hint=" (the size of the permuted range)")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2  # the domain 4^half is < 4n, so a walk takes < 4 steps on average
        self.mask = np.uint64((1 << self.half) - 1)
        self.round_keys = [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        """``perm(i)`` for int ``i`` in ``[0, n)`` (any shape), as int64."""
        x = np.asarray(i, np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"indices must lie in [0, {self.n})")
        y = self._encrypt(x.astype(np.uint64))
        outside = y >= np.uint64(self.n)
        while outside.any():  # cycle walking: re-encrypt until the value falls into [0, n)
            y[outside] = self._encrypt(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64)


class Windows:
    """The ``seq_len + 1``-token windows of a store, sampled as a pure function of ``(seed, k)``."""

    def __init__(self, store: TokenStore, seq_len: int, *, seed: int, shuffle: bool = True):
        checks.integer("seq_len", seq_len)
        self.store, self.seq_len, self.seed, self.shuffle = store, seq_len, seed, shuffle
        self.num_windows = max(0, (store.num_tokens - 1) // seq_len)
        if self.num_windows == 0:
            raise ValueError(f"token store {store.path!r} ({store.num_tokens} tokens) is shorter than one window of "
                             f"seq_len + 1 = {seq_len + 1} tokens; add data or lower data.seq_len")
        self._epoch = (-1, None)  # the last epoch's permutation: O(1) state, rebuilt when the epoch changes

    def __len__(self) -> int:
        return self.num_windows

    def _permutation(self, epoch: int) -> KeyedPermutation:
        if self._epoch[0] != epoch:
            self._epoch = (epoch, KeyedPermutation(self.num_windows, derive_key(self.seed, epoch)))
        return self._epoch[1]

    def window_ids(self, samples: np.ndarray) -> np.ndarray:
        """The window index of each stream sample ``samples`` (int64, any shape)."""
        samples = np.asarray(samples, np.int64)
        epochs, pos = np.divmod(samples, self.num_windows)
        if not self.shuffle:
            return pos
        out = np.empty_like(samples)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self._permutation(int(e))(pos[m])
        return out

    def read(self, samples: Sequence[int]) -> np.ndarray:
        """Stream samples ``samples`` as int32 ``[len(samples), seq_len + 1]``; reads only those windows."""
        ids = self.window_ids(np.asarray(samples, np.int64).reshape(-1))
        out = np.empty((len(ids), self.seq_len + 1), np.int32)
        for row, w in enumerate(ids):
            start = int(w) * self.seq_len
            out[row] = self.store.read(start, start + self.seq_len + 1)
        return out
