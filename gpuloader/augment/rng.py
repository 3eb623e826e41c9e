"""Counter-based random numbers: every decision is a pure function of its coordinates.

Design decision 3: a random word is ``philox4x32_10(counter, key)`` with

* ``key = (seed & 0xffffffff, seed >> 32)``
* ``counter = (c0, index, epoch, purpose)`` where ``c0`` counts draws inside one
  (sample, purpose) stream: a ray row, a voxel block, a round number.

The same function is written in CUDA (``kernels/philox.cuh``) and gives the same words, so
the CPU fallback and the GPU make the same decisions whatever the number of workers,
processes or devices. Floats are made from integers the same way on both sides.

Subsampling without replacement (design decision 4) uses a keyed Feistel bijection of
``[0, 2**bits)`` with cycle-walking down to ``[0, n)``: O(k) for k rows, no n-sized buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Purpose",
    "SampleContext",
    "philox4x32",
    "random_words",
    "uniform24",
    "bernoulli_threshold",
    "normal_pairs",
    "feistel_keys",
    "feistel_permute",
    "select_rows",
    "permutation",
]

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint32(0x9E3779B9)
_W1 = np.uint32(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


class Purpose:
    """Purpose codes (counter word 3). Values are part of the on-wire contract with CUDA."""

    SHUFFLE = 1  # sampler order
    SYMMETRY = 2  # rotation / flip draws
    SUBSAMPLE = 3  # Feistel round keys of the ray selection
    ORIGIN_NOISE = 4
    DIRECTION_NOISE = 5
    JITTER = 6
    REPLACE = 7  # on_error='skip': the order replacements of a bad sample are tried in (CPU)
    SEGMENT_STRIDE = 16  # a Compose with several fused segments offsets purposes by this
    SHARD = 8  # sampler shard="samples": the fixed split of samples over ranks (CPU, epoch 0)
    STRIPE = 9  # striped pack: each sample's permutation of its rays (pack time, CPU)


@dataclass(frozen=True)
class SampleContext:
    """Coordinates of one sample's random stream: (seed, epoch, dataset index)."""

    seed: int
    epoch: int
    index: int


def _key(seed: int) -> tuple[np.uint32, np.uint32]:
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)


def philox4x32(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 block function.

    Args:
        counter: (..., 4) uint32 counters.
        key: two 32-bit key words.

    Returns:
        (..., 4) uint32 random words.
    """
    c = np.asarray(counter, dtype=np.uint32)
    if c.size <= 4 * _SCALAR_BLOCKS:  # a few blocks: plain ints beat ~100 tiny array ops
        k = (int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF)
        flat = [_philox_block(*(int(w) for w in row), *k) for row in c.reshape(-1, 4)]
        return np.array(flat, dtype=np.uint32).reshape(c.shape)
    c0, c1, c2, c3 = (c[..., i].astype(np.uint64) for i in range(4))
    k0 = np.uint32(key[0])
    k1 = np.uint32(key[1])
    for r in range(10):
        if r:
            k0 = np.uint32((int(k0) + int(_W0)) & 0xFFFFFFFF)
            k1 = np.uint32((int(k1) + int(_W1)) & 0xFFFFFFFF)
        p0 = _M0 * c0
        p1 = _M1 * c2
        hi0, lo0 = p0 >> _SHIFT32, p0 & _MASK32
        hi1, lo1 = p1 >> _SHIFT32, p1 & _MASK32
        c0 = hi1 ^ c1 ^ np.uint64(k0)
        c1 = lo1
        c2 = hi0 ^ c3 ^ np.uint64(k1)
        c3 = lo0
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


#: up to this many counters, :func:`philox4x32` runs on Python ints (one sample's keys)
_SCALAR_BLOCKS = 8


def _philox_block(
    c0: int, c1: int, c2: int, c3: int, k0: int, k1: int
) -> tuple[int, int, int, int]:
    """Philox4x32-10 of one counter in Python ints: the rounds of :func:`philox4x32`."""
    for r in range(10):
        if r:
            k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
            k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (
            (p1 >> 32) ^ c1 ^ k0,
            p1 & 0xFFFFFFFF,
            (p0 >> 32) ^ c3 ^ k1,
            p0 & 0xFFFFFFFF,
        )
    return c0, c1, c2, c3


def random_words(
    seed: int, epoch: int, index: np.ndarray | int, purpose: int, c0: np.ndarray | int
) -> np.ndarray:
    """Four random uint32 words per (index, c0) pair (broadcast): shape (..., 4) uint32."""
    if np.ndim(index) == 0 and np.ndim(c0) == 0:  # one block: no arrays to broadcast
        k0, k1 = _key(seed)
        words = _philox_block(
            int(c0) & 0xFFFFFFFF,
            int(index) & 0xFFFFFFFF,
            int(epoch) & 0xFFFFFFFF,
            int(purpose) & 0xFFFFFFFF,
            int(k0),
            int(k1),
        )
        return np.array(words, dtype=np.uint32)
    index = np.asarray(index, dtype=np.uint64)
    c0 = np.asarray(c0, dtype=np.uint64)
    c0, index = np.broadcast_arrays(c0, index)
    counter = np.empty(c0.shape + (4,), dtype=np.uint32)
    counter[..., 0] = c0 & _MASK32
    counter[..., 1] = index & _MASK32
    counter[..., 2] = np.uint32(int(epoch) & 0xFFFFFFFF)
    counter[..., 3] = np.uint32(int(purpose) & 0xFFFFFFFF)
    return philox4x32(counter, _key(seed))


def uniform24(words: np.ndarray) -> np.ndarray:
    """uint32 words -> float64 uniforms in [0, 1) with 24 bits (exact in float32 too)."""
    return (np.asarray(words, dtype=np.uint32) >> np.uint32(8)).astype(np.float64) * (2.0**-24)


def bernoulli_threshold(p: float) -> int:
    """Integer threshold t so that ``(word >> 8) < t`` has probability ``p`` (clamped to [0,1])."""
    p = min(max(float(p), 0.0), 1.0)
    return int(round(p * (1 << 24)))


def normal_pairs(words: np.ndarray) -> np.ndarray:
    """Box-Muller on the four words of a Philox block: (..., 4) uint32 -> (..., 4) float64 N(0,1).

    Pairs (w0, w1) and (w2, w3) each give (r cos t, r sin t) with u1 in (0, 1].
    """
    w = np.asarray(words, dtype=np.uint32)
    u = uniform24(w)
    out = np.empty(w.shape, dtype=np.float64)
    for a, b in ((0, 1), (2, 3)):
        u1 = u[..., a] + 2.0**-24  # (0, 1]
        r = np.sqrt(-2.0 * np.log(u1))
        theta = (2.0 * np.pi) * u[..., b]
        out[..., a] = r * np.cos(theta)
        out[..., b] = r * np.sin(theta)
    return out


# --- Feistel bijection -------------------------------------------------------------------

FEISTEL_ROUNDS = 4


_H1 = np.uint32(0x7FEB352D)
_H2 = np.uint32(0x846CA68B)
_S15 = np.uint32(15)
_S16 = np.uint32(16)


def _hash32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer finalizer (xorshift-multiply), identical in ``kernels/philox.cuh``.

    x: uint32 array (products of uint32 arrays wrap modulo 2**32 in numpy, as in C).
    """
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> _S16)
    x *= _H1
    x ^= x >> _S15
    x *= _H2
    x ^= x >> _S16
    return x


def feistel_bits(n: int) -> int:
    """Bits of the Feistel domain ``[0, 2**bits)`` that covers ``[0, n)`` (at least 2)."""
    return max(2, int(n - 1).bit_length()) if n > 1 else 2


def feistel_keys(seed: int, epoch: int, index: int, purpose: int = Purpose.SUBSAMPLE) -> np.ndarray:
    """The round keys of one sample's bijection: (FEISTEL_ROUNDS,) uint32 (word 0 of Philox)."""
    k0, k1 = (int(k) for k in _key(seed))
    tail = (int(index) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(purpose) & 0xFFFFFFFF)
    # random_words(seed, epoch, index, purpose, arange(ROUNDS))[:, 0], in Python ints
    words = [_philox_block(r, *tail, k0, k1)[0] for r in range(FEISTEL_ROUNDS)]
    return np.array(words, dtype=np.uint32)


def _feistel_once(x: np.ndarray, bits: int, keys: np.ndarray) -> np.ndarray:
    """One pass of the 4-round Feistel network on ``[0, 2**bits)``.

    ``x`` is split into a high part of ``bits - bits // 2`` bits and a low part of
    ``bits // 2`` bits; a round maps ``(L, R)`` to ``(R, L ^ (hash32(R ^ key) & mask_L))``,
    so the two widths swap each round (an unbalanced network for odd ``bits``) and are back in
    place after the 4 rounds. Any ``bits`` works, so the domain is below ``2 n`` and
    cycle-walking takes under 2 passes on average. (The hash is :func:`_hash32`, written out
    in place: the arrays are small and each operation's call costs more than its work.)
    """
    wr = bits // 2
    wl = bits - wr
    left = x >> np.uint32(wr)
    right = x & np.uint32((1 << wr) - 1)
    h = np.empty_like(right)
    t = np.empty_like(right)
    for r in range(FEISTEL_ROUNDS):
        np.bitwise_xor(right, keys[r], out=h)
        np.right_shift(h, _S16, out=t)
        h ^= t
        h *= _H1
        np.right_shift(h, _S15, out=t)
        h ^= t
        h *= _H2
        np.right_shift(h, _S16, out=t)
        h ^= t
        h &= np.uint32((1 << wl) - 1)
        h ^= left
        left, right, h = right, h, left
        wl, wr = wr, wl
    left <<= np.uint32(wr)
    left |= right
    return left


def _feistel_walk_scalar(x: int, n: int, bits: int, keys: list[int]) -> int:
    """Cycle-walk one value in plain Python ints (the same function as the vector path)."""
    while True:
        wr = bits // 2
        wl = bits - wr
        left, right = x >> wr, x & ((1 << wr) - 1)
        for key in keys:
            h = right ^ key
            h ^= h >> 16
            h = (h * 0x7FEB352D) & 0xFFFFFFFF
            h ^= h >> 15
            h = (h * 0x846CA68B) & 0xFFFFFFFF
            h ^= h >> 16
            left, right = right, left ^ (h & ((1 << wl) - 1))
            wl, wr = wr, wl
        x = (left << wr) | right
        if x < n:
            return x


#: below this many values still walking, the walk finishes in scalar code (cheaper per call)
_SCALAR_TAIL = 24


def feistel_permute(i: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """Image of positions ``i`` (< n) under the keyed bijection of ``[0, n)``.

    Args:
        i: (k,) integer positions in [0, n).
        n: domain size, 1 <= n < 2**32.
        keys: (FEISTEL_ROUNDS,) uint32 round keys (see :func:`feistel_keys`).

    Returns:
        (k,) int64, distinct for distinct ``i``.
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    bits = feistel_bits(n)
    keys = np.asarray(keys, dtype=np.uint32)
    x = np.asarray(i, dtype=np.uint32).copy()
    if bits <= _TABLE_BITS and x.size >= _TABLE_MIN_VALUES:
        return _feistel_permute_tables(x, n, bits, keys)
    todo = np.ones(x.shape, dtype=bool)
    # Cycle-walking: under 2 rounds on average (2**bits < 2 n), but the slowest of k values
    # takes ~log(k) rounds; vector rounds while many walk, then the few left one by one.
    while True:
        x[todo] = _feistel_once(x[todo], bits, keys)
        todo = x >= np.uint32(n)
        left = np.flatnonzero(todo)
        if left.size == 0:
            return x.astype(np.int64)
        if left.size <= _SCALAR_TAIL:
            out = x.astype(np.int64)
            key_list = [int(k) for k in keys]
            for j in left:
                out[j] = _feistel_walk_scalar(int(x[j]), n, bits, key_list)
            return out


#: domains of up to this many bits use round tables (2**ceil(bits/2) entries per round)
_TABLE_BITS = 22
#: fewer values than this are permuted without tables (a table costs about one pass)
_TABLE_MIN_VALUES = 16


def _round_tables(bits: int, keys: np.ndarray) -> np.ndarray:
    """Each round's function of its right half, ``hash32(R ^ key) & mask_L`` for every R, as
    in :func:`_feistel_once`: (FEISTEL_ROUNDS, 2**ceil(bits/2)) uint32 (a round whose right
    half is narrower reads only the first 2**width entries of its row)."""
    wr = bits // 2
    wl = bits - wr
    masks = np.array([(1 << (wl if r % 2 == 0 else wr)) - 1 for r in range(FEISTEL_ROUNDS)])
    values = np.arange(1 << wl, dtype=np.uint32)
    tables = _hash32(values[None, :] ^ keys[:, None])
    tables &= masks.astype(np.uint32)[:, None]
    return tables


def _feistel_permute_tables(x: np.ndarray, n: int, bits: int, keys: np.ndarray) -> np.ndarray:
    """:func:`feistel_permute` of (k,) uint32 ``x`` by table lookups: the same bijection.

    A round is two operations (a lookup and an xor) instead of about ten, and a domain of
    ``bits`` bits has ``2**ceil(bits / 2)`` right halves, so the tables are small."""
    tables = list(_round_tables(bits, keys))
    wr0 = bits // 2
    low = np.uint32((1 << wr0) - 1)
    shift = np.uint32(wr0)
    limit = np.uint32(n)
    todo = np.arange(x.size)
    cur = x
    while True:
        left = cur >> shift
        right = cur & low
        for table in tables:
            left, right = right, left ^ table[right]
        cur = (left << shift) | right  # widths back in place after the 4 rounds
        x[todo] = cur
        out = cur >= limit
        if not out.any():
            return x.astype(np.int64)
        todo = todo[out]
        cur = cur[out]
        if todo.size <= _SCALAR_TAIL:  # the few still walking: on in scalar code
            return _walk_tail(x.astype(np.int64), todo, cur, n, int(wr0), tables)


def _walk_tail(
    out: np.ndarray, todo: np.ndarray, cur: np.ndarray, n: int, shift: int, tables: list
) -> np.ndarray:
    """Finish the cycle walk of the values ``cur`` (at ``out[todo]``) one by one, with the
    round tables as lists: the rounds of :func:`_feistel_permute_tables`, in Python."""
    rows = [t.tolist() for t in tables]
    low = (1 << shift) - 1
    for j, c in zip(todo.tolist(), cur.tolist(), strict=True):
        while c >= n:
            left, right = c >> shift, c & low
            for table in rows:
                left, right = right, left ^ table[right]
            c = (left << shift) | right
        out[j] = c
    return out


def select_rows(n: int, k: int | None, seed: int, epoch: int, index: int) -> np.ndarray:
    """The ray rows one sample keeps: (k,) int64.

    ``arange(n)`` when ``k`` is None or ``k >= n`` (file order); else the first ``k`` images
    of the sample's Feistel bijection of ``[0, n)``: distinct rows, without replacement, a pure
    function of (seed, epoch, index).
    """
    if k is None or k >= n:
        return np.arange(n, dtype=np.int64)
    keys = feistel_keys(seed, epoch, index, Purpose.SUBSAMPLE)
    return feistel_permute(np.arange(max(k, 0)), n, keys)


def permutation(n: int, seed: int, epoch: int, purpose: int = Purpose.SHUFFLE, index: int = 0):
    """A permutation of ``[0, n)`` that is a pure function of (seed, epoch, purpose, index)."""
    keys = feistel_keys(seed, epoch, index, purpose)
    return feistel_permute(np.arange(n), n, keys)
