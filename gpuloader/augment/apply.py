"""The per-sample reference apply: one :class:`~gpuloader.augment.plan.SamplePlan` applied to
one sample dict with the numpy back end. It is the CPU API's apply (``Compose``) and the
oracle the fused pass is tested against.

A sample's arrays (numpy or torch, any device) are applied in numpy and turned back into their
own type: ``origins``/``directions`` (N, 3) float32, ``distances`` (N,), ``view_positions``
(V, 3), ``voxels`` (1, S, S, S) or (S, S, S).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.augment import numpy_backend as augment_numpy
from gpuloader.augment import rng, symmetry
from gpuloader.augment.plan import SamplePlan, to_batch_params

__all__ = ["apply_plan"]

RAY_KEYS = schema.RAY_FIELDS


def _to_numpy(v: Any) -> tuple[np.ndarray, Any]:
    """(array, how to turn it back): torch tensors go to CPU numpy and come back likewise."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(v, torch.Tensor):
        dev, dt = v.device, v.dtype
        return v.detach().cpu().numpy(), lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(
            device=dev, dtype=dt
        )
    arr = np.asarray(v)
    return arr, lambda a: np.asarray(a, dtype=arr.dtype)


def apply_plan(plan: SamplePlan, sample: dict, context: rng.SampleContext) -> dict:
    """Apply one plan to one sample dict (numpy back end); returns a new dict (the keys it
    leaves as they are are the sample's own objects)."""
    out = dict(sample)
    n = int(np.shape(sample["origins"])[0])
    rows = None
    if plan.num_rays is not None and plan.num_rays < n:
        keys = rng.feistel_keys(
            context.seed,
            context.epoch,
            context.index,
            rng.Purpose.SUBSAMPLE + plan.purpose_offset,
        )
        rows = rng.feistel_permute(np.arange(plan.num_rays), n, keys)
        n = rows.size
    symmetry_only = not plan.is_identity and plan.turns_only
    grid_changes = plan.symmetry != 0 or plan.jitter_prob > 0
    if plan.is_identity:
        wanted: tuple[str, ...] = ()
    elif symmetry_only:
        wanted = ("origins", "directions", "view_positions", "voxels")
    else:
        wanted = ("origins", "directions", "distances", "view_positions")
        wanted += ("voxels",) if grid_changes else ()
    if rows is not None:
        wanted = (*RAY_KEYS, *wanted)
    conv, arrays = {}, {}
    for k in dict.fromkeys(wanted):  # only the keys this plan changes, as numpy
        if k in sample and sample[k] is not None:
            arrays[k], conv[k] = _to_numpy(sample[k])
    if rows is not None:
        for k in RAY_KEYS:
            if k in arrays:
                arrays[k] = arrays[k][rows]
    if symmetry_only:
        # a rotation or flip alone: the rays' and views' columns permuted and signed, the
        # grid's axes, distances kept (what the general pass gives, bit for bit: it scales
        # them by 1.0 and, without jitter, only permutes the 0/1 grid)
        sym = np.full(1, plan.symmetry, np.int32)
        for k in ("origins", "directions", "view_positions"):
            if k in arrays:
                arrays[k] = augment_numpy._permute_signed(arrays[k], sym)
        if "voxels" in arrays:
            vox = arrays["voxels"]
            grid = _cubic(vox).reshape(vox.shape[-3:])
            turned = symmetry.apply_grid(plan.symmetry, (grid != 0).astype(np.uint8))
            arrays["voxels"] = np.ascontiguousarray(turned).reshape(vox.shape)
    elif not plan.is_identity:
        params = to_batch_params([plan], [context])
        zeros = np.zeros(n, dtype=np.int32)
        o, d, dist = augment_numpy.transform_rays(
            arrays["origins"],
            arrays["directions"],
            arrays["distances"],
            zeros,
            np.arange(n, dtype=np.int32),
            params,
        )
        arrays["origins"], arrays["directions"], arrays["distances"] = o, d, dist
        if "view_positions" in arrays:
            vp = arrays["view_positions"]
            arrays["view_positions"] = augment_numpy.transform_points(
                vp, np.zeros(vp.shape[0], np.int32), params
            )
        if "voxels" in arrays:
            vox = arrays["voxels"]
            grid = _cubic(vox).reshape(vox.shape[-3:])
            new = augment_numpy.transform_voxels(
                (grid != 0).astype(np.uint8)[None], np.array([grid.shape[0]]), params
            )[0]
            arrays["voxels"] = new.reshape(vox.shape)
    for k, a in arrays.items():
        out[k] = conv[k](a)
    return out


def _cubic(vox: np.ndarray) -> np.ndarray:
    """``vox`` when its last three sides are equal; else ValueError (turns need a cube)."""
    if len(set(vox.shape[-3:])) != 1:
        raise ValueError(f"geometric transforms need a cubic grid; got voxels of shape {vox.shape}")
    return vox
