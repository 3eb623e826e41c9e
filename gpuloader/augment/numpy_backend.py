"""The numpy augmentation back end: batched functions that apply per-sample parameters.

These functions are the per-sample reference: the CPU API's apply
(:func:`gpuloader.augment.apply.apply_plan`) and the oracle of the fused pass
(:mod:`gpuloader.fused`, whose numpy and CUDA versions give the same results: integers bit for
bit, floats to rounding). Rays of a batch are flat (concatenated over samples) and carry
``ray_sample`` (which sample) and ``ray_row`` (position among that sample's kept rays, the
counter of its noise draws).

Per-sample parameters (:class:`BatchParams`, struct of arrays, B samples):

* ``symmetry`` (B,) int32: index into ``gpuloader.augment.symmetry`` (signed permutation P)
* ``origin_scale`` (B,) float32: origins and view positions are multiplied by it after P
* ``distance_scale`` (B,) float32: distances are multiplied by it
* ``origin_std``, ``direction_std`` (B,) float32: Gaussian noise std (0 = none)
* ``jitter_threshold`` (B,) uint32: voxel flip when ``(word >> 8) < threshold`` (0 = none)
* ``epoch``, ``index`` (B,) uint32 and ``purpose_offset`` (B,) uint32: the random stream of
  each sample, with the batch's ``seed``.

Float arithmetic is float32 in the order written here, each product and sum rounded on its
own (the CUDA side uses ``__fmul_rn``/``__fadd_rn`` so that no fused multiply-add changes it);
Gaussian draws are float64 (Box-Muller) rounded once to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpuloader.augment import rng, symmetry

__all__ = [
    "BatchParams",
    "SYMMETRY_TABLE",
    "transform_rays",
    "transform_points",
    "transform_voxels",
    "select_rows_batch",
]

#: (48, 6) int32: per symmetry, perm[0..2] then signs[0..2]; the table the kernels get.
SYMMETRY_TABLE = np.array(
    [np.concatenate(symmetry.perm_and_signs(s)) for s in range(symmetry.NUM_SYMMETRIES)],
    dtype=np.int32,
)


def _cast(a, b: int, dtype: type) -> np.ndarray:
    """``a`` (a scalar or (b,) values) as a (b,) array of ``dtype``, a copy unless it already
    is one (an array made here)."""
    if isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == (b,):
        return a
    return np.broadcast_to(np.asarray(a, dtype=dtype), (b,)).copy()


def _u32(a, b: int) -> np.ndarray:
    return _cast(a, b, np.uint32)


def _f32(a, b: int) -> np.ndarray:
    return _cast(a, b, np.float32)


@dataclass
class BatchParams:
    """Per-sample augmentation parameters of one batch (struct of arrays; see module doc)."""

    seed: int
    symmetry: np.ndarray  # (B,) int32
    origin_scale: np.ndarray  # (B,) float32
    distance_scale: np.ndarray  # (B,) float32
    origin_std: np.ndarray  # (B,) float32
    direction_std: np.ndarray  # (B,) float32
    jitter_threshold: np.ndarray  # (B,) uint32
    epoch: np.ndarray  # (B,) uint32
    index: np.ndarray  # (B,) uint32
    purpose_offset: np.ndarray | None = None  # (B,) uint32 (None: zeros)

    def __post_init__(self) -> None:
        # Cast every field, so that a hand-built BatchParams computes in float32 like CUDA.
        b = int(np.size(self.symmetry))
        self.symmetry = _cast(self.symmetry, b, np.int32)
        for name in ("origin_scale", "distance_scale", "origin_std", "direction_std"):
            setattr(self, name, _f32(getattr(self, name), b))
        for name in ("jitter_threshold", "epoch", "index"):
            setattr(self, name, _u32(getattr(self, name), b))
        offset = 0 if self.purpose_offset is None else self.purpose_offset
        self.purpose_offset = _u32(offset, b)

    @classmethod
    def make(
        cls,
        seed: int,
        epoch,
        index,
        symmetry=0,
        origin_scale=1.0,
        distance_scale=1.0,
        origin_std=0.0,
        direction_std=0.0,
        jitter_threshold=0,
        purpose_offset=0,
    ) -> BatchParams:
        """Broadcast scalars or sequences to (B,) arrays of the right dtypes."""
        b = int(np.size(index))
        return cls(
            seed=int(seed),
            symmetry=np.broadcast_to(np.asarray(symmetry, np.int32), (b,)).copy(),
            origin_scale=_f32(origin_scale, b),
            distance_scale=_f32(distance_scale, b),
            origin_std=_f32(origin_std, b),
            direction_std=_f32(direction_std, b),
            jitter_threshold=_u32(jitter_threshold, b),
            epoch=_u32(epoch, b),
            index=_u32(index, b),
            purpose_offset=_u32(purpose_offset, b),
        )

    @property
    def batch_size(self) -> int:
        return int(self.symmetry.shape[0])


def _permute_signed(vec: np.ndarray, sym: np.ndarray) -> np.ndarray:
    """Row-wise P_s v: vec (N, 3) float32, sym (N,) int -> (N, 3) float32 (exact)."""
    sym = np.asarray(sym)
    if sym.size and (sym == sym.flat[0]).all():  # one symmetry (one sample): columns only
        perm_signs = SYMMETRY_TABLE[int(sym.flat[0])]
        out = np.asarray(vec, dtype=np.float32)[:, perm_signs[:3]]  # a copy
        for axis in np.flatnonzero(perm_signs[3:] < 0):
            np.negative(out[:, axis], out=out[:, axis])
        return out
    table = SYMMETRY_TABLE[sym]  # (N, 6)
    rows = np.arange(vec.shape[0])[:, None]
    gathered = vec[rows, table[:, :3]]
    return np.where(table[:, 3:] < 0, -gathered, gathered).astype(np.float32)


def _noise(params: BatchParams, sample: np.ndarray, row: np.ndarray, purpose: int) -> np.ndarray:
    """(N, 3) float32 standard normal draws for rays (sample, row) of one purpose."""
    out = np.empty((sample.shape[0], 3), dtype=np.float32)
    # one Philox block per ray: counter (row, index, epoch, purpose + offset)
    for p_off in np.unique(params.purpose_offset[sample]) if sample.size else []:
        for ep in np.unique(params.epoch[sample]):
            sel = (params.purpose_offset[sample] == p_off) & (params.epoch[sample] == ep)
            words = rng.random_words(
                params.seed, int(ep), params.index[sample[sel]], purpose + int(p_off), row[sel]
            )
            out[sel] = rng.normal_pairs(words)[:, :3].astype(np.float32)
    return out


def _normalize(d: np.ndarray) -> np.ndarray:
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    sq = (x * x + y * y) + z * z  # float32, same order as the kernel
    return (d / np.sqrt(sq)[:, None]).astype(np.float32)


def transform_rays(
    origins: np.ndarray,
    directions: np.ndarray,
    distances: np.ndarray,
    ray_sample: np.ndarray,
    ray_row: np.ndarray,
    params: BatchParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply each ray's sample parameters.

    ``o' = P o * origin_scale + origin_std * n_o``; ``d' = normalize(P d + direction_std * n_d)``
    (no renormalization when direction_std is 0); ``dist' = dist * distance_scale``.

    Args:
        origins, directions: (N, 3) float32.
        distances: (N,) float32.
        ray_sample: (N,) int32 sample of each ray.
        ray_row: (N,) int32 position of the ray among its sample's kept rays.
        params: per-sample parameters.

    Returns:
        New (N, 3), (N, 3), (N,) float32 arrays.
    """
    o = np.asarray(origins, dtype=np.float32)
    d = np.asarray(directions, dtype=np.float32)
    dist = np.asarray(distances, dtype=np.float32)
    s = np.asarray(ray_sample, dtype=np.int64)
    row = np.asarray(ray_row, dtype=np.int64)
    sym = params.symmetry[s]
    o = _permute_signed(o, sym) * params.origin_scale[s][:, None]
    d = _permute_signed(d, sym)
    ostd = params.origin_std[s]
    if np.any(ostd > 0):
        sel = ostd > 0
        n = _noise(params, s[sel], row[sel], rng.Purpose.ORIGIN_NOISE)
        o[sel] = o[sel] + ostd[sel][:, None] * n
    dstd = params.direction_std[s]
    if np.any(dstd > 0):
        sel = dstd > 0
        n = _noise(params, s[sel], row[sel], rng.Purpose.DIRECTION_NOISE)
        d[sel] = _normalize(d[sel] + dstd[sel][:, None] * n)
    dist = (dist * params.distance_scale[s]).astype(np.float32)
    return o.astype(np.float32), d.astype(np.float32), dist


def transform_points(
    points: np.ndarray, point_sample: np.ndarray, params: BatchParams
) -> np.ndarray:
    """View positions: ``p' = P p * origin_scale`` (no noise). (V, 3) float32 -> (V, 3)."""
    s = np.asarray(point_sample, dtype=np.int64)
    p = _permute_signed(np.asarray(points, dtype=np.float32), params.symmetry[s])
    return (p * params.origin_scale[s][:, None]).astype(np.float32)


def transform_voxels(voxels: np.ndarray, sides: np.ndarray, params: BatchParams) -> np.ndarray:
    """Apply each sample's symmetry and occupancy jitter to its grid.

    Args:
        voxels: (B, S, S, S) uint8 grids, sample b occupying ``[0, sides[b])^3`` (the rest 0).
        sides: (B,) int side of each sample's own cubic grid.
        params: per-sample parameters.

    Returns:
        (B, S, S, S) uint8: ``out[b, i'] = in[b, P^-1 i'] ^ jitter(b, i')`` inside the
        sample's cube, 0 outside. Jitter of output voxel with linear index
        ``v = (z * side + y) * side + x`` uses word ``v & 3`` of Philox block
        ``(v >> 2, index, epoch, JITTER + offset)``.
    """
    vox = np.asarray(voxels, dtype=np.uint8)
    out = np.zeros_like(vox)
    for b in range(vox.shape[0]):
        n = int(sides[b])
        if not 0 <= n <= vox.shape[1]:
            raise ValueError(f"sample {b}: side {n} outside [0, {vox.shape[1]}]")
        grid = symmetry.apply_grid(int(params.symmetry[b]), vox[b, :n, :n, :n])
        thr = int(params.jitter_threshold[b])
        if thr > 0:
            v = np.arange(n**3, dtype=np.int64)
            words = rng.random_words(
                params.seed,
                int(params.epoch[b]),
                int(params.index[b]),
                rng.Purpose.JITTER + int(params.purpose_offset[b]),
                v >> 2,
            )
            w = words[np.arange(v.size), v & 3]
            flip = ((w >> np.uint32(8)) < np.uint32(thr)).reshape(n, n, n)
            grid = grid ^ flip.astype(np.uint8)
        out[b, :n, :n, :n] = grid
    return out


def select_rows_batch(
    n: np.ndarray, k: np.ndarray, params: BatchParams
) -> tuple[np.ndarray, np.ndarray]:
    """The kept rows of every sample, flat.

    Args:
        n: (B,) rays available per sample.
        k: (B,) rays wanted per sample (k >= n keeps all, in file order).
        params: gives each sample's (seed, epoch, index) stream; purpose SUBSAMPLE + offset.

    Returns:
        ``rows`` (sum(min(k, n)),) int64 row of each kept ray within its sample,
        ``ray_sample`` (same,) int32.
    """
    rows, owner = [], []
    for b in range(len(n)):
        nb, kb = int(n[b]), int(k[b])
        if kb >= nb:
            r = np.arange(nb, dtype=np.int64)
        else:
            keys = rng.feistel_keys(
                params.seed,
                int(params.epoch[b]),
                int(params.index[b]),
                rng.Purpose.SUBSAMPLE + int(params.purpose_offset[b]),
            )
            r = rng.feistel_permute(np.arange(kb), nb, keys)
        rows.append(r)
        owner.append(np.full(r.size, b, dtype=np.int32))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    return np.concatenate(rows), np.concatenate(owner)
