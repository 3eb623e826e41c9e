"""The fused kernels' one argument: ``gpl_fused_args`` (``kernels/fused_args.cuh``) mirrored
in numpy, and the dtypes of the plan fields and outputs the kernels read and write.

Every kernel of ``kernels/fused.cu`` takes this struct by value: the store's arrays, the batch
plan's fields, the symmetry table, the outputs and the epoch kernels' arrays as device
addresses (uint64; 0 is null), then the sizes and the Philox key. CuPy's RawKernel passes a
one-element numpy array of :data:`FUSED_ARGS_DTYPE` by value (the driver copies its bytes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.fused.cuda_build import device_pointer

__all__ = ["FUSED_ARGS_DTYPE", "OUT_DTYPES", "PLAN_DTYPES", "RAY_KEYS", "fused_args"]

#: Output keys of :func:`gather_rays`, in the struct's order.
RAY_KEYS = (*schema.RAY_FIELDS, "ray_to_voxel")
#: dtype of every output: the ray keys' batch dtypes, ``voxels``/``view_positions`` float32.
OUT_DTYPES: dict[str, np.dtype] = {
    **{k: np.dtype(schema.BATCH_DTYPES[k]) for k in schema.RAY_FIELDS},
    "ray_to_voxel": np.dtype(np.int64),
    "voxels": np.dtype(np.float32),
    "view_positions": np.dtype(np.float32),
}

_I64, _U32, _I32, _F32 = (np.dtype(t) for t in (np.int64, np.uint32, np.int32, np.float32))
#: dtype of every plan field as the kernels read it, in the struct's order.
PLAN_DTYPES: dict[str, np.dtype] = {
    **dict.fromkeys(("ray_start", "ray_count", "keep", "out_start"), _I64),
    "select_keys": _U32,
    **dict.fromkeys(("view_start", "view_out_start", "grid_start", "side"), _I64),
    "symmetry": _I32,
    **dict.fromkeys(("origin_scale", "distance_scale", "origin_std", "direction_std"), _F32),
    **dict.fromkeys(("jitter_threshold", "epoch", "index", "purpose_offset"), _U32),
}
#: Output pointers of the struct (``out_<key>``): the ray keys, the grids and views, and the
#: row selection's.
OUT_FIELDS = tuple(
    f"out_{k}" for k in (*RAY_KEYS, "voxels", "view_positions", "rows", "owner", "j")
)
#: The epoch kernels' pointers.
EPOCH_FIELDS = ("batch_starts", "batch_rays", "batch_views", "batch_side", "cursor")
POINTER_FIELDS = (*schema.STORE_KEYS, *PLAN_DTYPES, "sym_table", *OUT_FIELDS, *EPOCH_FIELDS)

#: The numpy twin of ``gpl_fused_args`` (``kernels/fused_args.cuh``), field for field: every
#: pointer a uint64 device address (0: null), then the sizes and the key. ``align=True`` lays it
#: out as the C compiler does (392 bytes); tests/fused/test_fused_kernels_cpu.py checks it.
FUSED_ARGS_DTYPE = np.dtype(
    [(f, np.uint64) for f in POINTER_FIELDS]
    + [("num_rays", _I64), ("num_views", _I64), ("grid_side", _I64)]
    + [("key0", _U32), ("key1", _U32), ("num_samples", _I32)],
    align=True,
)
POINTERS = frozenset(POINTER_FIELDS)


def fused_args(**fields: Any) -> np.ndarray:
    """The kernels' argument struct: a (1,) :data:`FUSED_ARGS_DTYPE` array, zero but for
    ``fields``.

    Pointer fields take device arrays (CuPy arrays: their address) or None (null); the sizes
    (``num_rays``, ``num_views``, ``grid_side``, ``num_samples``) and the key (``key0``,
    ``key1``) take integers. The arrays must outlive the launches (CUDA graphs: the graphs).
    """
    args = np.zeros(1, FUSED_ARGS_DTYPE)
    for name, value in fields.items():
        args[name] = device_pointer(value) if name in POINTERS else value
    return args
