"""Numba loops for the hot spots of the CPU fused pass (``fused_numpy``).

numpy spends most of a batch in the Feistel row selection (about 36 array operations per
cycle-walking pass) and in gathering six fields per ray. One compiled loop does both for a
record store (``select_gather_records``: words (R, 10) uint32 and bytes (R, 40) uint8 views
of ``fused_numpy.RAY_RECORD``s: origins 0-2, directions 3-5, distance 6, view id 7, face
id 8, hit byte 36); ``feistel_rows`` serves stores of separate arrays. Both use the same
integer arithmetic and the same float32 operations as numpy (each product rounded on its
own; no fast-math), so the results are bit-identical to the numpy path (tests check
this). Compiled on first use and cached on disk (``cache=True``).

Without numba (or with ``GPULOADER_NUMBA=0``) :data:`AVAILABLE` is False and ``fused_numpy``
uses its numpy code.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["AVAILABLE", "feistel_rows", "select_gather_records"]

try:  # numba is a dependency; the numpy code stays for platforms without it
    if os.environ.get("GPULOADER_NUMBA", "1") == "0":
        raise ImportError("disabled by GPULOADER_NUMBA=0")
    import numba
except ImportError:  # pragma: no cover - exercised with GPULOADER_NUMBA=0
    numba = None

AVAILABLE = numba is not None


def _feistel_rows(
    j: np.ndarray, n: np.ndarray, keys: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    """out[t] = the image of j[t] under the keyed bijection of [0, n[t]) (rng.feistel_permute).

    j (T,) int64, n (T,) int64, keys (T, 4) uint32, out (T,) int64.
    """
    for t in range(j.shape[0]):
        bits = 0
        m = n[t] - 1
        while m > 0:
            bits += 1
            m >>= 1
        out[t] = _feistel_one(j[t], n[t], max(bits, 2), keys[t])


def _feistel_one(x: int, n: int, bits: int, keys: np.ndarray) -> int:  # pragma: no cover
    """The image of ``x`` under the keyed bijection of [0, n) (``bits`` of rng.feistel_bits)."""
    mask32 = np.uint64(0xFFFFFFFF)
    nn = np.uint64(n)
    y = np.uint64(x)
    while True:
        wr = bits // 2
        wl = bits - wr
        left = y >> np.uint64(wr)
        right = y & np.uint64((1 << wr) - 1)
        for r in range(4):
            h = right ^ np.uint64(keys[r])
            h ^= h >> np.uint64(16)
            h = (h * np.uint64(0x7FEB352D)) & mask32
            h ^= h >> np.uint64(15)
            h = (h * np.uint64(0x846CA68B)) & mask32
            h ^= h >> np.uint64(16)
            nxt = left ^ (h & np.uint64((1 << wl) - 1))
            left = right
            right = nxt
            wl, wr = wr, wl
        y = (left << np.uint64(wr)) | right
        if y < nn:
            return np.int64(y)


def _select_gather_records(
    words: np.ndarray,
    hits: np.ndarray,
    ray_start: np.ndarray,
    ray_count: np.ndarray,
    keep: np.ndarray,
    out_start: np.ndarray,
    keys: np.ndarray,
    table: np.ndarray,
    symmetry: np.ndarray,
    origin_scale: np.ndarray,
    distance_scale: np.ndarray,
    out_o: np.ndarray,
    out_d: np.ndarray,
    out_dist: np.ndarray,
    out_hits: np.ndarray,
    out_vid: np.ndarray,
    out_fid: np.ndarray,
    out_owner: np.ndarray,
    out_j: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """Row selection and the record gather of a whole batch in one loop over its samples.

    Per sample b and kept position j < keep[b]: ``row = j`` when keep[b] >= ray_count[b],
    else the Feistel image of j (``rng.select_rows``); then ``o = o[perm] * (sign *
    origin_scale[b])``, ``d = d[perm] * sign``, ``dist * distance_scale[b]``, hits as float32
    and ids as int64 at output ``t = out_start[b] + j``, with ``out_owner[t] = b`` and
    ``out_j[t] = j`` (the noise counters). Arrays as in ``fused_numpy.BatchPlan``.
    """
    # two passes: the rows first (pure arithmetic), then the gather, whose independent
    # loads the processor then overlaps (0.29 ms instead of 0.49 ms for 4,096 rays of 62 M)
    rows = np.empty(out_o.shape[0], np.int64)
    for b in range(keep.shape[0]):
        n = ray_count[b]
        k = keep[b]
        bits = 0
        m = n - 1
        while m > 0:
            bits += 1
            m >>= 1
        if bits < 2:
            bits = 2
        for j in range(k):
            t = out_start[b] + j
            rows[t] = ray_start[b] + (_feistel_one(j, n, bits, keys[b]) if k < n else j)
            out_owner[t] = b
            out_j[t] = j
    f32 = words.view(np.float32)
    i32 = words.view(np.int32)
    for t in range(rows.shape[0]):
        g = rows[t]
        b = out_owner[t]
        s = symmetry[b]
        scale = origin_scale[b]
        for i in range(3):
            p = table[s, i]
            sign = np.float32(table[s, 3 + i])
            out_o[t, i] = f32[g, p] * (sign * scale)
            out_d[t, i] = f32[g, 3 + p] * sign
        out_dist[t] = f32[g, 6] * distance_scale[b]
        out_vid[t] = i32[g, 7]
        out_fid[t] = i32[g, 8]
        out_hits[t] = np.float32(hits[g, 36])


if AVAILABLE:
    _jit = numba.njit(cache=True, nogil=True)
    feistel_rows = _jit(_feistel_rows)
    _feistel_one = _jit(_feistel_one)
    select_gather_records = _jit(_select_gather_records)
else:  # pragma: no cover
    feistel_rows = _feistel_rows
    select_gather_records = _select_gather_records
