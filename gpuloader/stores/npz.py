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
:class:`~gpuloader.errors.DamagedFileError` naming the file. A ray file's ``grid_shape``
(when it has one) must be its level's grid (:class:`~gpuloader.errors.WrongGridSideError`).

A voxel grid's side must be its level's, ``base_resolution >> level`` of the
``metadata.json`` of the dataset the file lies in (:func:`voxel_file_side`, from the file's
place in the layout); it is checked from the header, before the grid is inflated, so a
512^3 grid deflated into a 130 KB level-1 file costs nothing.
"""

from __future__ import annotations

import functools
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gpuloader.errors import (
    DamagedFileError,
    DatasetLayoutError,
    WrongGridSideError,
)
from gpuloader.format.grid_hash import check_grid_hash
from gpuloader.format.header_cache import file_stamp
from gpuloader.format.layout import RAY_ROW_KEYS, read_json
from gpuloader.format.npz_direct import fast_load_npz
from gpuloader.format.npz_files import make_error
from gpuloader.format.validate import (
    as_ray_dtypes,
    check_grid_header,
    check_ray_shapes,
    check_ray_values,
    validate_voxels,
)

__all__ = [
    "NpzRayStore",
    "RayStore",
    "check_grid_shape",
    "chunk_span",
    "fast_load_npz",
    "level_side",
    "read_voxel_file",
    "voxel_file_side",
]

_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError)


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

    def __init__(self) -> None:
        #: ``(file, first row, rows) -> file stamp`` of spans whose values passed the checks:
        #: an unchanged file (same size, mtime, ctime, inode; settled, as
        #: :mod:`~gpuloader.format.header_cache` rules) is not scanned for NaNs again
        self._values_ok: dict[tuple[str, int, int], tuple[int, ...]] = {}

    def read(self, sample: dict[str, Any], rows: np.ndarray | None) -> dict[str, np.ndarray]:
        path = Path(sample["ray_path"])
        got = file_stamp(path)  # before the read: a later change gives another stamp
        stamp = tuple(got[0]) if got is not None and got[1] else None  # unsettled: checked
        try:
            arrays = fast_load_npz(path, self.keys, optional=("grid_shape",))
        except FileNotFoundError as exc:
            raise DatasetLayoutError(
                f"{path}: ray file not found (removed after the index was built?); "
                "rebuild the dataset object or regenerate the rays"
            ) from exc
        grid_shape = arrays.pop("grid_shape", None)
        if grid_shape is not None and sample.get("voxel_path") is not None:
            check_grid_shape(path, grid_shape, voxel_file_side(sample["voxel_path"]))
        arrays = as_ray_dtypes(path, arrays)
        n = _validate(path, arrays)
        off, count = chunk_span(sample, n, path)
        # every row of the sample (file or chunk) is checked, not only the rows read: a
        # sample is bad or good as a whole, whatever rows an epoch draws (as the stores and
        # packs, which check whole samples once)
        span_key = (str(path), off, count)
        if stamp is None or self._values_ok.get(span_key) != stamp:
            if count == n:
                check_ray_values(path, arrays)
            else:
                span = {
                    k: (v[off : off + count] if k in RAY_ROW_KEYS else v) for k, v in arrays.items()
                }
                check_ray_values(path, span, np.arange(off, off + count, dtype=np.int64))
            if stamp is not None:
                self._values_ok[span_key] = stamp
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


def read_voxel_file(
    path: Path, expected_side: int | None = None, expected_hash: str | None = None
) -> np.ndarray:
    """The ``voxels`` array of a voxel ``.npz``: (D, H, W) bool, C-contiguous.

    Args:
        expected_side: the side of the grid's level; None: :func:`voxel_file_side` (from the
            dataset's ``metadata.json``; no side check when it says nothing).
        expected_hash: the sub-volume's hash, checked against the grid's SHA-256
            (:func:`~gpuloader.format.validate.check_grid_hash`); None: not checked.

    Raises:
        DatasetLayoutError: the file is missing.
        DamagedFileError: unreadable, no ``voxels`` key, a header declaring more than the
            file holds, not a cube with a power-of-two side, another side than its level's,
            values other than 0 and 1, another grid than ``expected_hash`` names (the named
            subclasses of :mod:`gpuloader.format.validate`); the side is checked before
            inflating.
    """
    path = Path(path)
    side = voxel_file_side(path) if expected_side is None else int(expected_side)

    def check(key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        check_grid_header(path, shape, dtype, side)

    try:
        vox = fast_load_npz(path, ("voxels",), check_header=check)["voxels"]
    except FileNotFoundError as exc:
        raise DatasetLayoutError(
            f"{path}: voxel file not found; the voxel dataset does not match the index "
            "(regenerate it, or pass the dataset_dir the rays were made from)"
        ) from exc
    grid = validate_voxels(path, vox, side)
    if expected_hash is not None:
        check_grid_hash(path, grid, expected_hash)
    return grid


def check_grid_shape(path: Any, grid_shape: np.ndarray, expected_side: int | None) -> None:
    """A ray file's ``grid_shape`` ((3,) integers, or one side) against its level's side
    (None: unknown). Another form is left to ``gpuloader verify`` (provenance, not rays).

    Raises:
        WrongGridSideError: the rays were made for another grid than the level's.
    """
    gs = np.asarray(grid_shape)
    if expected_side is None or gs.dtype.kind not in "iu" or gs.size not in (1, 3):
        return
    shape = tuple(int(v) for v in gs.reshape(-1))
    if set(shape) != {int(expected_side)}:
        detail = f"{shape}, but the grids of its level have side {int(expected_side)}"
        raise make_error(WrongGridSideError, path, detail, "grid_shape")


@functools.lru_cache(maxsize=64)
def _level_sides(meta: str, stamp: tuple[int, int]) -> tuple[int | None, tuple[int, ...]]:
    """``(base_resolution, level_resolutions)`` of a ``metadata.json`` (``stamp``: its size
    and mtime, so a rewritten file is read again); None / () where it does not say."""
    try:
        doc = read_json(Path(meta))
    except (OSError, ValueError, UnicodeDecodeError):
        return None, ()
    if not isinstance(doc, dict):
        return None, ()
    base = doc.get("base_resolution")
    base = base if isinstance(base, int) and not isinstance(base, bool) and base >= 1 else None
    sides = doc.get("level_resolutions")
    ok = isinstance(sides, list) and all(type(v) is int and v >= 1 for v in sides)
    return base, tuple(sides) if ok else ()


def level_side(dataset_dir: Path | str, level: int) -> int | None:
    """The grid side of ``level`` in the voxel dataset ``dataset_dir``: its
    ``metadata.json``'s ``base_resolution >> level`` (else ``level_resolutions[level]``);
    None when the file says neither (then no side can be checked)."""
    meta = os.path.join(os.fspath(dataset_dir), "metadata.json")  # runs for every sample
    try:
        st = os.stat(meta)
    except OSError:
        return None
    base, sides = _level_sides(meta, (st.st_size, st.st_mtime_ns))
    level = int(level)
    if base is not None:
        return base >> level if level >= 0 and base >> level >= 1 else None
    return sides[level] if 0 <= level < len(sides) else None


def voxel_file_side(path: Path | str) -> int | None:
    """The side a voxel file's grid must have, from its place in the layout
    (``<dataset>/objects/object_<ID>/level_0.npz`` or
    ``<dataset>/subvolumes/level_<L>/<hh>/<hash>.npz``) and :func:`level_side`; None when
    the path is not in that layout or the metadata does not say."""
    head, name = os.path.split(os.fspath(path).rstrip(os.sep) or os.sep)
    place = _voxel_place(head, name == "level_0.npz")
    return None if place is None else level_side(*place)


@functools.lru_cache(maxsize=4096)
def _voxel_place(head: str, level_0: bool) -> tuple[str, int] | None:
    """``(dataset root, level)`` of a voxel file in folder ``head`` (``level_0``: it is named
    ``level_0.npz``), from the layout's folder names alone."""
    head, folder = os.path.split(head)
    head, parent = os.path.split(head)
    if level_0 and folder.startswith("object_") and parent == "objects":
        return head or ".", 0
    root, top = os.path.split(head)
    if top != "subvolumes" or not parent.startswith("level_") or not folder:
        return None
    level = parent[len("level_") :]
    return (root or ".", int(level)) if level.isdigit() else None
