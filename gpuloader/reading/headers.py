"""Header estimates: where every sample of a split will live, read from file headers only.

:func:`estimate_layout` sizes a store before the fill (ray counts from the index, view counts
from the pack's offsets or the npz header, grid sides from the voxel file's header; nothing is
inflated); :func:`find_bad` and :func:`bad_entry` name a bad sample's file and first error line.

Every size read here is checked before the store is sized from it: a header that declares
more bytes than its file can hold (:class:`~gpuloader.errors.DeclaredSizeError`) or a grid
side other than its level's (:class:`~gpuloader.errors.WrongGridSideError`) is a bad file,
skipped under ``on_error='skip'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuloader.dataset.view import DatasetView
from gpuloader.errors import DatasetLayoutError, DeclaredSizeError
from gpuloader.format.npz_files import member_headers
from gpuloader.format.validate import check_grid_header, classify
from gpuloader.stores.layout import StoreLayout, packed_layout
from gpuloader.stores.npz import voxel_file_side
from gpuloader.stores.pack import PackedRayStore

__all__ = ["bad_entry", "estimate_layout", "find_bad", "voxel_side"]


def _headers(path: Any, keys: tuple[str, ...]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """:func:`~gpuloader.format.npz_files.member_headers` (declared sizes checked), a
    missing file named as a layout problem."""
    try:
        return member_headers(path, keys)
    except FileNotFoundError as exc:
        raise DatasetLayoutError(f"{path}: file not found") from exc


def voxel_side(path: Any, expected_side: int | None = None) -> int:
    """A voxel file's grid side, from its header, checked before anything is sized by it.

    Args:
        expected_side: its level's side; None:
            :func:`~gpuloader.stores.npz.voxel_file_side` (the dataset's metadata.json).

    Raises:
        BadGridError: not a power-of-two cube; WrongGridSideError: not its level's side;
        DeclaredSizeError, WrongDtypeError and the npz errors (named; the file first).
    """
    shape, dtype = _headers(path, ("voxels",))["voxels"]
    side = voxel_file_side(path) if expected_side is None else int(expected_side)
    check_grid_header(path, shape, dtype, side)
    return int(shape[0])


def estimate_layout(dataset: Any, on_error: str | None = None) -> StoreLayout:
    """Where every sample of ``dataset`` will live, from file headers only (no inflating).

    Ray counts come from the index; view counts from the ray store (a pack's offsets) or
    the npz header of ``view_positions``; grid sides from the
    voxel file's header. With ``on_error='skip'`` (default: the dataset's policy) a sample
    whose headers are bad is recorded in ``layout.bad`` (no views, no grid) instead of
    raising.

    Args:
        dataset: a HierarchicalVoxelRayDataset or its DatasetView.
    """
    view = DatasetView.of(dataset)
    skip = (on_error or view.on_error) == "skip"
    samples = view.samples
    k = len(samples)
    rays = view.num_rays.copy()
    views = np.zeros(k, dtype=np.int64)
    sides = np.zeros(k, dtype=np.int64)
    side_cache: dict[Any, int | BaseException] = {}
    bad: dict[int, tuple[str, str]] = {}
    pack = view.ray_store if isinstance(view.ray_store, PackedRayStore) else None
    for i, s in enumerate(samples):
        try:
            if pack is not None:
                views[i] = int(pack.locate(s)[4])
            else:  # origins too: the index's ray count must be one the file can hold
                heads = _headers(s["ray_path"], ("origins", "view_positions"))
                views[i] = heads["view_positions"][0][0]
            key = s["voxel_path"]
            side = side_cache.get(key)
            if side is None:
                try:
                    side = side_cache[key] = voxel_side(key)
                except Exception as exc:  # remembered: one grid, many samples
                    side_cache[key] = exc
                    raise
            elif isinstance(side, BaseException):
                raise side
            sides[i] = side
        except Exception as exc:
            if not skip or classify(exc) is None:
                raise
            views[i] = sides[i] = 0
            if isinstance(exc, DeclaredSizeError):  # the index's ray count is not to be trusted
                rays[i] = 0
            bad[i] = find_bad(view, i)  # the error a full read gives, as the CPU API's
    return packed_layout(rays, views, sides, bad)


def bad_entry(dataset: Any, index: int, exc: BaseException) -> tuple[str, str]:
    """``(file, first line of the error)`` of bad sample ``index`` of ``dataset`` (a
    HierarchicalVoxelRayDataset or its DatasetView: ``DatasetView.bad_entry``)."""
    return DatasetView.of(dataset).bad_entry(index, exc)


def find_bad(dataset: Any, index: int) -> tuple[str, str]:
    """``(file, first line of the error)`` of a sample a worker reported bad, read again here
    (only its error crosses no process boundary). ``dataset``: a HierarchicalVoxelRayDataset
    or its DatasetView."""
    view = DatasetView.of(dataset)
    try:
        view.read_sample(index, 0, None)
    except Exception as exc:  # noqa: BLE001 - the error is what we want
        return view.bad_entry(index, exc)
    s = view.samples[index]
    return str(s.get("ray_path")), f"{s.get('ray_path')}: bad when read by a worker"
