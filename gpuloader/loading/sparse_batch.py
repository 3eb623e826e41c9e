"""Sparse voxels of a whole batch at once, on the batch's device (the GPU loader's step).

``dense_batch_to_sparse(voxels, voxel_shapes, mode, connectivity)`` turns the stacked grids
of a batch (``voxels`` (B, 1, D, H, W), grid ``i`` in ``voxels[i, 0, :D_i, :H_i, :W_i]``,
zero-padded at the end of each axis as ``collate_ray_batch`` pads) into exactly the keys
and values that ``collate_ray_batch`` gives for the same samples of a dataset with
``sparse_voxels=True``::

    voxel_pos         (M, 3) float32   occupied voxels (x, y, z) of all grids, grid by grid,
                                       each in C order (z, then y, then x)
    voxel_features    (M, 1) float32   coo: the voxel values; graph: ones
    voxel_batch       (M,)   long      the grid of each voxel
    voxel_shapes      (B, 3) long      each grid's (D, H, W)
    num_voxels        (B,)   long      M_i
    voxel_edge_index  (2, E) long      graph only: per grid, grouped by neighbour offset (the
                                       order of :func:`~gpuloader.format.sparse.neighbour_offsets`),
                                       sources ascending within a group, self loops last when
                                       asked; node ids offset by the voxels of the grids before

That is, the concatenation of :func:`~gpuloader.format.sparse.voxels_to_sparse_coo` /
:func:`~gpuloader.format.sparse.voxels_to_sparse_index` of every grid cropped to its shape,
bit for bit, computed with batched torch ops (``torch.nonzero``, neighbour look-ups through a
dense index grid, one stable sort) instead of a loop over grids or voxels.
:func:`sparse_batches` does it to every batch of an epoch (a dataset with
``sparse_voxels=True``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from gpuloader.format.sparse import neighbour_offsets

__all__ = ["SPARSE_KEYS", "dense_batch_to_sparse", "sparse_batches"]

#: keys of a sparse batch, in ``collate_ray_batch``'s order (graph mode adds the last).
SPARSE_KEYS = (
    "voxel_pos",
    "voxel_features",
    "voxel_batch",
    "voxel_shapes",
    "num_voxels",
    "voxel_edge_index",
)


def dense_batch_to_sparse(
    voxels: torch.Tensor,
    voxel_shapes: Any,
    mode: str = "coo",
    connectivity: int = 6,
    threshold: float = 0.5,
    add_self_loops: bool = False,
) -> dict[str, torch.Tensor]:
    """The sparse keys of a batch of dense grids (module doc), on ``voxels``' device.

    Args:
        voxels: (B, 1, D, H, W) or (B, D, H, W) grids (bool grids: True is occupied).
        voxel_shapes: (B, 3) each grid's own (D, H, W); voxels outside it are ignored.
        mode: "coo" (points) or "graph" (points and neighbour edges).
        connectivity: 6, 18 or 26 (graph mode).
        threshold: a voxel is occupied when its value is above it.
        add_self_loops: graph mode: an edge (i, i) for every node, after each grid's edges.
    """
    if mode not in ("coo", "graph"):
        raise ValueError(f"mode must be 'coo' or 'graph'; got {mode!r}")
    offsets = neighbour_offsets(connectivity)  # checks connectivity in either mode
    v = voxels
    if v.dim() == 4:
        v = v[:, None]
    if v.dim() != 5 or v.shape[1] != 1:
        raise ValueError(f"expected (B, 1, D, H, W) voxels; got shape {tuple(voxels.shape)}")
    dev = v.device
    nb_, _, d, h, w = v.shape
    shapes = torch.as_tensor(voxel_shapes).to(device=dev, dtype=torch.long).reshape(nb_, 3)
    grid = v[:, 0]
    occ = grid if grid.dtype == torch.bool else grid > threshold
    # only each grid's own box (the padding is zero, but a caller's need not be)
    occ = (
        occ
        & (torch.arange(d, device=dev)[None, :, None, None] < shapes[:, 0, None, None, None])
        & (torch.arange(h, device=dev)[None, None, :, None] < shapes[:, 1, None, None, None])
        & (torch.arange(w, device=dev)[None, None, None, :] < shapes[:, 2, None, None, None])
    )
    idx = torch.nonzero(occ)  # (M, 4) (b, d, h, w): grid by grid, C order within a grid
    batch, coords = idx[:, 0], idx[:, 1:]
    m = int(idx.shape[0])
    out: dict[str, torch.Tensor] = {
        "voxel_pos": coords.flip(1).to(torch.float32),
        "voxel_features": (
            grid[batch, coords[:, 0], coords[:, 1], coords[:, 2]].to(torch.float32).unsqueeze(1)
            if mode == "coo"
            else torch.ones((m, 1), dtype=torch.float32, device=dev)
        ),
        "voxel_batch": batch,
        "voxel_shapes": shapes.clone(),
        "num_voxels": torch.bincount(batch, minlength=nb_).to(torch.long),
    }
    if mode == "graph":
        out["voxel_edge_index"] = _edges(
            batch, coords, shapes, (nb_, d, h, w), offsets, add_self_loops
        )
    return out


def _edges(
    batch: torch.Tensor,
    coords: torch.Tensor,
    shapes: torch.Tensor,
    dims: tuple[int, int, int, int],
    offsets: torch.Tensor,
    add_self_loops: bool,
) -> torch.Tensor:
    """(2, E) edges of every grid, in the order of the concatenated per-grid edge lists."""
    dev = coords.device
    m = int(coords.shape[0])
    ids = torch.arange(m, device=dev)
    node = torch.full(dims, -1, dtype=torch.long, device=dev)
    node[batch, coords[:, 0], coords[:, 1], coords[:, 2]] = ids
    own = shapes[batch]  # (M, 3) each voxel's grid shape
    k = int(offsets.shape[0])
    target = torch.full((k + int(add_self_loops), m), -1, dtype=torch.long, device=dev)
    for j, off in enumerate(offsets.to(dev)):
        nb = coords + off
        inside = ((nb >= 0) & (nb < own)).all(dim=1)
        nb = torch.where(inside[:, None], nb, torch.zeros_like(nb))
        target[j] = torch.where(inside, node[batch, nb[:, 0], nb[:, 1], nb[:, 2]], -1)
    if add_self_loops:
        target[k] = ids
    hit = target >= 0
    pairs = torch.nonzero(hit)  # (E, 2) (group, source): group-major, sources ascending
    src, tgt = pairs[:, 1], target[hit]
    # grid-major, keeping (group, source) order within a grid: each grid's own edge list
    order = torch.sort(batch[src], stable=True).indices
    return torch.stack([src[order], tgt[order]])


def sparse_batches(
    it: Iterator[dict[str, Any]], mode: str = "coo", connectivity: int = 6
) -> Iterator[dict[str, Any]]:
    """``it``'s dense batches as the sparse batches of ``collate_ray_batch`` (a dataset with
    ``sparse_voxels=True``): ``voxels`` replaced by the sparse keys, on the device; the other
    keys follow in their order. Closing this closes ``it``."""
    try:
        for batch in it:
            sp = dense_batch_to_sparse(batch["voxels"], batch["voxel_shapes"], mode, connectivity)
            sp.update((k, v) for k, v in batch.items() if k not in ("voxels", *sp))
            yield sp
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
