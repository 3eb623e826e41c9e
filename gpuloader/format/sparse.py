"""Sparse voxel grids: occupied voxels as points (COO) or as a neighbour graph.

The functions have the names, arguments and output keys of the newer upstream loader's
``sparse_utils`` module, so code written against it keeps working::

    voxels_to_sparse_coo(voxels, return_batch=False, threshold=0.5)
        pos       (M, 3) float32   occupied voxels as (x, y, z) = (W, H, D) array indices
        features  (M, 1)           the voxel values there (dtype of ``voxels``)
        shape     (3,)   int64     (D, H, W)
        num_nodes int              M
        batch     (M,)   int64     only with ``return_batch`` and a batch of B > 1 grids
    voxels_to_sparse_index(voxels, threshold=0.5, add_self_loops=False, connectivity=6)
        pos, shape, num_nodes as above; features (M, 1) float32 ones;
        edge_index (2, E) int64: (source, target) for every ordered pair of occupied
        neighbours (6: faces, 18: + edges, 26: + corners), grouped by neighbour offset,
        sources ascending within a group; self loops appended last when asked
    sparse_coo_to_dense(sparse_data, shape=None) -> (1, D, H, W) grid, features' dtype
    compute_sparse_statistics(sparse_data) -> occupancy, sparsity, compression, degree

Voxels are numbered in C order of the grid (z, then y, then x), as ``torch.where`` lists
them. Occupied means ``voxels > threshold`` (``voxels`` itself for a bool grid). Inputs may
be torch tensors (outputs stay on their device) or numpy arrays (outputs on the CPU).

Fixed compared with upstream: the graph output also carries ``num_nodes`` (upstream's
:func:`compute_sparse_statistics` needs it and fails on a graph dict without it); an invalid
``connectivity`` is refused even for an empty grid; a densify without a shape and without
points raises a clear error instead of failing on an empty maximum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "compute_sparse_statistics",
    "neighbour_offsets",
    "sparse_coo_to_dense",
    "voxels_to_sparse_coo",
    "voxels_to_sparse_index",
]

_CONNECTIVITY = (6, 18, 26)


def neighbour_offsets(connectivity: int) -> torch.Tensor:
    """(K, 3) int64 offsets (dD, dH, dW) of a voxel's neighbours, in upstream's order.

    6: the face neighbours (-D, +D, -H, +H, -W, +W); 18: those, then the 12 edge neighbours;
    26: every offset of {-1, 0, 1}^3 but the zero, in C order.
    """
    if connectivity not in _CONNECTIVITY:
        raise ValueError(f"connectivity must be 6, 18 or 26; got {connectivity!r}")
    faces = [[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]]
    if connectivity == 6:
        return torch.tensor(faces, dtype=torch.long)
    if connectivity == 18:
        edges = (
            [[a, b, 0] for a in (-1, 1) for b in (-1, 1)]
            + [[a, 0, c] for a in (-1, 1) for c in (-1, 1)]
            + [[0, b, c] for b in (-1, 1) for c in (-1, 1)]
        )
        return torch.tensor(faces + edges, dtype=torch.long)
    every = [
        [a, b, c]
        for a in (-1, 0, 1)
        for b in (-1, 0, 1)
        for c in (-1, 0, 1)
        if (a, b, c) != (0, 0, 0)
    ]
    return torch.tensor(every, dtype=torch.long)


def _as_tensor(voxels: Any) -> torch.Tensor:
    if isinstance(voxels, torch.Tensor):
        return voxels
    arr = np.asarray(voxels)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _occupied(voxels: torch.Tensor, threshold: float) -> torch.Tensor:
    return voxels if voxels.dtype == torch.bool else voxels > threshold


def voxels_to_sparse_coo(
    voxels: Any, return_batch: bool = False, threshold: float = 0.5
) -> dict[str, Any]:
    """Occupied voxels of a dense grid as points (module doc for the keys).

    Args:
        voxels: (D, H, W), (1, D, H, W) or (B, 1, D, H, W) grid (tensor or array).
        return_batch: add ``batch`` (M,) int64, the grid of each point, when B > 1.
        threshold: a voxel is occupied when its value is above it (bool grids: True).

    Returns:
        dict with ``pos`` (M, 3) float32 (x, y, z), ``features`` (M, 1), ``shape`` (3,)
        int64 (D, H, W), ``num_nodes`` int and, when asked, ``batch``.
    """
    v = _as_tensor(voxels)
    if v.dim() == 3:
        v = v[None, None]
    elif v.dim() == 4:
        v = v[None]
    elif v.dim() != 5:
        raise ValueError(f"expected voxels with 3, 4 or 5 dimensions; got shape {tuple(v.shape)}")
    b, c, d, h, w = torch.where(_occupied(v, threshold))
    pos = torch.stack([w, h, d], dim=1).to(torch.float32)
    out: dict[str, Any] = {
        "pos": pos,
        "features": v[b, c, d, h, w].unsqueeze(1),
        "shape": torch.tensor(list(v.shape[-3:]), dtype=torch.long),
        "num_nodes": int(pos.shape[0]),
    }
    if return_batch and v.shape[0] > 1:
        out["batch"] = b
    return out


def voxels_to_sparse_index(
    voxels: Any,
    threshold: float = 0.5,
    add_self_loops: bool = False,
    connectivity: int = 6,
) -> dict[str, Any]:
    """Occupied voxels as graph nodes, edges between occupied neighbours (module doc).

    Args:
        voxels: (D, H, W) or (1, D, H, W) grid (tensor or array).
        threshold: a voxel is occupied when its value is above it (bool grids: True).
        add_self_loops: append an edge (i, i) for every node.
        connectivity: 6 (faces), 18 (faces and edges) or 26 (faces, edges and corners).

    Returns:
        dict with ``pos`` (M, 3) float32 (x, y, z), ``edge_index`` (2, E) int64,
        ``features`` (M, 1) float32 ones, ``shape`` (3,) int64 (D, H, W), ``num_nodes``.
    """
    offsets = neighbour_offsets(connectivity)
    v = _as_tensor(voxels)
    if v.dim() == 4 and v.shape[0] == 1:
        v = v[0]
    if v.dim() != 3:
        raise ValueError(
            f"expected a (D, H, W) or (1, D, H, W) voxel grid; got shape {tuple(v.shape)}"
        )
    dev = v.device
    dims = torch.tensor(list(v.shape), dtype=torch.long, device=dev)
    coords = torch.nonzero(_occupied(v, threshold))  # (M, 3) (d, h, w), C order
    m = int(coords.shape[0])
    node = torch.full(tuple(v.shape), -1, dtype=torch.long, device=dev)
    node[coords[:, 0], coords[:, 1], coords[:, 2]] = torch.arange(m, device=dev)
    sources, targets = [], []
    for off in offsets.to(dev):
        nb = coords + off
        inside = ((nb >= 0) & (nb < dims)).all(dim=1)
        src = torch.nonzero(inside).reshape(-1)
        tgt = node[nb[src, 0], nb[src, 1], nb[src, 2]]
        hit = tgt >= 0
        sources.append(src[hit])
        targets.append(tgt[hit])
    if add_self_loops:
        sources.append(torch.arange(m, device=dev))
        targets.append(torch.arange(m, device=dev))
    if sources:
        edge_index = torch.stack([torch.cat(sources), torch.cat(targets)]).to(torch.long)
    else:  # pragma: no cover - offsets are never empty
        edge_index = torch.zeros((2, 0), dtype=torch.long, device=dev)
    return {
        "pos": coords.flip(1).to(torch.float32),
        "edge_index": edge_index,
        "features": torch.ones((m, 1), dtype=torch.float32, device=dev),
        "shape": torch.tensor(list(v.shape), dtype=torch.long),
        "num_nodes": m,
    }


def sparse_coo_to_dense(
    sparse_data: dict[str, Any], shape: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """The dense grid of a sparse one: (1, D, H, W), dtype of ``features``, zero elsewhere.

    Args:
        sparse_data: ``pos`` (M, 3) (x, y, z) and ``features`` (M, 1) (optionally ``shape``).
        shape: (D, H, W); default ``sparse_data['shape']``, else the points' extent.
    """
    pos = _as_tensor(sparse_data["pos"])
    features = _as_tensor(sparse_data["features"])
    if shape is None:
        if "shape" in sparse_data and sparse_data["shape"] is not None:
            shape = tuple(int(s) for s in _as_tensor(sparse_data["shape"]).tolist())
        elif pos.shape[0] > 0:
            shape = tuple((pos.max(dim=0).values.long() + 1).flip(0).tolist())
        else:
            raise ValueError("sparse_coo_to_dense: no points and no shape; pass shape=(D, H, W)")
    d, h, w = (int(s) for s in shape)
    grid = torch.zeros((1, d, h, w), dtype=features.dtype, device=features.device)
    if pos.shape[0] > 0:
        idx = pos.long().to(features.device)
        grid[0, idx[:, 2], idx[:, 1], idx[:, 0]] = features.reshape(pos.shape[0], -1)[:, 0]
    return grid


def compute_sparse_statistics(sparse_data: dict[str, Any]) -> dict[str, float]:
    """Occupancy figures of a sparse grid (COO or graph dict).

    Returns:
        ``num_occupied``, ``total_voxels``, ``occupancy``, ``sparsity``,
        ``compression_ratio`` (total / occupied, inf when empty) and, for a graph,
        ``num_edges`` and ``avg_degree`` (edges per node).
    """
    shape = _as_tensor(sparse_data["shape"])
    num = sparse_data.get("num_nodes")
    occupied = int(num) if num is not None else int(_as_tensor(sparse_data["pos"]).shape[0])
    total = int(np.prod([int(s) for s in shape.tolist()]))
    stats: dict[str, float] = {
        "num_occupied": occupied,
        "total_voxels": total,
        "occupancy": occupied / total if total > 0 else 0.0,
        "sparsity": 1.0 - occupied / total if total > 0 else 1.0,
        "compression_ratio": total / occupied if occupied > 0 else float("inf"),
    }
    if "edge_index" in sparse_data:
        edges = int(_as_tensor(sparse_data["edge_index"]).shape[1])
        stats["num_edges"] = edges
        stats["avg_degree"] = edges / occupied if occupied > 0 else 0.0
    return stats
