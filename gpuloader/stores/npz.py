"""Ray and voxel storage: *how* rows are stored, apart from *which* rows a sample needs.

A :class:`RayStore` answers ``read(sample, rows)``: the rays of one sample (an index record,
see :mod:`gpuloader.format.index`) restricted to ``rows``. :class:`NpzRayStore` reads the upstream
``*_rays.npz`` files; a packed memory-mapped store can implement the same protocol.

Arrays returned by ``read`` (dtypes as on disk, shapes with ``k = len(rows)`` or ``N``)::

    origins        (k, 3) float32
    directions     (k, 3) float32
    distances      (k,)   float32
    hits           (k,)   uint8
    face_ids       (k,)   int32
    view_ids       (k,)   int32
    view_positions (V, 3) float32   one row per view, never indexed by ray rows

A sample that is a chunk of its file (``HierarchicalVoxelRayDataset(rays_per_chunk=...)``)
carries ``ray_offset``: its rays are the file's rows ``ray_offset .. ray_offset + num_rays``,
and ``rows`` index those (:func:`chunk_span`).

Compatible dtypes (other float widths, bool/unsigned/signed integers) are cast to these;
anything else, a missing key, inconsistent row counts or an unreadable file raise
:class:`~gpuloader.errors.DamagedFileError` naming the file.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gpuloader.errors import DamagedFileError, DatasetLayoutError
from gpuloader.format.layout import RAY_ROW_KEYS
from gpuloader.format.npz_files import load_npz
from gpuloader.format.validate import (
    as_ray_dtypes,
    check_ray_shapes,
    check_ray_values,
    validate_voxels,
)

__all__ = ["NpzRayStore", "RayStore", "chunk_span", "read_voxel_file"]

_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError)
_FIX = "regenerate it (gpuloader generate) or delete it and rebuild the index"


@runtime_checkable
class RayStore(Protocol):
    """Where rays come from. ``rows`` is a (k,) int array of row indices, or None for all."""

    def read(self, sample: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        """The ray arrays of ``sample`` (see the module docstring), rows gathered."""
        ...


def _check_dtype(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` cast to the format's dtype of ``key`` (``validate.as_ray_dtypes``)."""
    return as_ray_dtypes(path, {key: arr})[key]


def _validate(path: Path, arrays: dict[str, np.ndarray]) -> int:
    """Check shapes of the ray arrays (and N >= 1); returns N."""
    return check_ray_shapes(path, arrays)


def chunk_span(sample: dict[str, Any], n_file: int, where: Any = None) -> tuple[int, int]:
    """``(first row, row count)`` of a sample's rays in its file of ``n_file`` rows.

    A whole-file sample is ``(0, n_file)``; a chunk (``ray_offset`` set) is
    ``(ray_offset, num_rays)``.

    Raises:
        DamagedFileError: the chunk runs past the file (it changed since the index was built).
    """
    off = sample.get("ray_offset")
    if off is None:
        return 0, int(n_file)
    off, count = int(off), int(sample["num_rays"])
    if off < 0 or off + count > n_file:
        raise DamagedFileError(
            f"{where or sample.get('ray_path')}: chunk rows [{off}, {off + count}) are past "
            f"the file's {n_file} rays; the file changed since the dataset was indexed: "
            "rebuild the dataset object"
        )
    return off, count


class NpzRayStore:
    """Reads ``*_rays.npz`` files (``numpy.savez_compressed``) and gathers rows.

    Each row array is inflated whole (deflate has no random access) and ``rows`` are
    gathered from it; ``view_positions`` is returned whole. Values are checked over every
    row of the sample (the file, or its chunk), not only the rows gathered.
    """

    keys: tuple[str, ...] = (*RAY_ROW_KEYS, "view_positions")

    def read(self, sample: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        path = Path(sample["ray_path"])
        try:
            arrays = as_ray_dtypes(path, load_npz(path, self.keys))
        except FileNotFoundError as exc:
            raise DatasetLayoutError(
                f"{path}: ray file not found (removed after the index was built?); "
                "rebuild the dataset object or regenerate the rays"
            ) from exc
        n = _validate(path, arrays)
        off, count = chunk_span(sample, n, path)
        # every row of the sample (file or chunk) is checked, not only the rows read: a
        # sample is bad or good as a whole, whatever rows an epoch draws (as the stores and
        # packs, which check whole samples once)
        if count == n:
            check_ray_values(path, arrays)
        else:
            span = {
                k: (v[off : off + count] if k in RAY_ROW_KEYS else v) for k, v in arrays.items()
            }
            check_ray_values(path, span, np.arange(off, off + count, dtype=np.int64))
        if count != n and rows is None:
            rows = np.arange(off, off + count, dtype=np.int64)
        elif count != n:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= count):
                raise IndexError(
                    f"{path}: ray rows out of range [0, {count}) of the chunk at row {off}: "
                    f"min {rows.min()}, max {rows.max()}"
                )
            rows = rows + off
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(
                    f"{path}: ray rows out of range [0, {n}): min {rows.min()}, max {rows.max()}"
                )
            for key in RAY_ROW_KEYS:
                arrays[key] = arrays[key][rows]
        return arrays


def read_voxel_file(path: Path) -> np.ndarray:
    """The ``voxels`` array of a voxel ``.npz``: (D, H, W) bool, C-contiguous.

    Raises:
        DatasetLayoutError: the file is missing.
        DamagedFileError: unreadable, no ``voxels`` key, not a cube with a power-of-two
            side (the named subclasses of :mod:`gpuloader.format.validate`).
    """
    path = Path(path)
    try:
        vox = load_npz(path, ("voxels",))["voxels"]
    except FileNotFoundError as exc:
        raise DatasetLayoutError(
            f"{path}: voxel file not found; the voxel dataset does not match the index "
            "(regenerate it, or pass the dataset_dir the rays were made from)"
        ) from exc
    return validate_voxels(path, vox)
