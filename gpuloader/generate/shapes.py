"""Procedural shapes as boolean voxel grids.

Every shape is a function ``(resolution, rng) -> (D, H, W) bool`` grid, cubic, with array
axes (z, y, x) (world x along axis 2), centred on the origin, voxel size 1. Shapes are
described in normalised coordinates where the grid spans [-1, 1] on every axis; a voxel is
occupied when its centre lies inside the shape.

``rng=None`` gives the canonical shape (fixed parameters, so two objects built from related
canonical shapes, such as ``torus`` and ``torus_rod``, share identical octants and exercise
deduplication). A ``numpy.random.Generator`` jitters the parameters to make a variant;
``blobs`` is always random (a fixed seed when ``rng`` is None).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ShapeFn = Callable[[int, "np.random.Generator | None"], np.ndarray]

#: Shapes that draw their geometry from the generator even in canonical form.
RANDOM_SHAPES: frozenset[str] = frozenset({"blobs"})


def voxel_centres(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised centre coordinates, broadcastable to (D, H, W): ``(z, y, x)`` in (-1, 1)."""
    c = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution * 2.0 - 1.0
    return c[:, None, None], c[None, :, None], c[None, None, :]


def _jitter(rng: np.random.Generator | None, value: float, spread: float) -> float:
    return value if rng is None else float(value + rng.uniform(-spread, spread))


def _box(n: int, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> np.ndarray:
    """Axis-aligned box; ``lo``/``hi`` are (x, y, z) corners in normalised coordinates."""
    z, y, x = voxel_centres(n)
    return (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])


def _ball(n: int, centre: tuple[float, float, float], radius: float) -> np.ndarray:
    z, y, x = voxel_centres(n)
    cx, cy, cz = centre
    return (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= radius**2


def sphere(resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Solid ball of radius 0.7 (variants: radius 0.5-0.8, centre moved by up to 0.1)."""
    r = _jitter(rng, 0.7, 0.15) if rng is not None else 0.7
    c = tuple(_jitter(rng, 0.0, 0.1) for _ in range(3))
    return _ball(resolution, c, r)


def box(resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Box with half sides 0.6 x 0.45 x 0.3 along x, y, z (distinct, so no axis swap maps it)."""
    a, b, c = _jitter(rng, 0.6, 0.1), _jitter(rng, 0.45, 0.1), _jitter(rng, 0.3, 0.1)
    return _box(resolution, (-a, -b, -c), (a, b, c))


def torus(resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Ring around the z axis: major radius 0.55, tube radius 0.2."""
    big, small = _jitter(rng, 0.55, 0.08), _jitter(rng, 0.2, 0.05)
    z, y, x = voxel_centres(resolution)
    q = np.sqrt(x**2 + y**2) - big
    return q**2 + z**2 <= small**2


def asym(resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A chair-like union of bars with no symmetry of the cube (none of the 48 maps it to itself).

    Three arms of different lengths along x, y and z meet at different corners, and a knob
    breaks the remaining mirror; used by tests of rotations and flips.
    """
    t = _jitter(rng, 0.0, 0.05)
    g = _box(resolution, (-0.7, -0.7, -0.7), (0.7, -0.4 + t, -0.45))  # arm along x
    g |= _box(resolution, (-0.7, -0.7, -0.7), (-0.45, 0.5, -0.45))  # arm along y
    g |= _box(resolution, (0.45, -0.7, -0.7), (0.7, -0.4, 0.6 + t))  # post along z
    g |= _box(resolution, (-0.7, 0.25, -0.45), (-0.45, 0.5, -0.15))  # knob on the y arm
    return g


def blobs(resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Union of 4 to 8 random ellipsoids (seeded; ``rng=None`` uses a fixed seed)."""
    rng = np.random.default_rng(1234) if rng is None else rng
    z, y, x = voxel_centres(resolution)
    g = np.zeros((resolution,) * 3, dtype=bool)
    for _ in range(int(rng.integers(4, 9))):
        cx, cy, cz = rng.uniform(-0.5, 0.5, size=3)
        ax, ay, az = rng.uniform(0.15, 0.4, size=3)
        g |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0
    return g


def box_minus_sphere(resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The ``box`` with a ball carved out of its (+x, +y, +z) corner."""
    g = box(resolution, rng)
    r = _jitter(rng, 0.5, 0.1)
    return g & ~_ball(resolution, (0.6, 0.45, 0.3), r)


def hollow_shell(resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Spherical shell: outer radius 0.75, wall 0.15, with an opening cut at +x."""
    outer = _jitter(rng, 0.75, 0.1)
    z, y, x = voxel_centres(resolution)
    rr = x**2 + y**2 + z**2
    return (rr <= outer**2) & (rr >= (outer - 0.15) ** 2) & (x <= 0.55)


def torus_rod(resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The ``torus`` with a square rod through its hole along z (shares octants with ``torus``)."""
    g = torus(resolution, rng)
    w = _jitter(rng, 0.12, 0.03)
    return g | _box(resolution, (-w, -w, -0.8), (w, w, 0.8))


#: name -> shape function ``(resolution, rng) -> (D, H, W) bool``.
SHAPES: dict[str, ShapeFn] = {
    "sphere": sphere,
    "box": box,
    "torus": torus,
    "asym": asym,
    "blobs": blobs,
    "box_minus_sphere": box_minus_sphere,
    "hollow_shell": hollow_shell,
    "torus_rod": torus_rod,
}


def make_shape(name: str, resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Build shape ``name`` as a contiguous (resolution,)*3 bool grid."""
    grid = SHAPES[name](resolution, rng)
    return np.ascontiguousarray(np.broadcast_to(grid, (resolution,) * 3), dtype=bool)
