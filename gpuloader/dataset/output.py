"""A raw sample as the dataset gives it: torch tensors with the output dtypes, sparse keys.

:func:`to_output` turns a raw sample (numpy arrays with the on-disk dtypes, see
:meth:`~gpuloader.dataset.view.DatasetView.read_sample`) into the dataset's output::

    voxels          (1, D, H, W) float32      origins, directions (N, 3) float32
    distances, hits (N,) float32              view_ids, face_ids  (N,)   int64
    view_positions  (V, 3) float32            level int, hash str, chunk_idx int

(:data:`SAMPLE_DTYPES`: the dtype of every array key); other keys pass through.
:func:`to_sparse` replaces ``voxels`` by the sparse keys of ``sparse_mode``
(:mod:`gpuloader.format.sparse`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gpuloader import schema
from gpuloader.format.sparse import voxels_to_sparse_coo, voxels_to_sparse_index

__all__ = ["SAMPLE_DTYPES", "to_output", "to_sparse", "to_torch"]

#: Output dtype of every array key of a sample.
SAMPLE_DTYPES: dict[str, torch.dtype] = {f.name: getattr(torch, f.batch) for f in schema.FIELDS}
_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype(np.float32),
    torch.long: np.dtype(np.int64),
}


def to_torch(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """``value`` as a writable, C-contiguous tensor of ``dtype`` (no copy when it already is)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    arr = np.asarray(value)
    target = _NUMPY_DTYPES[dtype]
    if arr.dtype != target:
        arr = arr.astype(target)  # a new, writable array
    elif not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr)


def to_output(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's array keys as tensors of :data:`SAMPLE_DTYPES`, ``level`` an int and
    ``hash`` a str; other keys unchanged."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        dtype = SAMPLE_DTYPES.get(key)
        out[key] = value if dtype is None or value is None else to_torch(value, dtype)
    if "level" in out:
        out["level"] = int(out["level"])
    if "hash" in out:
        out["hash"] = str(out["hash"])
    return out


def to_sparse(sample: dict[str, Any], mode: str, connectivity: int) -> dict[str, Any]:
    """Replace ``voxels`` (1, D, H, W) by ``voxel_pos`` (M, 3) float32, ``voxel_features``
    and ``voxel_shape`` (3,) int64, plus ``num_voxels`` (``mode='coo'``) or
    ``voxel_edge_index`` (2, E) int64 (``'graph'``, neighbours ``connectivity``)."""
    out = dict(sample)
    voxels = out.pop("voxels")
    if mode == "coo":
        sp = voxels_to_sparse_coo(voxels)
        out.update(
            voxel_pos=sp["pos"],
            voxel_features=sp["features"].to(torch.float32),
            voxel_shape=sp["shape"],
            num_voxels=int(sp["num_nodes"]),
        )
    else:
        sp = voxels_to_sparse_index(voxels, connectivity=connectivity)
        out.update(
            voxel_pos=sp["pos"],
            voxel_features=sp["features"],
            voxel_edge_index=sp["edge_index"],
            voxel_shape=sp["shape"],
        )
    return out
