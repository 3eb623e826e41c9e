"""Collate samples into one ray batch: :func:`collate_ray_batch` (its docstring lists the keys)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from gpuloader import schema

__all__ = ["RAY_DTYPES", "collate_ray_batch"]

#: torch dtype of every per-ray key of a sample and of a batch (the seed's dict).
RAY_DTYPES: dict[str, torch.dtype] = {
    k: getattr(torch, schema.BATCH_DTYPES[k]) for k in schema.RAY_FIELDS
}
_REQUIRED = ("voxels", "origins", "directions", "distances", "hits")
_REQUIRED_SPARSE = ("voxel_pos", "voxel_features", "voxel_shape", *_REQUIRED[1:])


def _tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and (dtype is None or x.dtype == dtype):
        return x  # the dataset's own output: nothing to convert
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x if x.flags.writeable else x.copy())
    t = torch.as_tensor(x)
    return t if dtype is None else t.to(dtype)


def collate_ray_batch(
    batch: Sequence[dict[str, Any]], pad: Literal["end", "center"] = "end"
) -> dict[str, Any]:
    """Concatenate rays and stack (zero-padding) grids of B samples into one batch dict.

    B sample dicts (as returned by
    :class:`~gpuloader.dataset.hierarchical.HierarchicalVoxelRayDataset`) into::

        voxels          (B, 1, D, H, W)  stacked grids (dtype of the samples, float32 by default)
        voxel_shapes    (B, 3) long      each grid's own (D, H, W)
        origins         (N, 3) float32   rays of all samples, concatenated (N = sum of N_i)
        directions      (N, 3) float32
        distances       (N,)   float32
        hits            (N,)   float32
        view_ids        (N,)   long
        face_ids        (N,)   long
        ray_to_voxel    (N,)   long      which grid (0..B-1) each ray belongs to
        num_rays        (B,)   long      N_i
        levels          (B,)   long
        hashes          list[str]
        view_positions  list of (V_i, 3) float32 tensors (V differs between files)

    Grids of different sizes (a batch that mixes levels) are zero-padded to the largest size.
    Padding is added at the **end** of each axis (``pad='end'``, default): grid ``i`` occupies
    ``voxels[i, 0, :D_i, :H_i, :W_i]``; crop with ``voxel_shapes``. Note the world frame of
    each sample stays its own grid's centre. With ``pad='center'`` each grid sits in the middle
    of the padded box instead (sizes are powers of two, so the offset is a whole number of
    voxels), which keeps the padded grid centred on the origin: its rays still trace the same
    distances through it. Optional ray keys missing from any sample are left out.

    The tensors of a batch are views of one buffer (one storage, each key at a 64-byte
    boundary): a DataLoader worker hands the main process one shared-memory block per batch
    instead of one per key. A tensor kept from a batch keeps the batch's buffer alive
    (``.clone()`` what you keep for long).

    ``skipped`` (only when a sample of the batch replaced a bad one under the dataset's
    ``on_error='skip'``): a list of ``(position in the batch, index of the bad sample, error)``.

    Sparse samples (``HierarchicalVoxelRayDataset(sparse_voxels=True)``: ``voxel_pos`` and no
    ``voxels``) are concatenated instead of stacked, as the newer upstream collate does::

        voxel_pos         (M, 3) float32   occupied voxels of all samples (x, y, z)
        voxel_features    (M, 1)
        voxel_batch       (M,)   long      which sample (0..B-1) each voxel belongs to
        voxel_shapes      (B, 3) long      each grid's (D, H, W)
        num_voxels        (B,)   long      M_i
        voxel_edge_index  (2, E) long      graph mode: each sample's edges, node ids offset by
                                           the voxels of the samples before it

    A batch must not mix sparse and dense samples.

    Raises:
        ValueError: empty batch, a missing required key, or a grid that is not (1, D, H, W).
    """
    if len(batch) == 0:
        raise ValueError("collate_ray_batch got an empty batch")
    if pad not in ("end", "center"):
        raise ValueError(f"pad must be 'end' or 'center'; got {pad!r}")
    sparse = [("voxel_pos" in s and "voxels" not in s) for s in batch]
    if any(sparse) and not all(sparse):
        raise ValueError("collate_ray_batch: a batch mixes sparse (voxel_pos) and dense samples")
    required = _REQUIRED_SPARSE if sparse[0] else _REQUIRED
    for i, s in enumerate(batch):
        missing = [k for k in required if k not in s]
        if missing:
            raise ValueError(f"sample {i} of the batch lacks {missing}")
    if not sparse[0]:
        return _collate_grids(batch, pad)
    rays = _ray_tensors(batch)
    device = _tensor(batch[0]["distances"]).device
    return _fill_rays(batch, rays, _block(_ray_specs(batch, rays), device), _collate_sparse(batch))


def _collate_sparse(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the sparse grids of B samples (see collate_ray_batch)."""
    pos = [_tensor(s["voxel_pos"], torch.float32).reshape(-1, 3) for s in batch]
    counts = torch.tensor([p.shape[0] for p in pos], dtype=torch.long)
    feats = [_tensor(s["voxel_features"]) for s in batch]
    fdtype = feats[0].dtype
    for f in feats[1:]:
        fdtype = torch.promote_types(fdtype, f.dtype)
    out: dict[str, Any] = {
        "voxel_pos": torch.cat(pos, dim=0),
        "voxel_features": torch.cat(
            [(f if f.dim() == 2 else f.reshape(-1, 1)).to(fdtype) for f in feats]
        ),
        "voxel_batch": torch.repeat_interleave(torch.arange(len(batch)), counts),
        "voxel_shapes": torch.stack(
            [_tensor(s["voxel_shape"], torch.long).reshape(3) for s in batch]
        ),
        "num_voxels": counts,
    }
    graph = ["voxel_edge_index" in s for s in batch]
    if any(graph) and not all(graph):
        raise ValueError("collate_ray_batch: a batch mixes graph and coo sparse samples")
    if graph[0]:
        first = torch.cumsum(counts, 0) - counts
        edges = [
            _tensor(s["voxel_edge_index"], torch.long).reshape(2, -1) + first[i]
            for i, s in enumerate(batch)
        ]
        out["voxel_edge_index"] = torch.cat(edges, dim=1)
    return out


def _block(
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Empty tensors of ``specs`` (``{key: (shape, dtype)}``) carved out of one byte buffer,
    each at a 64-byte boundary: one storage for the batch, so that a DataLoader worker hands
    the main process one shared-memory block instead of one per key (each costs a file
    descriptor passed over a socket: 12 of them were 6-17% of a 2-worker loader's time).
    A tensor kept from a batch keeps the whole block alive."""
    offsets: dict[str, tuple[int, int]] = {}
    total = 0
    for key, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        offsets[key] = (total, nbytes)
        total += -(-nbytes // 64) * 64
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    return {
        key: buf[o : o + n].view(specs[key][1]).view(specs[key][0])
        for key, (o, n) in offsets.items()
    }


def _collate_grids(batch: Sequence[dict[str, Any]], pad: str) -> dict[str, Any]:
    """Stack (zero-padding) the dense grids of B samples and concatenate their rays, all in
    one block (:func:`_block`; see collate_ray_batch)."""
    grids = [_tensor(s["voxels"]) for s in batch]
    for i, g in enumerate(grids):
        if g.dim() == 3:
            grids[i] = g = g.unsqueeze(0)
        if g.dim() != 4 or g.shape[0] != 1:
            raise ValueError(f"sample {i}: voxels must be (1, D, H, W); got {tuple(g.shape)}")
    dtype = grids[0].dtype
    for g in grids[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    shapes = [tuple(g.shape[1:]) for g in grids]
    big = tuple(max(sh[a] for sh in shapes) for a in range(3))
    specs = {
        "voxels": ((len(grids), 1, *big), dtype),
        "voxel_shapes": ((len(grids), 3), torch.long),
    }
    rays = _ray_tensors(batch)
    specs.update(_ray_specs(batch, rays))
    block = _block(specs, grids[0].device)
    voxels = block["voxels"]
    if all(sh == big for sh in shapes):
        torch.stack([g.to(dtype) for g in grids], out=voxels)
    else:
        voxels.zero_()
        for i, g in enumerate(grids):
            d, h, w = g.shape[1:]
            if pad == "end":
                z0 = y0 = x0 = 0
            else:
                z0, y0, x0 = (big[0] - d) // 2, (big[1] - h) // 2, (big[2] - w) // 2
            voxels[i, :, z0 : z0 + d, y0 : y0 + h, x0 : x0 + w] = g.to(dtype)
    voxel_shapes = block["voxel_shapes"].copy_(torch.tensor(shapes).reshape(-1, 3))
    return _fill_rays(batch, rays, block, {"voxels": voxels, "voxel_shapes": voxel_shapes})


def _ray_tensors(batch: Sequence[dict[str, Any]]) -> dict[str, list[torch.Tensor]]:
    """The per-ray keys every sample has, as tensors of the batch dtypes, and
    ``view_positions`` when every sample has them (one block only with one trailing
    shape: :func:`_ray_specs`)."""
    rays = {
        key: [_tensor(s[key], kdtype) for s in batch]
        for key, kdtype in RAY_DTYPES.items()
        if all(key in s and s[key] is not None for s in batch)
    }
    if all("view_positions" in s and s["view_positions"] is not None for s in batch):
        rays["view_positions"] = [_tensor(s["view_positions"], torch.float32) for s in batch]
    return rays


def _ray_specs(
    batch: Sequence[dict[str, Any]], rays: dict[str, list[torch.Tensor]]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the batch's ray keys (for :func:`_block`)."""
    n = sum(len(s["distances"]) for s in batch)
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for key, parts in rays.items():
        if key == "view_positions":
            views = parts
            if all(v.dim() == 2 and v.shape[1:] == views[0].shape[1:] for v in views):
                specs[key] = ((sum(len(v) for v in views), *views[0].shape[1:]), torch.float32)
            continue
        specs[key] = ((n, *parts[0].shape[1:]), parts[0].dtype)
    specs["ray_to_voxel"] = ((n,), torch.long)
    specs["num_rays"] = ((len(batch),), torch.long)
    specs["levels"] = ((len(batch),), torch.long)
    return specs


def _fill_rays(
    batch: Sequence[dict[str, Any]],
    rays: dict[str, list[torch.Tensor]],
    block: dict[str, torch.Tensor],
    head: dict[str, Any],
) -> dict[str, Any]:
    """The batch: ``head`` (the grid keys), then the ray keys of ``block`` (tensors of
    :func:`_ray_specs`' shapes, filled here) and the per-sample keys of B samples, in the
    order collate_ray_batch lists them."""
    out = dict(head)
    for key, parts in rays.items():
        if key != "view_positions":
            out[key] = torch.cat(parts, dim=0, out=block[key])
    num_rays = block["num_rays"].copy_(torch.tensor([len(s["distances"]) for s in batch]))
    out["ray_to_voxel"] = block["ray_to_voxel"].copy_(
        torch.repeat_interleave(torch.arange(len(batch)), num_rays)
    )
    out["num_rays"] = num_rays
    out["levels"] = block["levels"].copy_(torch.tensor([int(s.get("level", -1)) for s in batch]))
    out["hashes"] = [str(s.get("hash", "")) for s in batch]
    views = rays.get("view_positions")
    if views is not None and "view_positions" in block:  # one trailing shape: one block
        flat = torch.cat(views, dim=0, out=block["view_positions"])
        out["view_positions"] = list(flat.split([len(v) for v in views]))
    elif views is not None:
        out["view_positions"] = views
    skipped = [
        (b, int(s["skipped_from"]), str(s.get("skip_error", "")))
        for b, s in enumerate(batch)
        if s.get("skipped_from") is not None
    ]
    if skipped:  # on_error='skip' replaced these samples (dataset doc)
        out["skipped"] = skipped
    return out
