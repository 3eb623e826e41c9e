"""One fused pass per batch, on the CPU: row selection, gather, symmetry, normalization,
noise and ``ray_to_voxel`` for every ray of a batch at once; one pass for the grids and one
for the view positions. No Python loop over samples or rays.

These are the reference semantics of the CUDA kernels of ``kernels/fused.cu`` (wrapped by
:mod:`gpuloader.fused.cuda`): same arguments, same results (integers bit for bit,
floats to rounding; see :mod:`gpuloader.augment.numpy_backend` for the float order).

Inputs are the *store* (every sample of a split, concatenated; see
:mod:`gpuloader.stores.resident`) and a :class:`BatchPlan`, one batch's slice of the epoch
plan (:mod:`gpuloader.plan.epoch`). For output ray ``r`` of sample ``b`` (``j = r -
out_start[b]``, ``0 <= j < keep[b]``)::

    row   = j                                   if keep[b] >= ray_count[b]
          = feistel_permute(j, ray_count[b], select_keys[b])   otherwise (rng.feistel_permute)
    g     = ray_start[b] + row                  (row of the store)
    origins[r]     = P_b o[g] * origin_scale[b] (+ origin_std[b] * n_o(b, j))
    directions[r]  = P_b d[g]                   (normalized after + direction_std[b] * n_d(b, j))
    distances[r]   = dist[g] * distance_scale[b]
    hits[r] = float32(hits[g]);  view_ids[r], face_ids[r] = int64(...);  ray_to_voxel[r] = b

with the noise of ``numpy_backend.transform_rays`` (Philox block ``(j, index[b], epoch[b],
ORIGIN_NOISE / DIRECTION_NOISE + purpose_offset[b])``). This is exactly what the CPU API
does: ``rng.select_rows`` in the dataset, then the fused plan with ``ray_row = j``.

Grids: ``out[b, 0, i'] = grid_b[P_b^-1 i'] ^ jitter(b, i')`` inside the sample's own cube
``[0, side[b])^3`` (float32 0/1), 0 in the padding (the end of each axis, as collate pads).
Views: ``P_b p * origin_scale[b]`` for the ``view_count[b]`` rows from ``view_start[b]``.
"""

from __future__ import annotations

import numpy as np

from gpuloader import schema
from gpuloader.augment import rng, symmetry
from gpuloader.augment.numpy_backend import SYMMETRY_TABLE
from gpuloader.fused import numba_loops as fused_numba
from gpuloader.plan.batch import BatchPlan

__all__ = ["select_store_rows", "gather_rays", "gather_grids", "gather_views"]


def _owners(counts: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)


# --- row selection -------------------------------------------------------------------------

_H1 = np.uint32(0x7FEB352D)
_H2 = np.uint32(0x846CA68B)
_ONE = np.uint32(1)


def _hash32(x: np.ndarray) -> np.ndarray:
    """rng's 32-bit finalizer, in place on a uint32 array (products wrap modulo 2**32)."""
    x ^= x >> np.uint32(16)
    x *= _H1
    x ^= x >> np.uint32(15)
    x *= _H2
    x ^= x >> np.uint32(16)
    return x


def feistel_bits(n: np.ndarray) -> np.ndarray:
    """Vector ``rng.feistel_bits``: (K,) int64 domain sizes -> (K,) uint32 bits (>= 2)."""
    n = np.asarray(n, dtype=np.int64)
    length = np.frexp(np.maximum(n - 1, 0).astype(np.float64))[1]  # bit_length, exact < 2**53
    return np.maximum(length, 2).astype(np.uint32)


def _feistel_once(x: np.ndarray, bits: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """One 4-round pass of ``rng._feistel_once`` with a domain and keys per element.

    x (K,) uint32, bits (K,) uint32, keys (K, 4) uint32 -> (K,) uint32.
    """
    wr = bits >> _ONE
    wl = bits - wr
    left = x >> wr
    right = x & ((_ONE << wr) - _ONE)
    for r in range(rng.FEISTEL_ROUNDS):
        f = _hash32(right ^ keys[:, r])
        f &= (_ONE << wl) - _ONE
        left, right = right, left ^ f
        wl, wr = wr, wl
    return (left << wr) | right


def feistel_permute_many(j: np.ndarray, n: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``rng.feistel_permute`` for many (position, domain, keys) triples at once.

    Args:
        j: (K,) positions, ``0 <= j < n``.
        n: (K,) int64 domain of each position (1 <= n < 2**32).
        keys: (K, 4) uint32 round keys of each position's bijection.

    Returns:
        (K,) int64 images: equal to ``rng.feistel_permute([j_i], n_i, keys_i)`` for each i.
    """
    x = np.asarray(j, dtype=np.uint32).copy()
    n32 = np.asarray(n, dtype=np.int64).astype(np.uint32)
    bits = feistel_bits(n)
    keys = np.asarray(keys, dtype=np.uint32)
    todo = np.arange(x.shape[0])
    # cycle-walking: each pass keeps only the positions still outside their domain
    while todo.size:
        y = _feistel_once(x[todo], bits[todo], keys[todo])
        x[todo] = y
        todo = todo[y >= n32[todo]]
    return x.astype(np.int64)


def select_store_rows(plan: BatchPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The store rows of every kept ray of the batch, flat, in output order.

    Returns:
        ``rows`` (T,) int64 rows of the store, ``owner`` (T,) int64 sample of each output
        ray, ``j`` (T,) int64 position of the ray among its sample's kept rays.
    """
    keep = np.asarray(plan.keep, dtype=np.int64)
    owner = _owners(keep)
    j = np.arange(owner.shape[0], dtype=np.int64) - np.asarray(plan.out_start)[owner]
    count = np.asarray(plan.ray_count, dtype=np.int64)
    sub = (keep < count)[owner]
    local = j.copy()
    if sub.any():
        pick = np.flatnonzero(sub)
        o = owner[pick]
        if fused_numba.AVAILABLE and USE_NUMBA:
            got = np.empty(pick.shape[0], dtype=np.int64)
            keys = np.ascontiguousarray(plan.select_keys[o], dtype=np.uint32)
            fused_numba.feistel_rows(j[pick], count[o], keys, got)
            local[pick] = got
        else:
            local[pick] = feistel_permute_many(j[pick], count[o], plan.select_keys[o])
    return np.asarray(plan.ray_start, dtype=np.int64)[owner] + local, owner, j


# --- rays ----------------------------------------------------------------------------------


#: per-ray fields of a store, in the record layout (``RAY_RECORD``) and as separate arrays
RAY_FIELDS = schema.RAY_FIELDS
#: one ray as one 40-byte record (:mod:`gpuloader.schema`)
RAY_RECORD = schema.RAY_RECORD


def _signed(vec: np.ndarray, table: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """``P v * scale`` row by row: vec (T, 3) float32 (any strides), table (T, 6) int32
    ``SYMMETRY_TABLE`` rows, scale (T,) float32 or None -> new (T, 3) float32.

    ``sign * v[perm] * s`` is computed as ``v[perm] * (sign * s)``: negation commutes with
    rounding, so the result is bit-identical to ``numpy_backend.transform_rays``.
    """
    out = np.take_along_axis(vec, table[:, :3], axis=1)
    factor = table[:, 3:].astype(np.float32)
    if scale is not None:
        factor *= scale[:, None]
    out *= factor
    return out


#: use the numba loops of ``fused_numba`` when numba is there (tests switch it off to compare)
USE_NUMBA = True


def _select_gather_numba(records: np.ndarray, plan: BatchPlan) -> dict[str, np.ndarray]:
    """Row selection, gather, symmetry and scales of every ray in one compiled loop."""
    keep = np.asarray(plan.keep, np.int64)
    t = int(keep.sum())
    out = {
        k: np.empty((t, *schema.field(k).shape) if k in RAY_FIELDS else t, dt)
        for k, dt in _RAY_OUT_DTYPES.items()
    }
    out["j"] = np.empty(t, np.int64)
    fused_numba.select_gather_records(
        records.view(np.uint32).reshape(-1, RAY_RECORD.itemsize // 4),
        records.view(np.uint8).reshape(-1, RAY_RECORD.itemsize),
        np.asarray(plan.ray_start, np.int64),
        np.asarray(plan.ray_count, np.int64),
        keep,
        np.asarray(plan.out_start, np.int64),
        np.ascontiguousarray(plan.select_keys, np.uint32),
        SYMMETRY_TABLE,
        np.asarray(plan.symmetry, np.int64),
        np.asarray(plan.origin_scale, np.float32),
        np.asarray(plan.distance_scale, np.float32),
        *out.values(),
    )
    return out


def _gather_rows(store: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The per-ray fields of ``rows``: from the record array when the store has one (one
    gather), else one gather per field array."""
    records = store.get("records")
    if records is not None:
        got = np.take(records, rows)
        return {k: got[k] for k in RAY_FIELDS}
    return {k: np.take(store[k], rows, axis=0) for k in RAY_FIELDS}


def _normals(plan: BatchPlan, owner: np.ndarray, j: np.ndarray, purpose: int) -> np.ndarray:
    """(T, 3) float32 N(0, 1) draws of block ``(j, index, epoch, purpose + offset)``."""
    out = np.empty((owner.shape[0], 3), dtype=np.float32)
    key = plan.epoch.astype(np.uint64) << np.uint64(32) | plan.purpose_offset.astype(np.uint64)
    for k in np.unique(key[owner]):
        sel = key[owner] == k
        b0 = int(np.flatnonzero(key == k)[0])
        words = rng.random_words(
            plan.seed,
            int(plan.epoch[b0]),
            plan.index[owner[sel]],
            purpose + int(plan.purpose_offset[b0]),
            j[sel],
        )
        out[sel] = rng.normal_pairs(words)[:, :3].astype(np.float32)
    return out


def gather_rays(
    store: dict[str, np.ndarray], plan: BatchPlan, out: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Every kept ray of the batch, gathered from the store and augmented (module doc).

    Args:
        store: ``origins``/``directions`` (R, 3) float32, ``distances`` (R,) float32, ``hits``
            (R,) uint8, ``view_ids``/``face_ids`` (R,) int32 (numpy or memory-mapped), or
            ``records`` (R,) :data:`RAY_RECORD` holding the same fields.
        plan: the batch's parameters.
        out: preallocated outputs to fill (the keys below), or None for new arrays.

    Returns:
        ``origins``/``directions`` (T, 3) float32, ``distances``/``hits`` (T,) float32,
        ``view_ids``/``face_ids``/``ray_to_voxel`` (T,) int64.
    """
    if "records" in store and fused_numba.AVAILABLE and USE_NUMBA:
        got = _select_gather_numba(store["records"], plan)
        owner, j = got.pop("ray_to_voxel"), got.pop("j")
        o, d = got["origins"], got["directions"]
    else:
        rows, owner, j = select_store_rows(plan)
        table = SYMMETRY_TABLE[plan.symmetry][owner]
        got = _gather_rows(store, rows)
        o = _signed(got["origins"], table, plan.origin_scale[owner])
        d = _signed(got["directions"], table)
        got["distances"] = got["distances"] * plan.distance_scale[owner]
        got["hits"] = got["hits"].astype(np.float32)
    ostd = plan.origin_std[owner]
    if np.any(ostd > 0):
        sel = np.flatnonzero(ostd > 0)
        noise = _normals(plan, owner[sel], j[sel], rng.Purpose.ORIGIN_NOISE)
        o[sel] = o[sel] + ostd[sel][:, None] * noise
    dstd = plan.direction_std[owner]
    if np.any(dstd > 0):
        sel = np.flatnonzero(dstd > 0)
        noise = _normals(plan, owner[sel], j[sel], rng.Purpose.DIRECTION_NOISE)
        v = d[sel] + dstd[sel][:, None] * noise
        sq = (v[:, 0] * v[:, 0] + v[:, 1] * v[:, 1]) + v[:, 2] * v[:, 2]
        d[sel] = v / np.sqrt(sq)[:, None]
    result = {**{k: got[k] for k in RAY_FIELDS}, "origins": o, "directions": d}
    result["ray_to_voxel"] = owner
    return _fill(result, out, _RAY_OUT_DTYPES)


_RAY_OUT_DTYPES = {
    **{k: np.dtype(schema.BATCH_DTYPES[k]) for k in schema.RAY_FIELDS},
    "ray_to_voxel": np.dtype(np.int64),
}


def _fill(
    result: dict[str, np.ndarray], out: dict[str, np.ndarray] | None, dtypes: dict[str, type]
) -> dict[str, np.ndarray]:
    if out is None:
        return {k: np.ascontiguousarray(v, dtype=dtypes[k]) for k, v in result.items()}
    for k, v in result.items():
        out[k][...] = v
    return out


# --- views ---------------------------------------------------------------------------------


def gather_views(
    view_positions: np.ndarray, plan: BatchPlan, out: np.ndarray | None = None
) -> np.ndarray:
    """View positions of the batch: (sum view_count, 3) float32, ``P_b p * origin_scale``.

    Args:
        view_positions: (V_store, 3) float32 every view of the store.
        plan: the batch's parameters (view_start, view_count, view_out_start).
        out: a preallocated (sum view_count, 3) float32 array, or None.
    """
    count = np.asarray(plan.view_count, dtype=np.int64)
    owner = _owners(count)
    k = np.arange(owner.shape[0], dtype=np.int64) - np.asarray(plan.view_out_start)[owner]
    table = SYMMETRY_TABLE[plan.symmetry][owner]
    p = _signed(
        np.take(view_positions, plan.view_start[owner] + k, axis=0), table, plan.origin_scale[owner]
    )
    if out is None:
        return p
    out[...] = p
    return out


# --- grids ---------------------------------------------------------------------------------

_grid_maps: dict[int, np.ndarray] = {}


def grid_maps(side: int) -> np.ndarray:
    """(48, side**3) int32: ``out.flat[i] = grid.flat[maps[s, i]]`` applies symmetry ``s``
    (``symmetry.apply_grid``) to a C-order (side, side, side) grid. Built once per side."""
    got = _grid_maps.get(side)
    if got is None:
        base = np.arange(side**3, dtype=np.int32).reshape(side, side, side)
        got = np.stack(
            [symmetry.apply_grid(s, base).ravel() for s in range(symmetry.NUM_SYMMETRIES)]
        )
        got.setflags(write=False)
        _grid_maps[side] = got
    return got


def gather_grids(grids: np.ndarray, plan: BatchPlan, out: np.ndarray | None = None) -> np.ndarray:
    """The batch's grids with each sample's symmetry and occupancy jitter.

    Args:
        grids: (G,) uint8 flat grid store (sample b: ``side[b]**3`` bytes from
            ``grid_start[b]``, C order (z, y, x), 0/1).
        plan: the batch's parameters.
        out: a preallocated (B, 1, S, S, S) float32 array (S = the batch's largest side).

    Returns:
        (B, 1, S, S, S) float32: sample b in ``[:, 0, :side, :side, :side]``, 0 elsewhere.
    """
    b, s_max = plan.batch_size, plan.grid_side
    if out is None:
        out = np.zeros((b, 1, s_max, s_max, s_max), dtype=np.float32)
    sides = np.asarray(plan.side, dtype=np.int64)
    uniform = bool(np.all(sides == s_max))
    if not uniform:
        out[...] = 0
    for side in np.unique(sides):  # one pass per grid size (one, unless levels are mixed)
        side = int(side)
        members = np.flatnonzero(sides == side) if not uniform else np.arange(b)
        src = plan.grid_start[members][:, None] + grid_maps(side)[plan.symmetry[members]]
        vals = np.take(grids, src)  # (m, side**3) uint8
        thr = plan.jitter_threshold[members]
        if np.any(thr > 0):
            vals = vals ^ _jitter(plan, members, side)
        vals = vals.reshape(-1, side, side, side)
        if uniform:
            out[:, 0] = vals
        else:
            out[members, 0, :side, :side, :side] = vals
    return out


def _jitter(plan: BatchPlan, members: np.ndarray, side: int) -> np.ndarray:
    """(m, side**3) uint8 flips: word ``v & 3`` of block ``(v >> 2, index, epoch, JITTER +
    offset)`` below the sample's threshold (as ``numpy_backend.transform_voxels``)."""
    v = np.arange(side**3, dtype=np.int64)
    thr = plan.jitter_threshold[members].astype(np.uint32)
    flips = np.zeros((members.size, v.size), dtype=np.uint8)
    epoch, offset = plan.epoch[members], plan.purpose_offset[members]
    key = epoch.astype(np.uint64) << np.uint64(32) | offset.astype(np.uint64)
    for k in np.unique(key):  # one draw per (epoch, segment): every grid of it at once
        rows = np.flatnonzero((key == k) & (thr > 0))
        if rows.size == 0:
            continue
        b0 = int(rows[0])
        words = rng.random_words(
            plan.seed,
            int(epoch[b0]),
            plan.index[members[rows]][:, None],
            rng.Purpose.JITTER + int(offset[b0]),
            (v >> 2)[None, :],
        )  # (r, side**3, 4)
        w = np.take_along_axis(words, (v & 3)[None, :, None], axis=2)[..., 0]
        flips[rows] = (w >> np.uint32(8)) < thr[rows][:, None]
    return flips
