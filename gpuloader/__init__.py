"""gpuloader: a GPU data loader for hierarchical voxel ray-tracing datasets.

The seed's API (drop-in): :class:`HierarchicalVoxelRayDataset`, :class:`RayBatchSampler`,
:func:`collate_ray_batch` and :mod:`gpuloader.transforms`. The GPU loader:
:class:`GPURayLoader` (imported on first use, so that ``import gpuloader`` needs neither DALI
nor CuPy). The exact tracer: :func:`trace`.
"""

from __future__ import annotations

from typing import Any

from gpuloader import transforms
from gpuloader.collate import collate_ray_batch
from gpuloader.dataset import HierarchicalVoxelRayDataset
from gpuloader.packed import PackedRayStore, open_ray_store, pack_rays
from gpuloader.raystore import NpzRayStore
from gpuloader.rng import SampleContext
from gpuloader.sampler import RayBatchSampler, RayRequest
from gpuloader.tracer import trace

__version__ = "0.1.0"

__all__ = [
    "GPURayLoader",
    "HierarchicalVoxelRayDataset",
    "NpzRayStore",
    "PackedRayStore",
    "RayBatchSampler",
    "RayRequest",
    "SampleContext",
    "collate_ray_batch",
    "open_ray_store",
    "pack_rays",
    "trace",
    "transforms",
]


def __getattr__(name: str) -> Any:
    if name == "GPURayLoader":
        from gpuloader.loader import GPURayLoader

        return GPURayLoader
    raise AttributeError(f"module 'gpuloader' has no attribute {name!r}")
