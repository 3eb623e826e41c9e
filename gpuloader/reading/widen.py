"""Packed stripe records widened into the resident store's records, without the GIL.

A striped pack's record (``gpuloader.stores.pack.striped``: origins, directions, distance
as 28 float bytes, then ``view_ids`` of 1, 2 or 4 bytes, ``face_ids`` and ``hits`` of one
byte each, no padding) becomes :data:`gpuloader.schema.RAY_RECORD` (40 bytes, aligned: the
same 28 float bytes, ``view_ids`` and ``face_ids`` as int32 at 28 and 32, ``hits`` at 36).
:func:`widen_into` does it in one compiled loop that releases the GIL (numba ``nogil``), so
the background stripe read runs beside the fused pass of the epoch in training instead of
taking turns with it; without numba, numpy does it field by field (same bytes).
"""

from __future__ import annotations

import os

import numpy as np

from gpuloader import schema

__all__ = ["AVAILABLE", "widen_into"]

try:
    if os.environ.get("GPULOADER_NUMBA", "1") == "0":
        raise ImportError("disabled by GPULOADER_NUMBA=0")
    import numba
except ImportError:  # pragma: no cover - exercised with GPULOADER_NUMBA=0
    numba = None

AVAILABLE = numba is not None
_FLOAT_BYTES = 28  # origins (3 f4), directions (3 f4), distances (f4)


def _widen(
    raw: np.ndarray, src: np.ndarray, dst: np.ndarray, t: int, out: np.ndarray, vid: int
) -> None:  # pragma: no cover - compiled
    """out[dst[q], t] (W records of 40 bytes, as (W*40,) uint8) from raw[src[q]] (W packed
    records of 30 + vid bytes, as (W*(30+vid),) uint8), for every q."""
    r = 30 + vid
    w = raw.shape[1] // r
    for q in range(src.shape[0]):
        a = src[q]
        b = dst[q]
        for j in range(w):
            s0 = j * r
            d0 = j * 40
            for c in range(_FLOAT_BYTES):
                out[b, t, d0 + c] = raw[a, s0 + c]
            for c in range(4):
                out[b, t, d0 + 28 + c] = raw[a, s0 + 28 + c] if c < vid else 0
            out[b, t, d0 + 32] = raw[a, s0 + 28 + vid]
            out[b, t, d0 + 33] = 0
            out[b, t, d0 + 34] = 0
            out[b, t, d0 + 35] = 0
            out[b, t, d0 + 36] = raw[a, s0 + 29 + vid]


if AVAILABLE:
    _widen_compiled = numba.njit(cache=True, nogil=True)(_widen)
else:  # pragma: no cover
    _widen_compiled = None


def _fits(record: np.dtype) -> int | None:
    """The view-id byte width when ``record`` has the packed layout the loop expects."""
    f = record.fields or {}
    try:
        vid = f["view_ids"][0]
        ok = (
            record.names == tuple(schema.RECORD_ORDER)
            and f["origins"][1] == 0
            and f["directions"][1] == 12
            and f["distances"][1] == 24
            and f["view_ids"][1] == 28
            and vid.kind in "ui"
            and vid.byteorder in "<|="
            and f["face_ids"][0] == np.dtype("u1")
            and f["face_ids"][1] == 28 + vid.itemsize
            and f["hits"][1] == 29 + vid.itemsize
            and record.itemsize == 30 + vid.itemsize
        )
    except (KeyError, TypeError):
        return None
    return int(vid.itemsize) if ok else None


def widen_into(got: np.ndarray, src: np.ndarray, dst: np.ndarray, t: int, out: np.ndarray) -> None:
    """``out[dst[q], t] = got[src[q]]`` field by field, ids widened to int32.

    Args:
        got: (m, W) packed stripe records (a striped level's ``record`` dtype).
        src, dst: (q,) int64: the row of ``got`` and the slot of ``out`` of each sample.
        t: the stripe's place in the buffer (0 .. k-1).
        out: (slots, k, W) :data:`schema.RAY_RECORD`, C-contiguous.
    """
    vid = _fits(got.dtype)
    if _widen_compiled is not None and vid is not None and out.flags.c_contiguous:
        raw = np.ascontiguousarray(got).view(np.uint8).reshape(got.shape[0], -1)
        ob = out.view(np.uint8).reshape(out.shape[0], out.shape[1], -1)
        _widen_compiled(raw, src.astype(np.int64), dst.astype(np.int64), int(t), ob, vid)
        return
    for name in schema.RAY_FIELDS:  # numpy: field by field straight into place
        out[name][dst, t] = got[name][src]
