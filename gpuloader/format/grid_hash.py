"""Sub-volume names: the SHA-256 of a grid, as the generator names sub-volumes.

A level >= 1 sub-volume's hash (its file name) is the hex SHA-256 of its (S, S, S) grid as
C-ordered bool bytes. :func:`grid_hash` computes it, :func:`zero_grid_hash` that of the
all-empty grid of a side (without building it), :func:`check_grid_hash` compares a grid with
its name (``HierarchicalVoxelRayDataset(check_grid_hash=True)``, ``gpuloader verify``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from gpuloader.errors import GridHashError

__all__ = ["check_grid_hash", "grid_hash", "zero_grid_hash"]


def grid_hash(grid: np.ndarray) -> str:
    """The name of a sub-volume of grid ``grid``: (S, S, S) 0/1 values -> hex SHA-256."""
    return hashlib.sha256(np.ascontiguousarray(grid, dtype=np.bool_).tobytes()).hexdigest()


def zero_grid_hash(side: int) -> str:
    """:func:`grid_hash` of an all-False ``(side, side, side)`` grid, hashed in chunks."""
    h = hashlib.sha256()
    total = side**3
    chunk = bytes(min(total, 1 << 20))
    while total > 0:
        n = min(total, len(chunk))
        h.update(chunk[:n])
        total -= n
    return h.hexdigest()


def check_grid_hash(path: Any, grid: np.ndarray, expected: str) -> None:
    """A sub-volume grid ((S, S, S) bool: ``validate_voxels``) against its name
    (:func:`grid_hash`).

    Raises:
        GridHashError: another grid than the one its name says.
    """
    digest = grid_hash(grid)
    if digest != expected:
        detail = f"content SHA-256 is {digest}, not its name {expected}"
        raise GridHashError(
            f"{path}: 'voxels': {detail}: the file holds another sub-volume's grid; "
            "regenerate it (rerun the same `gpuloader generate` command into the same OUT), "
            "or delete the sample's ray file to leave the sample out",
            path=path,
            key="voxels",
            detail=detail,
        )
