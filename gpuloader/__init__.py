"""gpuloader: a GPU data loader for hierarchical voxel ray-tracing datasets.

The seed's API (drop-in): :class:`HierarchicalVoxelRayDataset`, :class:`RayBatchSampler`,
:func:`collate_ray_batch` and :mod:`gpuloader.augment.transforms`. The GPU loader:
:class:`GPURayLoader` (imported on first use, so that ``import gpuloader`` needs neither DALI
nor CuPy). The exact tracer: :func:`trace`.
"""

from __future__ import annotations

import sys
from typing import Any

from gpuloader.augment import transforms
from gpuloader.augment.rng import SampleContext
from gpuloader.dataset.collate import collate_ray_batch
from gpuloader.dataset.hierarchical import HierarchicalVoxelRayDataset
from gpuloader.format.sparse import (
    compute_sparse_statistics,
    sparse_coo_to_dense,
    voxels_to_sparse_coo,
    voxels_to_sparse_index,
)
from gpuloader.plan.resume import ResumeWorldSizeWarning
from gpuloader.plan.sampler import RayBatchSampler, RayRequest
from gpuloader.stores.npz import NpzRayStore
from gpuloader.stores.pack import PackedRayStore, open_ray_store, pack_rays
from gpuloader.stores.pack.publish import pack_to_url
from gpuloader.stores.resident import ResidentStore
from gpuloader.tracer import trace

__version__ = "0.1.0"

# The seed's ``import gpuloader.transforms`` keeps working.
sys.modules.setdefault("gpuloader.transforms", transforms)

__all__ = [
    "GPURayLoader",
    "HierarchicalVoxelRayDataset",
    "NpzRayStore",
    "PackedRayStore",
    "RayBatchSampler",
    "RayRequest",
    "ResidentStore",
    "ResumeWorldSizeWarning",
    "SampleContext",
    "collate_ray_batch",
    "compute_sparse_statistics",
    "fill_store",
    "open_ray_store",
    "pack_rays",
    "pack_to_url",
    "set_torch_threads",
    "sparse_coo_to_dense",
    "trace",
    "transforms",
    "voxels_to_sparse_coo",
    "voxels_to_sparse_index",
]


def __getattr__(name: str) -> Any:
    if name == "GPURayLoader":
        from gpuloader.loading.loader import GPURayLoader

        return GPURayLoader
    if name == "fill_store":
        from gpuloader.reading.fill import fill_store

        return fill_store
    if name == "set_torch_threads":
        from gpuloader.commands.demo import set_torch_threads

        return set_torch_threads
    raise AttributeError(f"module 'gpuloader' has no attribute {name!r}")
