"""The exact tracer: path length of rays through the occupied voxels of a grid.

Geometry (shared/format.md): the grid ``voxels`` has array axes (D, H, W) = (z, y, x), is
centred on the origin and has voxels of side ``voxel_size``; world x runs along axis 2. A ray
``o + t d`` contributes, for ``t >= 0``, the length of every piece of it that lies inside an
occupied voxel. The result is not a first-hit depth: a ray through two separate parts of an
object gets the sum of both chords.

Method: the ray is cut at every grid plane it crosses (x, y and z planes) and at the box's
entry and exit points; between two consecutive cuts it stays inside one voxel, which the
midpoint of the piece identifies. Summing the lengths of the occupied pieces is exact up to
floating-point rounding (float64 throughout). A point on a voxel face belongs to the voxel
on its positive side (``floor``); this only matters for rays lying inside a grid plane.
"""

from __future__ import annotations

import numpy as np

__all__ = ["trace", "segments"]

_CHUNK_ELEMENTS = 1 << 21  # cut points per chunk: bounds the temporary memory (about 100 MB)


def _as_rays(origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.asarray(origins, dtype=np.float64)
    d = np.asarray(directions, dtype=np.float64)
    if o.ndim != 2 or o.shape[1] != 3 or d.shape != o.shape:
        raise ValueError(f"origins and directions must both be (N, 3); got {o.shape} and {d.shape}")
    return o, d


def segments(
    voxels: np.ndarray,
    origins: np.ndarray,
    directions: np.ndarray,
    voxel_size: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut rays into the pieces that lie inside single voxels.

    Args:
        voxels: (D, H, W) grid (any dtype; nonzero = occupied).
        origins: (N, 3) ray origins, world (x, y, z).
        directions: (N, 3) ray directions (need not be unit).
        voxel_size: side of one voxel in world units.

    Returns:
        ``lengths`` (N, M) float64 world length of each piece (0 for padding),
        ``index`` (N, M, 3) int64 voxel index (z, y, x) of each piece (clamped in the grid),
        ``inside`` (N, M) bool, True where the piece is a real piece inside the grid.
    """
    shape = np.asarray(voxels.shape, dtype=np.int64)
    if shape.size != 3:
        raise ValueError(f"voxels must be 3-D (D, H, W); got shape {voxels.shape}")
    o, d = _as_rays(origins, directions)
    sizes_xyz = shape[::-1].astype(np.float64)  # (W, H, D)
    # Grid coordinates: g = o / voxel_size + size / 2, so the grid spans [0, size) per axis.
    go = o / voxel_size + sizes_xyz / 2.0
    gd = d / voxel_size
    n = go.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / gd
        t_lo = (0.0 - go) * inv
        t_hi = (sizes_xyz - go) * inv
    t_near = np.minimum(t_lo, t_hi)
    t_far = np.maximum(t_lo, t_hi)
    parallel = gd == 0.0
    inside_slab = (go >= 0.0) & (go <= sizes_xyz)
    t_near = np.where(parallel, np.where(inside_slab, -np.inf, np.inf), t_near)
    t_far = np.where(parallel, np.where(inside_slab, np.inf, -np.inf), t_far)
    t0 = np.maximum(t_near.max(axis=1), 0.0)
    t1 = t_far.min(axis=1)
    hit_box = t1 > t0
    t1 = np.where(hit_box, t1, t0)

    cuts = [t0[:, None], t1[:, None]]
    for axis in range(3):
        planes = np.arange(int(sizes_xyz[axis]) + 1, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (planes[None, :] - go[:, axis : axis + 1]) * inv[:, axis : axis + 1]
        t = np.where(np.isfinite(t), t, t1[:, None])
        cuts.append(t)
    t = np.concatenate(cuts, axis=1)
    np.clip(t, t0[:, None], t1[:, None], out=t)
    t.sort(axis=1)
    piece = np.diff(t, axis=1)  # (N, M) parameter length of each piece
    mid = 0.5 * (t[:, 1:] + t[:, :-1])
    points = go[:, None, :] + mid[..., None] * gd[:, None, :]  # (N, M, 3) grid (x, y, z)
    ijk = np.floor(points).astype(np.int64)
    upper = (shape[::-1] - 1)[None, None, :]
    inside = (piece > 0.0) & np.all((ijk >= 0) & (ijk <= upper), axis=2)
    np.clip(ijk, 0, upper, out=ijk)
    index = ijk[..., ::-1]  # (z, y, x)
    lengths = np.where(inside, piece * np.linalg.norm(d, axis=1)[:, None], 0.0)
    assert lengths.shape[0] == n
    return lengths, index, inside


def trace(
    voxels: np.ndarray,
    origins: np.ndarray,
    directions: np.ndarray,
    voxel_size: float = 1.0,
) -> np.ndarray:
    """Path length of each ray through occupied voxels, for ``t >= 0``.

    Args:
        voxels: (D, H, W) occupancy grid (bool or numeric; nonzero = occupied), axes (z, y, x).
        origins: (N, 3) float ray origins, world (x, y, z).
        directions: (N, 3) float ray directions; the length is measured in world units along
            the ray, so directions need not be unit.
        voxel_size: side of one voxel in world units.

    Returns:
        (N,) float64 distances; 0 for a ray that meets no occupied voxel.
    """
    occ = np.asarray(voxels) != 0
    o, d = _as_rays(origins, directions)
    n = o.shape[0]
    out = np.zeros(n, dtype=np.float64)
    if n == 0 or not occ.any():
        return out
    per_ray = int(sum(occ.shape)) + 5
    chunk = max(1, _CHUNK_ELEMENTS // per_ray)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        lengths, index, inside = segments(occ, o[start:stop], d[start:stop], voxel_size)
        filled = occ[index[..., 0], index[..., 1], index[..., 2]] & inside
        out[start:stop] = np.where(filled, lengths, 0.0).sum(axis=1)
    return out
