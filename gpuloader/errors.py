"""Named errors. Each message names the file involved and the likely fix."""

from __future__ import annotations


class GPULoaderError(Exception):
    """Base class of every error gpuloader raises on purpose."""


class DatasetLayoutError(GPULoaderError, FileNotFoundError):
    """A file the format requires is missing (metadata, splits, a voxel file for a ray file)."""


class NoSamplesError(GPULoaderError, ValueError):
    """No samples are left for a split after filtering; the message says which filter."""


class DamagedFileError(GPULoaderError, ValueError):
    """A file exists but cannot be parsed or has the wrong keys, shapes or dtypes."""


class GenerationError(GPULoaderError):
    """The generator cannot do what it was asked (bad mesh, unwritable folder, bad arguments)."""


class UnsupportedTransformError(GPULoaderError, TypeError):
    """A transform the GPU back end cannot apply in the place it stands."""
