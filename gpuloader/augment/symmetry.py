"""The 48 symmetries of the cube as signed permutation matrices (design decision 1).

A symmetry is stored as an index ``s`` in ``[0, 48)``: ``s = 8 * perm_index + sign_bits``
with ``PERMS[perm_index]`` a permutation of (0, 1, 2) and bit ``i`` of ``sign_bits`` set
when output axis ``i`` is negated. As a matrix, ``P[i, perm[i]] = sign[i]``, so on a world
point ``(P p)_i = sign_i * p[perm_i]``. Index 0 is the identity.

Every geometric transform of a sample is composed into one ``P`` and applied once:
origins, directions and view positions by ``x' = P x``; voxels by ``out[i'] = in[P^-1 i']``
on the centred grid (world x along array axis 2). Tracing the transformed rays through the
transformed grid gives the original distances.

The tables here (``MATRICES``, ``COMPOSE``, ``INVERSE``) are also what the CUDA kernels get.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = [
    "NUM_SYMMETRIES",
    "IDENTITY",
    "PERMS",
    "MATRICES",
    "COMPOSE",
    "INVERSE",
    "perm_and_signs",
    "index_of",
    "compose",
    "inverse",
    "rotation",
    "flip",
    "apply_points",
    "apply_grid",
    "is_proper",
]

NUM_SYMMETRIES = 48
IDENTITY = 0
#: (6, 3) int: the permutations of (0, 1, 2), identity first.
PERMS = np.array(list(itertools.permutations(range(3))), dtype=np.int64)


def perm_and_signs(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetry index -> (perm (3,) int64, signs (3,) int64 of +-1)."""
    if not 0 <= int(s) < NUM_SYMMETRIES:
        raise ValueError(f"symmetry index must be in [0, 48); got {s}")
    perm = PERMS[int(s) // 8]
    bits = int(s) % 8
    signs = np.array([-1 if bits >> i & 1 else 1 for i in range(3)], dtype=np.int64)
    return perm, signs


def _matrix(s: int) -> np.ndarray:
    perm, signs = perm_and_signs(s)
    m = np.zeros((3, 3), dtype=np.int64)
    m[np.arange(3), perm] = signs
    return m


#: (48, 3, 3) int64 signed permutation matrices acting on world (x, y, z).
MATRICES = np.stack([_matrix(s) for s in range(NUM_SYMMETRIES)])
_LOOKUP = {MATRICES[s].tobytes(): s for s in range(NUM_SYMMETRIES)}


def index_of(matrix: np.ndarray) -> int:
    """Signed permutation matrix (3, 3) -> symmetry index."""
    key = np.asarray(matrix, dtype=np.int64).tobytes()
    if key not in _LOOKUP:
        raise ValueError(f"not a signed permutation matrix:\n{matrix}")
    return _LOOKUP[key]


#: (48, 48) int64: ``COMPOSE[a, b]`` is the index of ``P_a @ P_b`` (b applied first).
COMPOSE = np.array(
    [[index_of(MATRICES[a] @ MATRICES[b]) for b in range(48)] for a in range(48)], dtype=np.int64
)
#: (48,) int64: index of the inverse (= transpose).
INVERSE = np.array([index_of(MATRICES[s].T) for s in range(48)], dtype=np.int64)


def compose(*symmetries: int) -> int:
    """Index of the composition; the LAST argument is applied first (matrix order)."""
    out = IDENTITY
    for s in symmetries:
        out = int(COMPOSE[out, int(s)])
    return out


def inverse(s: int) -> int:
    return int(INVERSE[int(s)])


def is_proper(s: int) -> bool:
    """True for the 24 rotations (determinant +1)."""
    return round(np.linalg.det(MATRICES[int(s)])) == 1


_AXES = {"x": 0, "y": 1, "z": 2, 0: 0, 1: 1, 2: 2}


def rotation(axis: str | int, k: int) -> int:
    """Counter-clockwise rotation by ``k * 90`` degrees about world ``axis`` (x/y/z or 0/1/2)."""
    a = _AXES[axis]
    b, c = [i for i in range(3) if i != a]
    if a == 1:  # right-handed order about y is (z, x)
        b, c = c, b
    m = np.eye(3, dtype=np.int64)
    quarter = np.eye(3, dtype=np.int64)
    quarter[[b, c]] = 0
    quarter[b, c] = -1  # x_b' = -x_c
    quarter[c, b] = 1  # x_c' =  x_b
    for _ in range(int(k) % 4):
        m = quarter @ m
    return index_of(m)


def flip(axis: str | int) -> int:
    """Mirror of world ``axis`` (x/y/z or 0/1/2): that coordinate changes sign."""
    m = np.eye(3, dtype=np.int64)
    m[_AXES[axis], _AXES[axis]] = -1
    return index_of(m)


def apply_points(s: int, points: np.ndarray) -> np.ndarray:
    """``P_s`` applied to world points or vectors: (N, 3) -> (N, 3), same dtype, exact."""
    perm, signs = perm_and_signs(s)
    pts = np.asarray(points)
    return pts[..., perm] * signs.astype(pts.dtype)


def apply_grid(s: int, grid: np.ndarray) -> np.ndarray:
    """``out[i'] = in[P^-1 i']`` on a cubic centred grid with axes (z, y, x), any leading axes.

    Args:
        s: symmetry index.
        grid: (..., D, H, W) array.

    Returns:
        A new (..., D', H', W') array (sides permuted with the axes for non-cubic grids).
    """
    perm, signs = perm_and_signs(s)
    g = np.asarray(grid)
    lead = g.ndim - 3
    # world-axis order (x, y, z) of the last three array axes is (lead+2, lead+1, lead)
    world_axis = [lead + 2, lead + 1, lead]
    # output world axis i takes input world axis perm[i]
    out_world = [world_axis[perm[i]] for i in range(3)]
    order = list(range(lead)) + [out_world[2], out_world[1], out_world[0]]
    out = np.transpose(g, order)
    flips = tuple(lead + 2 - i for i in range(3) if signs[i] < 0)
    if flips:
        out = np.flip(out, axis=flips)
    return np.ascontiguousarray(out)
