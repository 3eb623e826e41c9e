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
from gpuloader.format.layout import RAY_DTYPES, RAY_ROW_KEYS

__all__ = ["NpzRayStore", "RayStore", "read_voxel_file"]

_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError)
_FIX = "regenerate it (gpuloader generate) or delete it and rebuild the index"


@runtime_checkable
class RayStore(Protocol):
    """Where rays come from. ``rows`` is a (k,) int array of row indices, or None for all."""

    def read(self, sample: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        """The ray arrays of ``sample`` (see the module docstring), rows gathered."""
        ...


def _check_dtype(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    want = RAY_DTYPES[key]
    if arr.dtype == want:
        return arr
    ok = (want.kind == "f" and arr.dtype.kind == "f") or (
        want.kind in "iu" and arr.dtype.kind in "biu"
    )
    if not ok:
        raise DamagedFileError(
            f"{path}: array {key!r} has dtype {arr.dtype}, expected {want}; {_FIX}"
        )
    return arr.astype(want)


def _validate(path: Path, arrays: dict[str, np.ndarray]) -> int:
    """Check shapes of the ray arrays; returns N."""
    origins = arrays["origins"]
    if origins.ndim != 2 or origins.shape[1] != 3:
        raise DamagedFileError(
            f"{path}: 'origins' has shape {origins.shape}, expected (N, 3); {_FIX}"
        )
    n = origins.shape[0]
    for key in RAY_ROW_KEYS:
        want = (n, 3) if key in ("origins", "directions") else (n,)
        if arrays[key].shape != want:
            raise DamagedFileError(
                f"{path}: {key!r} has shape {arrays[key].shape}, expected {want} "
                f"(N = {n} from 'origins'); {_FIX}"
            )
    vp = arrays["view_positions"]
    if vp.ndim != 2 or vp.shape[1] != 3:
        raise DamagedFileError(
            f"{path}: 'view_positions' has shape {vp.shape}, expected (V, 3); {_FIX}"
        )
    return n


class NpzRayStore:
    """Reads ``*_rays.npz`` files (``numpy.savez_compressed``) and gathers rows.

    Each row array is inflated whole (deflate has no random access) and ``rows`` are
    gathered from it; ``view_positions`` is returned whole.
    """

    keys: tuple[str, ...] = (*RAY_ROW_KEYS, "view_positions")

    def read(self, sample: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        path = Path(sample["ray_path"])
        arrays: dict[str, np.ndarray] = {}
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in self.keys if k not in npz.files]
                if missing:
                    raise DamagedFileError(
                        f"{path}: missing array(s) {missing} (has {sorted(npz.files)}); {_FIX}"
                    )
                for key in self.keys:
                    arrays[key] = _check_dtype(path, key, npz[key])
        except FileNotFoundError as exc:
            raise DatasetLayoutError(
                f"{path}: ray file not found (removed after the index was built?); "
                "rebuild the dataset object or regenerate the rays"
            ) from exc
        except DamagedFileError:
            raise
        except _READ_ERRORS as exc:
            raise DamagedFileError(
                f"{path}: cannot read ray file ({type(exc).__name__}: {exc}); {_FIX}"
            ) from exc
        n = _validate(path, arrays)
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
        DamagedFileError: unreadable, no ``voxels`` key, or not a 3-D grid.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "voxels" not in npz.files:
                raise DamagedFileError(
                    f"{path}: no 'voxels' array (has {sorted(npz.files)}); {_FIX}"
                )
            vox = npz["voxels"]
    except FileNotFoundError as exc:
        raise DatasetLayoutError(
            f"{path}: voxel file not found; the voxel dataset does not match the index "
            "(regenerate it, or pass the dataset_dir the rays were made from)"
        ) from exc
    except DamagedFileError:
        raise
    except _READ_ERRORS as exc:
        raise DamagedFileError(
            f"{path}: cannot read voxel file ({type(exc).__name__}: {exc}); {_FIX}"
        ) from exc
    if vox.ndim != 3:
        raise DamagedFileError(f"{path}: 'voxels' has shape {vox.shape}, expected (D, H, W)")
    if vox.dtype != np.bool_:
        if vox.dtype.kind not in "biuf":
            raise DamagedFileError(f"{path}: 'voxels' has dtype {vox.dtype}, expected bool")
        vox = vox != 0
    return np.ascontiguousarray(vox)
