"""The ray pack (``gpuloader pack``): an uncompressed, memory-mapped copy of a ray tree.

Modules: :mod:`~gpuloader.stores.pack.manifest` (format, manifest, staleness),
:mod:`~gpuloader.stores.pack.build` (writing a pack; the rows layout),
:mod:`~gpuloader.stores.pack.build_steps` (what every build shares),
:mod:`~gpuloader.stores.pack.striped` (the striped layout's format and its levels),
:mod:`~gpuloader.stores.pack.striped_build` (writing a striped pack),
:mod:`~gpuloader.stores.pack.store` (reading either).

Public names: :class:`PackedRayStore` (read), :func:`pack_rays` (build), :func:`open_ray_store`
(a pack or the npz files), :func:`read_manifest` and :func:`check_pack` (staleness),
:class:`StripedLevel` (one level of a striped pack, for a streaming store).
"""

from gpuloader.errors import (
    IncompletePackError,
    PackError,
    PackLayoutError,
    SampleNotInPackError,
    StalePackError,
)
from gpuloader.stores.pack.build import pack_rays
from gpuloader.stores.pack.manifest import FORMAT_VERSION, check_pack, read_manifest
from gpuloader.stores.pack.store import PackedRayStore, open_ray_store
from gpuloader.stores.pack.striped import StripedLevel

__all__ = [
    "FORMAT_VERSION",
    "IncompletePackError",
    "PackError",
    "PackLayoutError",
    "PackedRayStore",
    "SampleNotInPackError",
    "StalePackError",
    "StripedLevel",
    "check_pack",
    "open_ray_store",
    "pack_rays",
    "read_manifest",
]
