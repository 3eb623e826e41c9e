"""What a dataset holds on disk, read without inflating arrays.

:func:`read_splits` reads ``dataset/splits.json`` (and checks ``metadata.json``),
:func:`scan_ray_tree` lists the ray files by name, :func:`npz_member_header` reads one array's
shape and dtype from its ``.npy`` header. :mod:`gpuloader.format.index` builds the sample
list from these.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from gpuloader.errors import DamagedFileError, DatasetLayoutError
from gpuloader.format import layout
from gpuloader.format.npz_files import (
    FIX,
    NPZ_DECODE_ERRORS,
    check_member_size,
    load_npz,
    unreadable_error,
)

__all__ = ["npz_member_header", "read_json_checked", "read_splits", "scan_ray_tree"]


def npz_member_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``key`` in an ``.npz`` file, without inflating the array.

    Opens the zip member and parses only the ``.npy`` header (a few hundred bytes).

    Raises:
        DatasetLayoutError: the file does not exist.
        DamagedFileError: not a zip, no such member, or a bad ``.npy`` header;
            :class:`~gpuloader.errors.DeclaredSizeError` when the header declares more
            bytes than the zip entry can inflate to.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            info = zf.getinfo(f"{key}.npy")
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:  # 2.0, or 3.0 (same layout, utf-8; our dtypes keep the header ASCII)
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except FileNotFoundError as exc:
        raise DatasetLayoutError(f"{path}: file not found") from exc
    except NPZ_DECODE_ERRORS as exc:
        unreadable = unreadable_error(path, exc)
        if unreadable is not None:
            raise unreadable from exc
        load_npz(path, (key,))  # raises the named error a full read gives (bare .npy, ...)
        raise DamagedFileError(
            f"{path}: cannot read the header of array {key!r} ({type(exc).__name__}: {exc}); "
            f"the file is damaged or not an npz written by numpy.savez_compressed: {FIX}"
        ) from exc
    shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
    # a header claiming more bytes than the entry can inflate to (10^12 rays) is refused
    # here, before any caller sizes anything by it
    check_member_size(path, key, info, shape, dtype, path.stat().st_size)
    return shape, dtype


def read_splits(dataset_dir: Path) -> dict[str, Any]:
    """``dataset/splits.json``, checked for ``object_splits``.

    Raises:
        DatasetLayoutError: ``metadata.json`` or ``splits.json`` is missing.
        DamagedFileError: either file is not valid JSON or lacks ``object_splits``.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetLayoutError(
            f"{dataset_dir}: dataset directory not found; pass the folder that holds "
            "metadata.json, splits.json, objects/ and subvolumes/ (e.g. OUT/dataset)"
        )
    for name in ("metadata.json", "splits.json"):
        p = dataset_dir / name
        if not p.is_file():
            raise DatasetLayoutError(
                f"{p}: missing; dataset_dir must be the voxel dataset root written by the "
                "generator (it holds metadata.json and splits.json); re-run the generator "
                "or point dataset_dir at the right folder"
            )
    splits = read_json_checked(dataset_dir / "splits.json")
    read_json_checked(dataset_dir / "metadata.json")
    if not isinstance(splits, dict) or not isinstance(splits.get("object_splits"), dict):
        raise DamagedFileError(
            f"{dataset_dir / 'splits.json'}: no 'object_splits' mapping; "
            "regenerate the splits with the dataset generator"
        )
    return splits


def read_json_checked(path: Path) -> Any:
    """A JSON file, or :class:`DamagedFileError` naming it when it does not parse."""
    try:
        return layout.read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedFileError(
            f"{path}: not valid JSON ({exc}); the file is damaged: regenerate it"
        ) from exc


def scan_ray_tree(
    ray_dataset_dir: Path,
    errors: list[tuple[str, BaseException]] | None = None,
    allow_outside: bool = False,
    remembered: layout.FolderMemory | None = None,
    as_text: bool = False,
) -> list[tuple[int, str, Path]] | list[tuple[int, str, str]]:
    """All ray files under ``ray_dataset_hierarchical/``: sorted ``(level, hash, path)``;
    ``remembered``: folder listings known from earlier scans (a ``HeaderCache``);
    ``as_text``: paths as ``str``.

    Only names are read (``os.scandir``); files are not opened. A folder that cannot be
    listed (a symlink loop, no permission) and, unless ``allow_outside``, a symlinked
    folder or file that leads outside the root are refused
    (:func:`~gpuloader.format.layout.walk_level_tree`): raised, or with ``errors`` left out
    and ``(path, error)`` appended.
    """
    root = Path(ray_dataset_dir)
    if not root.is_dir():
        raise DatasetLayoutError(
            f"{root}: ray dataset directory not found; pass the folder that holds "
            "level_<L>/ sub-folders of *_rays.npz (e.g. OUT/ray_dataset_hierarchical)"
        )
    return layout.walk_level_tree(
        root, "_rays.npz", errors, allow_outside, remembered=remembered, as_text=as_text
    )
