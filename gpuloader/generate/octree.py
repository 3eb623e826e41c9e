"""Octree subdivision of a cubic grid into hashed octants (shared/format.md).

Octants are cut in the order ``for i in (0, h): for j in (0, h): for k in (0, h)`` over
array axes 0, 1, 2, so ``octant_index = 4 * (i > 0) + 2 * (j > 0) + (k > 0)``. Levels run
from 1 (side ``base / 2``) down to the level whose side equals ``min_resolution``.

As upstream, every octant is subdivided down to the minimum resolution, empty and full ones
included, so level L always holds ``8 ** L`` records per object. Records are listed level by
level; within a level, in the lexicographic order of the octant path from the root (the
order of a depth-first cut, which is also upstream's order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpuloader.format.grid_hash import grid_hash

OCTANT_OFFSETS: tuple[tuple[int, int, int], ...] = tuple(
    (i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)
)


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def num_levels(resolution: int, min_resolution: int) -> int:
    """Number of levels including level 0: ``log2(resolution / min_resolution) + 1``."""
    return int(np.log2(resolution // min_resolution)) + 1


@dataclass
class Subdivision:
    """One object's octree.

    ``records``: subdivision_map records (dicts, keys as in the format). ``grids``:
    ``{(level, hash): (s, s, s) bool grid}`` with the first grid seen for each hash.
    """

    object_id: str
    records: list[dict] = field(default_factory=list)
    grids: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)


def subdivide(grid: np.ndarray, object_id: str, min_resolution: int) -> Subdivision:
    """Cut ``grid`` (cubic, power-of-two side) into octants down to ``min_resolution``.

    Args:
        grid: (S, S, S) bool level-0 grid.
        object_id: ID written in each record, e.g. ``"0007"``.
        min_resolution: side of the smallest octants (a power of two, <= S).

    Returns:
        A :class:`Subdivision`; records carry object_id, level, octant_index,
        position_x/y/z (offset in the parent along axes 0/1/2), global_position_x/y/z (offset
        in the level-0 grid), hash and is_empty.
    """
    grid = np.ascontiguousarray(grid, dtype=bool)
    side = grid.shape[0]
    if grid.ndim != 3 or len(set(grid.shape)) != 1 or not is_power_of_two(side):
        raise ValueError(f"grid must be cubic with a power-of-two side; got {grid.shape}")
    if not is_power_of_two(min_resolution) or min_resolution > side:
        raise ValueError(f"min_resolution must be a power of two <= {side}; got {min_resolution}")
    out = Subdivision(object_id=object_id)
    # (grid, global offset along axes 0, 1, 2) of the parents of the current level.
    parents: list[tuple[np.ndarray, tuple[int, int, int]]] = [(grid, (0, 0, 0))]
    level = 0
    while parents[0][0].shape[0] > min_resolution:
        level += 1
        children = []
        for parent, (g0, g1, g2) in parents:
            h = parent.shape[0] // 2
            for index, (a, b, c) in enumerate(OCTANT_OFFSETS):
                i, j, k = a * h, b * h, c * h
                sub = np.ascontiguousarray(parent[i : i + h, j : j + h, k : k + h])
                digest = grid_hash(sub)
                empty = not sub.any()
                out.records.append(
                    {
                        "object_id": object_id,
                        "level": level,
                        "octant_index": index,
                        "position_x": i,
                        "position_y": j,
                        "position_z": k,
                        "global_position_x": g0 + i,
                        "global_position_y": g1 + j,
                        "global_position_z": g2 + k,
                        "hash": digest,
                        "is_empty": empty,
                    }
                )
                out.grids.setdefault((level, digest), sub)
                children.append((sub, (g0 + i, g1 + j, g2 + k)))
        parents = children
    return out


def is_trivial(grid: np.ndarray) -> bool:
    """All-empty or all-full."""
    return not grid.any() or bool(grid.all())
