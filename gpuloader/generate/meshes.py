"""Triangle meshes (STL, OBJ, PLY) to solid voxel grids.

Scaling follows upstream: ``pitch = largest bounding-box extent / resolution``, so the largest
side of the mesh spans the grid exactly; the mesh's bounding box is centred in the cubic
``resolution ** 3`` grid. The interior is filled by parity ray casting: a vertical line
(along world z, array axis 0) through every (x, y) voxel-column centre is cut with every
triangle, the crossings are sorted, and voxels whose centre lies between crossing 2m and
2m+1 are occupied. The surface voxels (every voxel a triangle passes through, from
``trimesh``'s subdivision voxelizer) are added, so thin or open parts are kept too. Only
numpy and trimesh's core are needed (no rtree, embree or scipy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpuloader.errors import GenerationError

MESH_SUFFIXES: tuple[str, ...] = (".stl", ".obj", ".ply")
_PAIR_CHUNK = 1 << 22  # (triangle, column) candidate pairs per chunk
# Sub-voxel offset of the casting lines: keeps them off edges and vertices of meshes whose
# coordinates are round numbers, so a line never crosses one surface twice.
_LINE_OFFSET = (1.23456789e-4, 2.3456789e-4)


def load_mesh(path: str | Path):
    """Load ``path`` as one ``trimesh.Trimesh``; raise GenerationError naming the file and fix."""
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"mesh file {path} does not exist; check the path given to --mesh")
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise GenerationError(
            f"mesh file {path} has an unsupported type {path.suffix!r}; "
            f"convert it to one of {', '.join(MESH_SUFFIXES)}"
        )
    try:
        mesh = trimesh.load(str(path), force="mesh")
    except Exception as exc:  # trimesh raises many kinds on damaged input
        raise GenerationError(
            f"cannot read mesh file {path} ({type(exc).__name__}: {exc}); "
            "check that it is a valid STL/OBJ/PLY file, e.g. by re-exporting it"
        ) from exc
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise GenerationError(
            f"mesh file {path} holds no triangles (empty file, point cloud or lines); "
            "give a triangle mesh"
        )
    extents = np.asarray(mesh.extents, dtype=np.float64)
    if not np.all(np.isfinite(mesh.vertices)) or extents.max() <= 0:
        raise GenerationError(
            f"mesh file {path} has a degenerate or non-finite bounding box {extents.tolist()}; "
            "check the vertex coordinates"
        )
    return mesh


def _columns_fill(tri: np.ndarray, n: int) -> np.ndarray:
    """Parity fill. ``tri``: (F, 3, 3) vertices in grid units (x, y, z), grid spans [0, n]."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    det = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    keep = det != 0.0  # triangles seen edge-on from above are never crossed by a line
    a, b, c, det = a[keep], b[keep], c[keep], det[keep]
    lo = np.minimum(np.minimum(a, b), c)[:, :2]
    hi = np.maximum(np.maximum(a, b), c)[:, :2]
    start = np.clip(np.floor(lo - 0.5).astype(np.int64), 0, n - 1)
    stop = np.clip(np.ceil(hi - 0.5).astype(np.int64), 0, n - 1)
    width = stop - start + 1  # columns in x and y per triangle
    counts = width[:, 0] * width[:, 1]
    keys_all: list[np.ndarray] = []
    z_all: list[np.ndarray] = []
    bounds = np.concatenate([[0], np.cumsum(counts)])
    first = 0
    while first < len(counts):  # chunks of triangles with a bounded number of pairs
        last = int(np.searchsorted(bounds, bounds[first] + _PAIR_CHUNK, side="right")) - 1
        last = max(last, first + 1)
        sl = slice(first, last)
        cnt = counts[sl]
        tri_idx = np.repeat(np.arange(first, last), cnt)
        local = np.arange(int(cnt.sum())) - np.repeat(bounds[first:last] - bounds[first], cnt)
        wx = width[tri_idx, 0]
        ix = start[tri_idx, 0] + local % wx
        iy = start[tri_idx, 1] + local // wx
        px = ix + 0.5 + _LINE_OFFSET[0]
        py = iy + 0.5 + _LINE_OFFSET[1]
        ta, tb, tc, td = a[tri_idx], b[tri_idx], c[tri_idx], det[tri_idx]
        dx, dy = px - ta[:, 0], py - ta[:, 1]
        u = (dx * (tc[:, 1] - ta[:, 1]) - (tc[:, 0] - ta[:, 0]) * dy) / td
        v = ((tb[:, 0] - ta[:, 0]) * dy - dx * (tb[:, 1] - ta[:, 1])) / td
        hit = (u >= 0.0) & (v >= 0.0) & (u + v <= 1.0)
        z = ta[:, 2] + u * (tb[:, 2] - ta[:, 2]) + v * (tc[:, 2] - ta[:, 2])
        keys_all.append((iy * n + ix)[hit])
        z_all.append(z[hit])
        first = last
    grid = np.zeros((n, n, n), dtype=bool)
    if not keys_all:
        return grid
    keys = np.concatenate(keys_all)
    zs = np.concatenate(z_all)
    order = np.lexsort((zs, keys))
    keys, zs = keys[order], zs[order]
    if keys.size == 0:
        return grid
    # Rank of each crossing in its column; an odd last crossing (open mesh) is dropped.
    new = np.concatenate([[True], keys[1:] != keys[:-1]])
    col_start = np.flatnonzero(new)
    col_count = np.diff(np.concatenate([col_start, [keys.size]]))
    rank = np.arange(keys.size) - np.repeat(col_start, col_count)
    count = np.repeat(col_count, col_count)
    kept = (count % 2 == 0) | (rank < count - 1)
    keys, zs = keys[kept], zs[kept]
    z_in, z_out, col = zs[0::2], zs[1::2], keys[0::2]
    k0 = np.clip(np.ceil(z_in - 0.5).astype(np.int64), 0, n)
    k1 = np.clip(np.floor(z_out - 0.5).astype(np.int64) + 1, 0, n)
    good = k1 > k0
    diff = np.zeros((n * n, n + 1), dtype=np.int32)
    np.add.at(diff, (col[good], k0[good]), 1)
    np.add.at(diff, (col[good], k1[good]), -1)
    inside = np.cumsum(diff[:, :n], axis=1) > 0  # (columns iy * n + ix, z)
    return np.ascontiguousarray(inside.reshape(n, n, n).transpose(2, 0, 1))


def voxelize_mesh(mesh, resolution: int) -> tuple[np.ndarray, dict]:
    """Solid-voxelize a ``trimesh.Trimesh`` into a (resolution,)*3 bool grid, axes (z, y, x).

    Returns the grid and metadata: voxel_pitch, original_bbox_min/max/extents,
    num_occupied_voxels, occupancy_ratio.
    """
    from trimesh.voxel.creation import voxelize_subdivide

    n = int(resolution)
    bmin, bmax = (np.asarray(x, dtype=np.float64) for x in mesh.bounds)
    extents = bmax - bmin
    pitch = float(extents.max()) / n
    centre = (bmin + bmax) / 2.0
    to_grid = lambda p: (np.asarray(p, dtype=np.float64) - centre) / pitch + n / 2.0  # noqa: E731
    tri = to_grid(mesh.triangles)
    grid = _columns_fill(tri, n)
    # Surface voxels: trimesh subdivides triangles until edges are shorter than the pitch.
    surface = voxelize_subdivide(mesh, pitch=pitch).points
    if len(surface):
        g = to_grid(surface)
        g -= 1e-6 * np.sign(g - n / 2.0)  # a point on a voxel face counts for the inner voxel
        ijk = np.clip(np.floor(g).astype(np.int64), 0, n - 1)  # (x, y, z)
        grid[ijk[:, 2], ijk[:, 1], ijk[:, 0]] = True
    occupied = int(grid.sum())
    meta = {
        "voxel_pitch": pitch,
        "original_bbox_min": bmin.tolist(),
        "original_bbox_max": bmax.tolist(),
        "original_bbox_extents": extents.tolist(),
        "num_occupied_voxels": occupied,
        "occupancy_ratio": occupied / grid.size,
    }
    return grid, meta


def voxelize_file(path: str | Path, resolution: int) -> tuple[np.ndarray, dict]:
    """Load and voxelize a mesh file; see :func:`voxelize_mesh`."""
    grid, meta = voxelize_mesh(load_mesh(path), resolution)
    if not grid.any():
        raise GenerationError(
            f"mesh file {path} voxelizes to an empty grid at resolution {resolution}; "
            "use a higher --resolution"
        )
    return grid, meta
