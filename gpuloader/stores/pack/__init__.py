"""The ray pack (``gpuloader pack``): an uncompressed, memory-mapped copy of a ray tree.

Public names: :class:`PackedRayStore` (read), :func:`pack_rays` (build), :func:`open_ray_store`
(a pack or the npz files), :func:`read_manifest` and :func:`check_pack` (staleness).
"""

from gpuloader.errors import IncompletePackError, PackError, SampleNotInPackError, StalePackError
from gpuloader.stores.pack.store import (
    FORMAT_VERSION,
    PackedRayStore,
    check_pack,
    open_ray_store,
    pack_rays,
    read_manifest,
)

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
