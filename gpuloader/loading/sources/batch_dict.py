"""One batch from a store and a plan: the fused pass, and the one builder of the batch dict.

Every source ends here: :func:`fused_pass` runs the one gather-and-augment pass over a store
(a resident store, or a batch-sized one with a local plan) on the CPU
(:mod:`gpuloader.fused.cpu`) or on CUDA (:func:`gpuloader.fused.cuda.fused_batch`), and
:func:`batch_dict` builds the dict of ``collate_ray_batch`` (same keys in the same order,
dtypes and shapes)::

    voxels          (B, 1, S, S, S) float32   sample b in [b, 0, :d, :h, :w], 0 elsewhere
    voxel_shapes    (B, 3) int64              each grid's (D, H, W)
    origins, directions (T, 3) float32        distances, hits (T,) float32
    view_ids, face_ids, ray_to_voxel (T,) int64
    num_rays        (B,) int64                levels (B,) int64
    hashes          list of B str             view_positions  list of B (V_b, 3) float32
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gpuloader import schema
from gpuloader.fused import cpu as fused_numpy
from gpuloader.plan.batch import BatchPlan

__all__ = ["RAY_KEYS", "batch_dict", "fused_dict", "fused_pass", "to_device"]

#: per-ray keys of a batch, in the dict's order
RAY_KEYS: tuple[str, ...] = (*schema.RAY_FIELDS, "ray_to_voxel")


def fused_pass(store: Mapping[str, Any], plan: BatchPlan, cuda: bool = False) -> dict[str, Any]:
    """The fused pass over ``store`` for ``plan``: numpy arrays on the CPU, CuPy on CUDA
    (``cuda=True``: on CuPy's current device and stream).

    Args:
        store: ``origins``/``directions`` (R, 3) float32, ``distances`` (R,) float32, ``hits``
            (R,) uint8, ``view_ids``/``face_ids`` (R,) int32 (or a CPU store's ``records``),
            ``view_positions`` (V_store, 3) float32, ``grids`` (G,) uint8.
        plan: the batch's parameters.

    Returns:
        :data:`RAY_KEYS` (T rows), ``voxels`` (B, 1, S, S, S) float32 and ``view_positions``
        (V, 3) float32.
    """
    if cuda:
        from gpuloader.fused import cuda as fused_cupy

        return fused_cupy.fused_batch(store, plan)
    out = fused_numpy.gather_rays(store, plan)
    out["voxels"] = fused_numpy.gather_grids(store["grids"], plan)
    out["view_positions"] = fused_numpy.gather_views(store["view_positions"], plan)
    return out


def batch_dict(
    rays: Mapping[str, torch.Tensor],
    voxels: torch.Tensor,
    view_positions: torch.Tensor,
    view_count: Sequence[int],
    voxel_shapes: torch.Tensor,
    num_rays: torch.Tensor,
    levels: torch.Tensor,
    hashes: list[str],
) -> dict[str, Any]:
    """The dict of ``collate_ray_batch`` (module doc) from torch tensors on the batch's device:
    ``rays`` holds :data:`RAY_KEYS`; ``view_positions`` (V, 3) is split by ``view_count``."""
    out: dict[str, Any] = {"voxels": voxels, "voxel_shapes": voxel_shapes}
    for k in RAY_KEYS:
        out[k] = rays[k]
    out["num_rays"] = num_rays
    out["levels"] = levels
    out["hashes"] = hashes
    out["view_positions"] = list(torch.split(view_positions, list(view_count)))
    return out


def _tensor(a: Any) -> torch.Tensor:
    """A torch tensor of a numpy or CuPy array, without a copy."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


def fused_dict(
    out: Mapping[str, Any],
    plan: BatchPlan,
    levels: np.ndarray,
    hashes: Sequence[str],
    device: Any = None,
    voxel_shapes: np.ndarray | None = None,
) -> dict[str, Any]:
    """:func:`batch_dict` of a :func:`fused_pass`'s outputs (numpy or CuPy, wrapped without a
    copy); the small per-slot arrays (``plan.keep``, ``levels`` (B,) int64, ``voxel_shapes``
    (B, 3) int64, default each side three times) are copied to ``device``."""
    if voxel_shapes is None:
        voxel_shapes = np.repeat(np.asarray(plan.side)[:, None], 3, axis=1)
    return batch_dict(
        {k: _tensor(out[k]) for k in RAY_KEYS},
        _tensor(out["voxels"]),
        _tensor(out["view_positions"]),
        np.asarray(plan.view_count).tolist(),
        torch.tensor(voxel_shapes, device=device),
        torch.tensor(np.asarray(plan.keep, dtype=np.int64), device=device),
        torch.tensor(levels, device=device),
        [hashes[int(j)] for j in plan.index],
    )


def to_device(batch: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    """A CPU batch on ``dev``: one copy per tensor (pinning each fresh batch would cost a
    page-locked allocation per tensor, more than the copy it saves)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(dev)
        elif k == "view_positions":
            flat = torch.cat(v).to(dev) if v else torch.zeros((0, 3), device=dev)
            out[k] = list(torch.split(flat, [int(t.shape[0]) for t in v]))
        else:
            out[k] = v
    return out
