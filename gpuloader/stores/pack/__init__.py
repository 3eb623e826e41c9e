"""The ray pack (``gpuloader pack``): an uncompressed, memory-mapped copy of a ray tree.

Modules: :mod:`~gpuloader.stores.pack.manifest` (format, manifest, staleness),
:mod:`~gpuloader.stores.pack.build` (writing a pack), :mod:`~gpuloader.stores.pack.store`
(reading one).

Public names: :class:`PackedRayStore` (read), :func:`pack_rays` (build), :func:`open_ray_store`
(a pack or the npz files), :func:`read_manifest` and :func:`check_pack` (staleness).
"""

from gpuloader.errors import IncompletePackError, PackError, SampleNotInPackError, StalePackError
from gpuloader.stores.pack.build import pack_rays
from gpuloader.stores.pack.manifest import FORMAT_VERSION, check_pack, read_manifest
from gpuloader.stores.pack.store import PackedRayStore, open_ray_store

__all__ = [
    "FORMAT_VERSION",
    "IncompletePackError",
    "PackError",
    "PackedRayStore",
    "SampleNotInPackError",
    "StalePackError",
    "check_pack",
    "open_ray_store",
    "pack_rays",
    "read_manifest",
]
